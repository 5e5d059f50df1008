# MoBiQuant: `make demo` runs the main job on the default model, `make test` runs the tests.
# Both set everything up first (idempotent; downloads and conversions are cached in $(MOBIQ_CACHE)).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export MOBIQ_CACHE ?= $(HOME)/.cache/mobiquant
MODEL ?= smollm2-135m
PYTEST_ARGS ?=

OPS_SOURCES := $(shell find custom_ops -type f) pyproject.toml

.PHONY: setup deps cross-tools build assets model demo test test-pi wheels llamacpp bench-kv-attention scale-run clean

setup: cross-tools build assets

# Debian packages the tests need: the aarch64 cross compiler and qemu-user for the Raspberry Pi tests
# (tests/test_kernels_native.py), Xvfb for the desktop example's test (tests/test_example_app.py).
SYSTEM_TOOLS := aarch64-linux-gnu-g++:g++-aarch64-linux-gnu qemu-aarch64:qemu-user Xvfb:xvfb
cross-tools:
	@missing="$$(for t in $(SYSTEM_TOOLS); do command -v $${t%%:*} >/dev/null || echo $${t#*:}; done)"; \
	if [ -n "$$missing" ]; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; fi

deps: $(VENV)/.deps
$(VENV)/.deps: requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	@touch $@

build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.deps $(OPS_SOURCES)
	MOBIQ_ORT_INCLUDE_DIR="$$($(BIN)/python tools/fetch.py ort-headers)" \
	  $(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

assets: build
	$(BIN)/python -m mobiquant.tools.corpora
	$(BIN)/python -m mobiquant.exporter.convert $(MODEL)

MODEL_DIR := models/$(MODEL)
CHECKPOINT := $(MODEL_DIR)/checkpoint
DEMO_PROMPT ?= Write three short sentences about the sea.

# Calibrate once (fast recipe, minutes on 2 cores), export once; both cached in $(MODEL_DIR) (git-ignored).
# The threshold tables are refitted (minutes, no recalibration) when the code that fits them changes, and
# the export is redone when the code that writes the file changes (a minute or two).
THRESHOLDS_STAMP := $(CHECKPOINT)/.thresholds-fitted
$(CHECKPOINT)/mobiq-checkpoint.json: | assets
	$(BIN)/mobiq-export quantize $(MODEL) -o $(CHECKPOINT)
	@touch $(THRESHOLDS_STAMP)

$(THRESHOLDS_STAMP): exporter/allocation.py exporter/thresholds.py exporter/token_routing.py exporter/routing_choice.py | $(CHECKPOINT)/mobiq-checkpoint.json
	$(BIN)/mobiq-export thresholds $(CHECKPOINT)
	@touch $@

$(MODEL_DIR)/model.onnx: $(CHECKPOINT)/mobiq-checkpoint.json $(THRESHOLDS_STAMP) $(wildcard exporter/*.py) runtime/format.py runtime/modelfile.py
	$(BIN)/mobiq-export onnx $(CHECKPOINT) -o $(MODEL_DIR)

model: build assets $(MODEL_DIR)/model.onnx

demo: model
	$(BIN)/mobiq-run $(MODEL_DIR) --budget low --stats -p "$(DEMO_PROMPT)"

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The runtime on an emulated Raspberry Pi 4 and 5 (tests/test_pi.py), the default model included.
test-pi: cross-tools model $(MODEL_DIR)-exact/model.onnx
	MOBIQ_PI_MODEL=$(MODEL_DIR) MOBIQ_PI_EXACT_MODEL=$(MODEL_DIR)-exact $(BIN)/python -m pytest tests/test_pi.py $(PYTEST_ARGS)

# The default model with exact (float) activations: the Pi test's bit-for-bit reference.
$(MODEL_DIR)-exact/model.onnx: $(MODEL_DIR)/model.onnx
	$(BIN)/mobiq-export onnx $(CHECKPOINT) -o $(MODEL_DIR)-exact --exact

# dist/: an sdist and py3-none wheels for linux x86_64 and aarch64 (tools/wheels.py says how).
wheels: deps cross-tools
	$(BIN)/python -m mobiquant.tools.wheels --out dist

# Optional: llama.cpp's llama-bench and llama-quantize, the peer to measure beside (tools/llamacpp.py), built
# once (minutes on 2 cores) from the pinned llama-cpp-python sdist into $(MOBIQ_CACHE)/llamacpp; not part of test.
llamacpp: build
	$(BIN)/python -m mobiquant.tools.llamacpp build

# Optional: where a long-context decode step's attention time goes, beside the memory floor (custom_ops/bench/
# kv_decode_step.cc; P positions, KV_BITS 16, 8 or 4; prints JSON; not part of test).
P ?= 4096
KV_BITS ?= 8
KV_KERNELS := custom_ops/src/kernels/attention.cc custom_ops/src/kernels/kv_cache.cc \
  $(if $(filter aarch64,$(shell uname -m)),custom_ops/src/kernels/arm/attention_neon.cc,custom_ops/src/kernels/x86/attention_x86.cc)
build/kv_decode_step: custom_ops/bench/kv_decode_step.cc $(KV_KERNELS) $(wildcard custom_ops/src/kernels/*.inc custom_ops/src/kernels/*.h)
	mkdir -p build && g++ -O3 -std=c++17 -fopenmp -w -Icustom_ops/include -o $@ $< $(KV_KERNELS)
bench-kv-attention: build/kv_decode_step
	build/kv_decode_step $(P) $(KV_BITS)

clean:
	rm -rf build $(VENV)/.built

# A random model with Llama-3.2-1B's shapes through quantize, onnx, mobiq-run and mobiq-bench: wall time and peak
# memory per step (tools/scale_run.py; tens of minutes, ~15 GB of disk in $(MOBIQ_CACHE)/scale; never part of make test).
scale-run: setup
	$(BIN)/python -m mobiquant.tools.scale_run --json docs/results/llama-1b-scale.json
