# One-command setup: `make demo` runs the main job, `make test` the test suite (`make test-fast`
# skips the slow end-to-end tests).
# Both create .venv on first use (CPU torch pinned explicitly, then this package with its
# test extra) and reuse it afterwards; the stamp is rebuilt when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
# Pinned CPU build: an unpinned torch may resolve to a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Extra pip arguments for torch only, e.g. TORCH_PIP_ARGS='--index-url <CPU wheel index>'
TORCH_PIP_ARGS ?=
# The main job: train domain-parallel on 4 local CPU ranks (2 x 2 mesh) and verify against one device.
DEMO_CMD ?= credit-dtensor demo
PYTEST_ARGS ?= --durations=15
LINT_PATHS := credit_dtensor tests $(wildcard scripts)

VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test
LINT_STAMP := $(VENV)/.installed-lint
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: demo test test-fast test-torch venv lint format clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install $(TORCH_PIP_ARGS) '$(TORCH_SPEC)'
	$(VPY) -m pip install -e '.[test]'
	@touch $@

demo: $(STAMP)
	$(DEMO_CMD)

test: $(STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

# The suite against another PyTorch, in its own environment (.venv-torch), e.g.
#   make test-torch TORCH_SPEC=torch==2.14.1
test-torch:
	@test -x .venv-torch/bin/python || $(PYTHON) -m venv .venv-torch
	.venv-torch/bin/python -m pip install $(TORCH_PIP_ARGS) '$(TORCH_SPEC)'
	.venv-torch/bin/python -m pip install -e '.[test]'
	.venv-torch/bin/python -c "import torch; print('testing against torch', torch.__version__)"
	.venv-torch/bin/python -m pytest $(PYTEST_ARGS)

# Everything but the end-to-end runs marked `slow` (torchrun restarts, checkpoint round trips).
test-fast: $(STAMP)
	$(VPY) -m pytest -m "not slow" $(PYTEST_ARGS)

$(LINT_STAMP): $(STAMP)
	$(VPY) -m pip install 'ruff>=0.5'
	@touch $@

lint: $(LINT_STAMP)
	$(VPY) -m ruff check $(LINT_PATHS)
	$(VPY) -m ruff format --check $(LINT_PATHS)

format: $(LINT_STAMP)
	$(VPY) -m ruff format $(LINT_PATHS)

clean:
	rm -rf $(VENV) .venv-torch build dist *.egg-info .pytest_cache .hypothesis .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
