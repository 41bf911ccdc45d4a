# megavlm — the two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python
PIP := $(PYTHON) -m pip
TORCH_VERSION := 2.13.0
MCORE_VERSION := 0.19.2
PYTEST_ARGS ?=

.PHONY: install demo test test-all test-slow bench lint

install:
	@# torch: keep a CUDA build that is already present (GPU hosts); otherwise the pinned CPU wheel.
	@$(PYTHON) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null \
	  && echo "keeping CUDA torch $$($(PYTHON) -c 'import torch; print(torch.__version__)')" \
	  || $(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q numpy packaging psutil
	@# megatron-core 0.19.2 declares Python >= 3.12 but its cp311 wheel runs on 3.11.
	@if $(PYTHON) -c "import sys; sys.exit(0 if sys.version_info < (3, 12) else 1)"; then \
	  $(PIP) install -q --no-deps --ignore-requires-python megatron-core==$(MCORE_VERSION); \
	else \
	  $(PIP) install -q --no-deps megatron-core==$(MCORE_VERSION); \
	fi
	@# dev tools, Triton (kernels run under its CPU interpreter in tests), transformers (a tiny random
	@# SigLIP in tests), DALI (CPU-only decode pipelines), lm-eval (evaluation)
	$(PIP) install -q -e ".[dev,kernels,siglip,dali,eval]"

demo: install
	$(PYTHON) -m megavlm demo

test: install
	$(PYTHON) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: install
	$(PYTHON) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

test-gpu: install
	$(PYTHON) -m pytest -q -m gpu $(PYTEST_ARGS)

bench: install
	$(PYTHON) -m megavlm bench train
