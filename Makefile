# Two commands, both self-contained on a fresh clone (README "Quick start"):
#   make demo   set up .venv and run the main job (the shipped trained model: cached vs uncached images and numbers)
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test bench sd15 gpu-dryrun

# torch==2.13.0 is a CPU build on local disk here; asking for it first keeps pip from pulling a
# multi-GB CUDA build when it resolves diffusers/DeepCache (both depend on an unpinned torch).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0" -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m fxcache demo

test: $(VENV)/.installed
	$(PY) -m pytest -q fxcache tests

sd15: $(VENV)/.installed
	$(PY) -m fxcache sd15

bench: $(VENV)/.installed
	$(PY) -m benchmarks.core

# The GPU check end to end on CPU, in a venv made like the GPU machine (see benchmarks/gpu_dryrun.sh).
gpu-dryrun:
	bash benchmarks/gpu_dryrun.sh
