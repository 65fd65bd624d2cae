# Commands from a fresh clone (Python 3.11, no GPU needed):
#   make repro       set up .venv and run the whole DVC pipeline, independent training runs one per core
#   make test        set up .venv and run every test (as root: installs Chromium, PostgreSQL, Slurm first)
#   make bench       re-measure the speed tables (throughput, scaling) on this machine
#   make gpu-check   on a GPU machine: every engine, method and model on the GPU, a report in gpu-check/
# and two to look at the results in a browser:
#   make ui          the MLflow UI on http://127.0.0.1:5000 (runs, per-epoch charts, sweeps)
#   make dashboard   optuna-dashboard on http://127.0.0.1:8080 (the sweeps' studies)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 5000
DASHBOARD_PORT ?= 8080
MLFLOW_STORE ?= sqlite:///$(CURDIR)/mlflow.db
OPTUNA_STORE ?= sqlite:///$(CURDIR)/optuna.db
export DVC_NO_ANALYTICS := 1
export PATH := $(BIN):$(PATH)

.PHONY: setup repro bench test ui dashboard exps gpu-check

setup: $(VENV)/.installed

# Reinstalls only when pyproject.toml changes. torch/torchvision are pinned exactly (see pyproject).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# make cannot change the PATH of the shell that called it: say how to get dvc and mlflow there.
# `dvc repro` with the training matrix on a pool of one worker per core (src/scpl_kit/stage_pool.py);
# the same results as a plain `dvc repro`, which runs one stage at a time.
repro: setup
	python -m scpl_kit.submit repro
	@echo "Tables: reports/tables/; figures: reports/figures/. Runs: make ui."
	@echo "For dvc, mlflow and python -m scpl_kit.* in this shell: source $(VENV)/bin/activate"

# The committed speed tables were measured on another machine (named in each table's header).
bench: setup
	dvc repro --force throughput scaling

# On a machine with a GPU: every engine, method and model a few steps on the GPU, one report (README: Train on GPUs).
gpu-check: setup
	python scripts/gpu_check.py --out gpu-check

# One pytest-xdist worker per core (at most 4): many tests wait on servers, torchrun or Slurm.
test: setup
	@scripts/test-services
	python -m pytest -n auto --maxprocesses 4 --dist loadgroup

# Job execution off and one worker: 2 processes and 0.5 GB instead of 15 and 3 GB (MLflow 3.17).
ui: setup
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server --backend-store-uri $(MLFLOW_STORE) \
		--host $(HOST) --port $(PORT) --workers 1

dashboard: setup
	optuna-dashboard $(OPTUNA_STORE) --host $(HOST) --port $(DASHBOARD_PORT)

# `dvc exp show` lists every dependency's hash too (40 columns); this keeps each row's mean accuracy and the parameters.
exps: setup
	dvc exp show --md --drop '^(bench|conf|data|reports|runs|runs_local|src)(/|$$)|^Created$$|^grids\..*|.*\.(mlflow_run_ids\..*|acc_std|n_runs)'
