# Two commands:  `make demo`  (quantise -> train -> merge -> export -> push -> check, on SmolLM2-135M + Alpaca)
#                `make test`  (the whole test suite on tiny random models)
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
export GPTQMODEL_CPU_WORKERS ?= 1
export HF_HUB_DISABLE_XET := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench clean-demo install-llama

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# llama.cpp (llama-cpp-python) for the GGUF checks: compiled from the PyPI sdist, portably (a -march=native build can
# die with "Illegal instruction" on CPUs whose features the build machine's compiler assumes). Not part of `make test`.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
install-llama: install
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -e '.[llama]'

demo: install
	bash scripts/demo.sh

test: install
	$(PY) -m pytest -q tests

bench: install
	bash scripts/bench.sh

clean-demo:
	rm -rf outputs/demo
