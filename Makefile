# vaepipe: two set-up commands work on a fresh machine with Python 3.11:
#   make run    create .venv, install, run the whole pipeline on the default corpus
#   make test   create .venv if needed, install, run the test suite
# `make install` installs vaepipe with every extra ([all]: tracking, orchestration, services, ray,
# plots, docs, dev); `pip install vaepipe` alone gives the core (torch, numpy, pyarrow, tokenizers,
# pyyaml), enough to run every stage by hand without MLflow, Prefect or DVC.
#
# torch is pinned to a CPU build by default (a wheel on disk on the project's machines; a loose
# spec downloads a several-GB CUDA build). On a GPU machine: make run TORCH='torch==2.13.0'
# with your CUDA index, or TORCH=torch to take whatever your pip resolves.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PARAMS ?= params.yaml
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# offline-friendly defaults for the tools the pipeline drives
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export MLFLOW_ENABLE_TELEMETRY ?= false
export DVC_NO_ANALYTICS ?= 1
export PYTHONUNBUFFERED ?= 1

.PHONY: install run stages test test-fast lint-imports docs serve push pull clean
.PHONY: services-up services-down services-status

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" -e '.[all]'
	touch $@

# The whole pipeline through the Prefect flow, DVC underneath (dvc repro per stage), then
# `dvc push` to the default remote; ends with a summary (stage times, headline metrics, where the
# outputs are, the MLflow run), also written to reports/run_summary.md (not a DVC output).
# Extra flow options: make run RUN_ARGS='--no-push --set k=v'
run: install
	$(BIN)/python -m flows.pipeline --params $(PARAMS) $(RUN_ARGS)

# The same stages by hand, without Prefect or DVC.
stages: install
	$(BIN)/vaepipe ingest --params $(PARAMS)
	$(BIN)/vaepipe tokenize --params $(PARAMS)
	$(BIN)/vaepipe train --params $(PARAMS) --set model.kind=lm
	$(BIN)/vaepipe train --params $(PARAMS)
	$(BIN)/vaepipe evaluate --params $(PARAMS)
	$(BIN)/vaepipe embed --params $(PARAMS)

test: install
	$(BIN)/python -m pytest -q

# the quick loop while developing: everything but the slow end-to-end and services tests
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not services"

# the import contracts between vaepipe's layers (pyproject.toml [tool.importlinter]); also in make test
lint-imports: install
	$(BIN)/lint-imports

# the documentation site (docs/, mkdocs.yml) into site/; --strict fails on a broken link or page
docs: install
	cd $(ROOT) && $(BIN)/mkdocs build --strict -d site

# the scheduled deployment, served by this process (docs/orchestration.md)
serve: install
	$(BIN)/python -m flows.deploy serve $(if $(CRON),--cron '$(CRON)') $(if $(TIMEZONE),--timezone '$(TIMEZONE)')

# DVC's outputs to/from a remote: the default `local` (a folder), or REMOTE=shared, the bucket of
# the team stack's object store (endpoint and keys from `source infra/local.env`; docs/team.md)
push: install
	$(BIN)/dvc push --run-cache $(if $(REMOTE),-r $(REMOTE))

pull: install
	$(BIN)/dvc pull --run-cache $(if $(REMOTE),-r $(REMOTE))

# shared servers for a team (infra/services.py; docs/team.md): an S3 object store (SeaweedFS, or
# yours: VAEPIPE_S3_ENDPOINT), PostgreSQL, MLflow server, Prefect server + process worker.
# Configured by VAEPIPE_* environment variables.
SERVICES_PY = $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m infra.services

services-up: install
	$(SERVICES_PY) up

services-down:
	$(SERVICES_PY) down

services-status:
	$(SERVICES_PY) status

# pipeline outputs of this checkout (paths anchored at the Makefile's folder, so `make -f` from
# elsewhere never removes another directory's data)
ROOT := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
clean:
	rm -rf $(addprefix $(ROOT)/,data models reports mlflow.db mlartifacts .pytest_cache)
