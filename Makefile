# Two commands matter on a fresh clone: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# Commands that are not the project's own modules get the project's environment from this.
WITH_ENV := $(BIN)/python -m pipeline_steps.runtime_env --
# ... and commands that run flows get one Prefect API for all of them (started and stopped
# around the command unless PREFECT_API_URL already names a running server).
WITH_PREFECT := $(BIN)/python -m flows.prefect_server --
PORT ?= 3000
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000

# dvc.yaml stages call `python -m flows...`: make that the project's interpreter.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export VIRTUAL_ENV := $(CURDIR)/$(VENV)

# Everything keeps its state inside the project. The offline switches, Prefect's settings and
# BentoML's store (BENTOML_HOME=bentoml_home) are applied by the Python entry points themselves,
# before Prefect/MLflow/BentoML are imported (pipeline_steps/runtime_env.py), so `dvc repro` or a
# flow run by hand gets them too; WITH_ENV gives them to the other programs (bentoml serve, ...).
export DVC_NO_ANALYTICS := 1
# Stages to run (default: all); e.g. `make demo TARGETS=clean` stops after the clean stage.
TARGETS ?=
# Extra `dvc repro` flags, e.g. `make repro REPRO_FLAGS=--force` runs every stage again.
REPRO_FLAGS ?=

.PHONY: install demo repro sample pipeline test test-fast test-integration browser-deps prefect-server prefect-deploy mlflow-ui serve build metrics bench clean-outputs

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e ".[cpu,dev,team]"
	touch $@

## The demo: generate the sample export, version it with DVC, run every stage against
## one Prefect server (started for the run and stopped after it, unless PREFECT_API_URL
## already names one): the stage runs show in its UI.
demo: install
	$(WITH_PREFECT) $(MAKE) --no-print-directory sample repro
	$(BIN)/dvc metrics show

## `dvc repro` with one Prefect API for every stage (flows/prefect_server.py). When
## `dvc status` finds nothing to do, no server is started (a few seconds instead of ~20).
## With a Prefect API already up (inside `make demo`, or PREFECT_API_URL naming a team
## server) there is no start to save: dvc repro runs at once, skipping unchanged stages
## itself, instead of paying for a `dvc status` first (1.2-2.6 s on 2 cores).
repro: install
	@if [ -z "$$PREFECT_API_URL" ] && $(BIN)/dvc status -q $(TARGETS); then \
		echo "dvc status: data and pipelines are up to date; nothing to run"; \
	else \
		$(WITH_PREFECT) $(BIN)/dvc repro $(REPRO_FLAGS) $(TARGETS); \
	fi

## Generate the deterministic sample into data/raw and record it with DVC.
sample: install
	$(BIN)/python -m flows.generate_sample
	$(BIN)/dvc add data/raw

## The whole pipeline as one Prefect flow run (same code as `dvc repro`).
pipeline: install
	$(WITH_PREFECT) $(BIN)/python -m flows.pipeline

test: install browser-deps
	$(BIN)/pytest

## The tiers are pytest markers (docs/ARCHITECTURE.md, "Tests in tiers"): unit = no marker.
test-fast: install
	$(BIN)/pytest -m "not integration and not browser and not realdata and not slow"

test-integration: install
	$(BIN)/pytest -m "integration and not browser and not realdata"

## Debian's chromium for the search-page test (never a downloaded browser build).
browser-deps:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

## Prefect UI on http://127.0.0.1:$(PREFECT_PORT); then `make prefect-deploy` in another shell.
prefect-server: install
	PREFECT_UI_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(WITH_ENV) $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

## Serve the pipeline as a deployment so it can be triggered from the Prefect UI.
prefect-deploy: install
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/python -m flows.deploy

mlflow-ui: install
	$(WITH_ENV) $(BIN)/mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///mlruns/mlflow.db}" --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

## Serve the promoted models and index (the Bento built by `make demo`).
serve: install
	$(WITH_ENV) $(BIN)/bentoml serve "$$($(BIN)/python -c 'from pipeline_steps.config import load_params; print(load_params()["serve"]["bento_name"])'):latest" --host 127.0.0.1 --port $(PORT)

metrics: install
	$(BIN)/dvc metrics show

bench: install
	$(BIN)/python benchmarks/faiss_benchmark.py

## ---- Team set-up (README "Team set-up"): shared servers, workers, a DVC remote ----
.PHONY: services services-down services-env worker deployments push pull
## PostgreSQL + MLflow server (PostgreSQL backend, proxied artifacts) + Prefect server on PostgreSQL,
## in the background (params.yaml: team); then `source .team/env` points the pipeline at them.
services: install
	$(BIN)/python -m pipeline_steps.team_servers up

services-down: install
	$(BIN)/python -m pipeline_steps.team_servers down

services-env: install
	@$(BIN)/python -m pipeline_steps.team_servers env

## A process worker of the work pool (team.work_pool) against the team Prefect server.
worker: install
	source "$$($(BIN)/python -c 'from pipeline_steps.config import load_params; print(load_params()["team"]["dir"])')/env" && \
	$(WITH_ENV) $(BIN)/python -m flows.deployments worker

## The work pool and the deployments (whole pipeline + each stage) on the team Prefect server.
deployments: install
	source "$$($(BIN)/python -c 'from pipeline_steps.config import load_params; print(load_params()["team"]["dir"])')/env" && \
	$(BIN)/python -m flows.deployments deploy

## DVC remote (`dvc remote default`; .dvc/config names it): push/pull data and pipeline outputs.
DVC_REMOTE ?=
push: install
	$(BIN)/dvc push $(if $(DVC_REMOTE),-r $(DVC_REMOTE),)

pull: install
	$(BIN)/dvc pull $(if $(DVC_REMOTE),-r $(DVC_REMOTE),)
