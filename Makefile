# MoBiQuant: `make demo` runs the main job on the default model, `make test` runs the tests.
# Both set everything up first (idempotent; downloads and conversions are cached in $(MOBIQ_CACHE)).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export MOBIQ_CACHE ?= $(HOME)/.cache/mobiquant
MODEL ?= smollm2-135m
PYTEST_ARGS ?=

OPS_SOURCES := $(shell find custom_ops -type f) pyproject.toml

.PHONY: setup deps build assets demo test clean

setup: build assets

deps: $(VENV)/.deps
$(VENV)/.deps: requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	@touch $@

build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.deps $(OPS_SOURCES)
	MOBIQ_ORT_INCLUDE_DIR="$$($(BIN)/python runtime/fetch.py ort-headers)" \
	  $(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

assets: build
	$(BIN)/python -m mobiquant.runtime.corpora
	$(BIN)/python -m mobiquant.exporter.convert $(MODEL)

demo: setup
	$(BIN)/mobiq-bench layer $(MODEL)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf build $(VENV)/.built
