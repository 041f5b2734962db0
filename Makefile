# The two fresh-machine commands (README):  make demo  |  make test
# Both set everything up from scratch into .venv; nothing installed by hand is assumed.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch 2.14.1 is what `pip install torch` gives on the development machines (GPU
# machines run 2.11); torchvision must match it.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Build the CUDA half of the extension when a toolkit is there (CPU-only otherwise).
CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=

.PHONY: setup data demo test bench info clean

# MINC_KERNELS_BUILD_EXT=1: the project's own install must build the extension (CUDA objects
# too when a toolkit is there); a failed build stops here instead of silently falling back.
$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*) examples/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q "setuptools>=77" wheel ninja pybind11
	MINC_KERNELS_BUILD_EXT=1 CUDA_HOME=$(CUDA_HOME) MAX_JOBS=2 $(PIP) install -q --no-build-isolation -e ".[test]"
	# the training program and studies (an application on the library: minc-train)
	$(PIP) install -q --no-build-isolation -e examples
	touch $@

setup: $(VENV)/.installed

# Fashion-MNIST for the built-in default run: Debian's package where apt is usable,
# otherwise the training program falls back to torchvision's download.
data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null || \
	  ( $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null ) || \
	  echo "could not apt-get dataset-fashion-mnist; the program will try torchvision's download"; \
	fi

# Main job on its built-in default: MINC pre-training on Fashion-MNIST + report.
demo: setup data
	$(PY) -m minc_kernels.info
	$(VENV)/bin/minc-train

# The test suite: the library's (tests/) and the training program's (examples/tests/), in one
# pytest run (CPU-only machines run the Triton kernels under TRITON_INTERPRET=1).
# pytest exits 5 when nothing is collected; that is not a failure of the install.
test: setup
	$(PY) -m minc_kernels.info
	$(PY) -m pytest -q $(PYTEST_ARGS) tests examples/tests; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

bench: setup
	$(PY) -m benchmarks.run

info: setup
	$(PY) -m minc_kernels.info

clean:
	rm -rf $(VENV) build *.egg-info minc_kernels/*.so
