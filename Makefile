# megavlm — the two commands a new user needs: `make demo` and `make test`.
#
# `make install` (online) and `make install OFFLINE=1` (= `make install-offline`, for GPU clusters
# without registry access) never replace a torch or a Triton that is already importable: a GPU
# host's torch and Triton come as a matching pair, and pip would otherwise swap in the pins below.
# PYTHON defaults to the first of python3 / python on PATH (many clusters have only python3).
PYTHON ?= $(shell command -v python3 2>/dev/null || command -v python 2>/dev/null || echo python3)
PIP := $(PYTHON) -m pip
TORCH_VERSION := 2.13.0
TRITON_VERSION := 3.9.0
MCORE_VERSION := 0.19.2
LMMS_EVAL_VERSION := 0.7.3
OFFLINE ?=
WHEELS ?=
PYTEST_ARGS ?=
SELFTEST_ARGS ?=

# How each piece is kept or installed; `make -n install` prints these recipes.
HAVE = $(PYTHON) -c "import $(1)" >/dev/null 2>&1
PY_OLD = $(PYTHON) -c "import sys; sys.exit(0 if sys.version_info < (3, 12) else 1)"
MCORE_FLAGS = --no-deps $$($(PY_OLD) && echo --ignore-requires-python)
WHEEL_FLAGS = --no-index $(if $(WHEELS),--find-links $(WHEELS))

.PHONY: install install-online install-offline demo test test-all test-slow test-gpu bench \
	selftest

ifeq ($(OFFLINE),1)
install: install-offline
else
install: install-online
endif

install-online:
	@# torch: keep any torch that is already importable (a GPU host's CUDA build, a cluster's
	@# version); otherwise the pinned CPU wheel.
	@if $(call HAVE,torch); then \
	  echo "keeping torch $$($(PYTHON) -c 'import torch; print(torch.__version__)' 2>/dev/null)"; \
	else $(PIP) install -q torch==$(TORCH_VERSION); fi
	$(PIP) install -q numpy packaging psutil
	@# megatron-core 0.19.2 declares Python >= 3.12 but its cp311 wheel runs on 3.11.
	@if $(call HAVE,megatron.core); then \
	  echo "keeping megatron-core $$($(PYTHON) -c 'import megatron.core as m; print(m.__version__)' 2>/dev/null)"; \
	else $(PIP) install -q $(MCORE_FLAGS) megatron-core==$(MCORE_VERSION); fi
	@# Triton (kernels; under its CPU interpreter in tests): keep an installed one, else 3.9.0.
	@if $(call HAVE,triton); then \
	  echo "keeping triton $$($(PYTHON) -c 'import triton; print(triton.__version__)' 2>/dev/null)"; \
	else $(PIP) install -q triton==$(TRITON_VERSION); fi
	@# lmms-eval without its own requirements (they would replace torch with a CUDA 2.14 build and
	@# add torchvision); the `lmms` extra below brings the light modules its import and tasks need.
	$(PIP) install -q --no-deps lmms-eval==$(LMMS_EVAL_VERSION)
	@# dev tools, the `kernels` extra (unpinned Triton: satisfied by the one above), transformers
	@# (a tiny random SigLIP in tests), DALI (CPU-only decode pipelines), lm-eval and lmms-eval
	$(PIP) install -q -e ".[dev,kernels,siglip,dali,eval,lmms,logging,prep]"

# Offline (GPU clusters): installs nothing from a registry. torch and Triton must already be
# there; megatron-core comes from WHEELS=dir when it is not importable; megavlm itself is
# installed editable without dependencies and without build isolation (no setuptools download).
install-offline:
	@$(call HAVE,torch) || { echo "install-offline: torch is not importable by $(PYTHON);" \
	  "install the cluster's torch first (this target never installs torch)" >&2; exit 1; }
	@echo "keeping torch $$($(PYTHON) -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>/dev/null)"
	@if $(call HAVE,triton); then \
	  echo "keeping triton $$($(PYTHON) -c 'import triton; print(triton.__version__)' 2>/dev/null)"; \
	else echo "no triton: the fused kernels will not run (masked CE uses the reference)"; fi
	@if $(call HAVE,megatron.core); then \
	  echo "keeping megatron-core $$($(PYTHON) -c 'import megatron.core as m; print(m.__version__)' 2>/dev/null)"; \
	elif [ -n "$(WHEELS)" ]; then \
	  $(PIP) install -q $(WHEEL_FLAGS) $(MCORE_FLAGS) megatron-core==$(MCORE_VERSION); \
	else echo "install-offline: megatron-core is not importable; pass WHEELS=dir holding" \
	  "megatron_core-$(MCORE_VERSION)-*.whl" >&2; exit 1; fi
	$(PIP) install -q --no-index --no-deps --no-build-isolation -e .
	@$(PYTHON) -c "import importlib.util as u; need = ['numpy', 'packaging', 'psutil', \
	  'sentencepiece', 'yaml', 'tqdm', 'PIL', 'tokenizers', 'safetensors']; \
	  miss = [m for m in need if u.find_spec(m) is None]; \
	  print('missing runtime modules (bring wheels: pip install --no-index --find-links DIR ...):', \
	        ', '.join(miss)) if miss else print('runtime modules present')"

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

# The acceptance run on a new machine: it installs nothing and needs no network, so it does not
# depend on `install` (run `make install` or `make install-offline` once before).
selftest:
	$(PYTHON) -m megavlm selftest $(SELFTEST_ARGS)
