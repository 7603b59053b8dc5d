# Two entry points for a fresh machine:
#   make demo   set up .venv, fetch Fashion-MNIST if possible, train an MLP with hand-written backprop, check gradients
#   make test   set up .venv (and the data when possible), run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: demo test venv data gradcheck gpu-check venv-min test-min clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Fashion-MNIST from Debian's dataset-fashion-mnist package: installed when running as root, otherwise explained.
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST: $(FMNIST_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Fashion-MNIST: installing Debian package dataset-fashion-mnist"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || \
	  echo "warning: could not install dataset-fashion-mnist; tests that need it will be skipped"; \
	else \
	  echo "Fashion-MNIST not found in $(FMNIST_DIR). Get it with 'sudo apt-get install dataset-fashion-mnist'," \
	       "or train with --data-dir DIR / --download."; \
	fi

test: venv data
	$(PY) -m pytest

# The default run (784-512-512-10 MLP, 20 epochs on Fashion-MNIST: about 90% test accuracy in under a minute on two
# CPU cores) with its figures, the gradient check of both layouts, the seed article's worked example.
demo: venv data
	$(PY) -m nnbackprop train --dataset fashion-mnist --out runs/demo --overwrite --plot
	$(PY) -m nnbackprop gradcheck
	$(PY) experiments/seed_worked_example.py

gradcheck: venv
	$(PY) -m nnbackprop gradcheck

# Prove a GPU machine with its own python3 and torch, nothing installed and no network: every CUDA path of nnbackprop
# (CUDA tests, graphs against eager, a host-sync audit, mixed precision, training and resume, NCCL, the step benchmark's
# CUDA rows for the MLP and the CNN, the gradient check), about 5 minutes on one H200; a table, and
# runs/gpu-check/gpu_check.json with each check's output beside it (NAME.log).
GPU_DATA ?= $(FMNIST_DIR)
gpu-check:
	$(PYTHON) -m nnbackprop doctor --data-dir $(GPU_DATA)

# The lowest torch pyproject.toml allows, in an environment of its own: make test-min runs the suite there.
TORCH_MIN := 2.4.1
TORCHVISION_MIN := 0.19.1
VENV_MIN ?= .venv-min
venv-min: $(VENV_MIN)/.installed

$(VENV_MIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip install --quiet "torch==$(TORCH_MIN)" "torchvision==$(TORCHVISION_MIN)" "numpy<2"
	$(VENV_MIN)/bin/python -m pip install --quiet -e '.[dev]'
	touch $@

test-min: venv-min data
	$(VENV_MIN)/bin/python -m pytest

clean:
	rm -rf $(VENV) $(VENV_MIN) .pytest_cache results runs
