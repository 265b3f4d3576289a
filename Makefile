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

.PHONY: demo test test-fast test-torch venv lint format clean venv-credit test-credit credit-probe

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

# The suite against another PyTorch (2.11-2.14, docs/testing.md), in its own environment
# ($(VENV_TORCH)); name one per version to keep several, e.g.
#   make test-torch TORCH_SPEC=torch==2.11.0 VENV_TORCH=.venv-torch211
#   make test-torch TORCH_SPEC=torch==2.14.1 VENV_TORCH=.venv-torch214
# (PyPI's Linux wheels of these releases are CUDA builds: several GB each.)
VENV_TORCH ?= .venv-torch
test-torch:
	@test -x $(VENV_TORCH)/bin/python || $(PYTHON) -m venv $(VENV_TORCH)
	$(VENV_TORCH)/bin/python -m pip install $(TORCH_PIP_ARGS) '$(TORCH_SPEC)'
	$(VENV_TORCH)/bin/python -m pip install -e '.[test]'
	$(VENV_TORCH)/bin/python -c "import torch; print('testing against torch', torch.__version__)"
	$(VENV_TORCH)/bin/python -m pytest $(PYTEST_ARGS)

# The opt-in CREDIT tier (tests/credit, marker `credit`; not part of `make test` nor CI): NCAR
# CREDIT's own models from the installed miles-credit package, converted and H-sharded on 2-4 gloo
# ranks, against one device. Its own environment, .venv-credit: torch + the matching torchvision,
# miles-credit without its (heavy, data-side) dependencies, then only what credit.models' model files
# import; the packages that depend on torch go in with --no-deps so pip never replaces torch.
CREDIT_VENV ?= .venv-credit
CREDIT_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
CREDIT_SPEC ?= miles-credit==2026.2.0
CREDIT_DEPS ?= einops pyyaml xarray 'pandas<3.0.4' python-dateutil cftime tqdm pillow scipy huggingface-hub safetensors
CREDIT_TORCH_DEPS ?= timm==1.0.31 segmentation-models-pytorch==0.6.0 'torch-harmonics<0.9'
CREDIT_PY := $(CREDIT_VENV)/bin/python
CREDIT_STAMP := $(CREDIT_VENV)/.installed-credit
CREDIT_PROBE_ARGS ?=

venv-credit: $(CREDIT_STAMP)

$(CREDIT_STAMP): pyproject.toml
	@test -x $(CREDIT_PY) || $(PYTHON) -m venv $(CREDIT_VENV)
	$(CREDIT_PY) -m pip install $(TORCH_PIP_ARGS) $(CREDIT_TORCH_SPEC)
	$(CREDIT_PY) -m pip install --no-deps '$(CREDIT_SPEC)'
	$(CREDIT_PY) -m pip install $(CREDIT_DEPS)
	$(CREDIT_PY) -m pip install --no-deps $(CREDIT_TORCH_DEPS)
	$(CREDIT_PY) -m pip install -e '.[test]'
	$(CREDIT_PY) -c "import torch, credit.models.crossformer, credit.models.wxformer.wxformer_next, credit.models.fuxi, credit.models.swin, credit.models.unet, credit.models.unet_diffusion, credit.models.camulator, credit.models.debugger_model; print('CREDIT tier: torch', torch.__version__)"
	@touch $@

test-credit: $(CREDIT_STAMP)
	$(CREDIT_PY) -m pytest tests/credit -m credit $(PYTEST_ARGS)

# The same matrix as a report (status, errors, implicit gathers per model x world x field), e.g.
#   make credit-probe CREDIT_PROBE_ARGS='--models crossformer,fuxi --worlds 2 --jsonl /tmp/probe.jsonl'
credit-probe: $(CREDIT_STAMP)
	$(CREDIT_PY) scripts/credit_probe.py $(CREDIT_PROBE_ARGS)

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
	rm -rf $(VENV) .venv-torch .venv-torch[0-9]* build dist *.egg-info .pytest_cache .hypothesis .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
