# Two commands:  `make demo`  (quantise -> train -> merge -> export -> push -> check, on SmolLM2-135M + Alpaca)
#                `make test`  (the whole test suite on tiny random models)
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
export GPTQMODEL_CPU_WORKERS ?= 1
export HF_HUB_DISABLE_XET := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench clean-demo

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	bash scripts/demo.sh

test: install
	$(PY) -m pytest -q tests

bench: install
	bash scripts/bench.sh

clean-demo:
	rm -rf outputs/demo
