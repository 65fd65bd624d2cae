# Two commands from a fresh clone (Python 3.11, no GPU needed):
#   make repro   set up .venv and run the whole DVC pipeline (dvc repro)
#   make test    set up .venv and run every test
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export DVC_NO_ANALYTICS := 1
export PATH := $(BIN):$(PATH)

.PHONY: setup repro test

setup: $(VENV)/.installed

# Reinstalls only when pyproject.toml changes. torch/torchvision are pinned exactly (see pyproject).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

repro: setup
	dvc repro

test: setup
	python -m pytest
