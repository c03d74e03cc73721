# Two entry points (README): `make run` (main job) and `make test` (whole suite).
# Both create the project-local environment .venv/ first; everything is installed from
# the package registry by pinned version, so a fresh machine needs nothing by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.14.1 is the CUDA 13.0 build: it runs on the CPU and lets nvcc compile the
# CUDA kernels even on a machine without a GPU.
REQUIREMENTS := torch==2.14.1 triton==3.8.0 numpy==2.4.6 pytest==9.2.0 hypothesis==6.170.17 \
	ninja==1.13.2 ruff==0.17.6 "setuptools>=64" wheel \
	mlxtend==0.25.0 lion-pytorch==0.2.5 prodigyopt==1.1.2 schedulefree==1.4.1 tqdm==4.70.1 \
	matplotlib==3.11.2 scikit-learn==1.9.1 \
	transformers==5.24.0 pytorch-lightning==2.6.6 accelerate==1.15.0
# nvcc lives here on our machines; torch would otherwise guess /usr/local and fail to link.
export CUDA_HOME ?= /usr/local/cuda

.PHONY: env build test run lint bench clean

$(VENV)/.installed: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(REQUIREMENTS)
	touch $@

env: $(VENV)/.installed build

# Builds elra_fused/_C in place (C++ always; CUDA when nvcc is found, unless
# ELRA_SKIP_CUDA_BUILD=1). ninja makes rebuilds incremental.
build: $(VENV)/.installed
	$(PY) setup.py build_ext --inplace

test: env
	$(PY) -c "import elra_fused.ops as o; print('extension:', o.cpp_extension_status())"
	$(PY) -m pytest -q python_tests

# The main job: ELRA vs Adam, Lion and SGD on MNIST-5k (python -m elra_fused, ~1 min),
# then the paper's 2-D problems, then the language-model job (python -m elra_fused lm:
# ELRA vs AdamW, Prodigy and schedule-free AdamW at equal tokens on a byte-level Llama,
# ~3 min).
run: env
	$(PY) -m elra_fused
	$(PY) benchmarks/paper_2d.py --json benchmarks/results/paper_2d.json
	$(PY) -m elra_fused lm

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check elra_fused python_tests benchmarks setup.py

clean:
	rm -rf build elra_fused/*.so
