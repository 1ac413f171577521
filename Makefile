# splitfed: `make demo` runs the local deployment, `make test` runs every check.
SHELL := /bin/bash
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.splitfed-installed
PYTEST_ARGS ?=
CHAOS_ARGS ?= --kills 10

.PHONY: help install demo test test-long lint format typecheck layers linktree protos protos-check test-unit test-integration test-checks bench bench-wan bench-quantization bench-openai images images-test wan-check fuzz chaos clean

help:
	@echo "make demo    - create $(VENV), install, run the local end-to-end demo"
	@echo "make test    - create $(VENV), install, run ruff, mypy, the layer contract, every test tier"
	@echo "make test-unit / test-integration / test-checks - one tier: pure Python / real services / tools"
	@echo "make protos  - regenerate splitfed/v1 stubs from protos/"
	@echo "make bench   - run the benchmarks in bench/"
	@echo "make wan-check - the WAN harness's self-check: each profile's RTT and rate (needs root)"
	@echo "make bench-wan - split steps and generation over the emulated links (needs root)"
	@echo "make bench-quantization - quantized bodies: memory, fidelity, speed (issue 21)"
	@echo "make bench-openai - the OpenAI-compatible endpoint against direct generation (issue 22)"
	@echo "make images  - build the CPU image and the CUDA one on the same base (podman or docker)"
	@echo "make images-test - build, smoke-test the image, run the whole deployment in containers"
	@echo "make test-long - the long checks make test leaves out (bench smoke runs, kills)"
	@echo "make fuzz    - send FUZZ_EXAMPLES (10000) hostile messages to the live services"
	@echo "make chaos   - federated runs with services killed (SIGKILL) until >= 10 kills"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, from TORCH_SPEC (the local CPU wheel by default), then the project.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/splitfed demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

protos: $(STAMP)
	$(BIN)/python protos/generate.py

protos-check: $(STAMP)
	$(BIN)/python protos/generate.py --check
	cd protos && ../$(BIN)/buf lint

# mypy and import-linter cannot follow setuptools' editable-install import hook, so they
# analyse the package through a tree of links that mirrors the installed layout
# (package-dir in pyproject.toml).
linktree: $(STAMP)
	rm -rf build/typecheck && mkdir -p build/typecheck/splitfed
	for entry in splitfed/*; do ln -s "$$PWD/$$entry" build/typecheck/splitfed/; done
	for part in services clients security models; do \
		ln -s "$$PWD/$$part" "build/typecheck/splitfed/$$part"; done

typecheck: linktree
	$(BIN)/mypy -p splitfed

# The layers (.importlinter): cli > privacy > clients | services > protocol > security | models >
# core > v1. tests/checks/test_layers.py also shows that a forbidden import breaks it.
layers: linktree
	cd build/typecheck && ../../$(BIN)/lint-imports ../../.importlinter --no-cache

# Three tiers: tests/unit (pure Python, no subprocess or network: a fixture refuses them),
# tests/integration (real services over mTLS, subprocesses; tests/fuzz's bounded sample)
# and tests/checks (stub drift and buf lint, deployment files, observability tools, docs,
# layers). `long` checks (bench smoke runs, a kill test the chaos sample covers) stay out
# of the 10-minute budget of make test; make test-long runs them.
TIERS := tests/unit tests/integration tests/fuzz tests/checks

test-unit: $(STAMP)
	$(BIN)/pytest tests/unit -m "not long" $(PYTEST_ARGS)

test-integration: $(STAMP)
	$(BIN)/pytest tests/integration tests/fuzz -m "not long" $(PYTEST_ARGS)

test-checks: $(STAMP)
	$(BIN)/pytest tests/checks -m "not long" $(PYTEST_ARGS)

test-long: $(STAMP)
	$(BIN)/pytest $(TIERS) -m long $(PYTEST_ARGS)

# All three tiers in one pytest run (one start-up, one session PKI).
test: lint typecheck layers
	$(BIN)/pytest $(TIERS) -m "not long" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/transport.py
	$(BIN)/python bench/split_overhead.py
	$(BIN)/python bench/split_step.py

# The WAN harness (bench/wanlink.py, docs/benchmarks.md "Emulating a WAN"): network
# namespaces, tbf and a delay proxy; needs root. Prints each profile's measured RTT and
# throughput and fails if one is more than 10 % off its setting.
WAN_ARGS ?=

wan-check: $(STAMP)
	$(BIN)/python bench/wanlink.py check $(WAN_ARGS)

# Split training and generation over the four emulated links (bench/wan.py, ~7 min on
# 2 cores; needs root): the ratios against `lan`, docs/benchmarks.md "Over emulated
# internet links".
bench-wan: $(STAMP)
	$(BIN)/python bench/wan.py $(WAN_ARGS)

# Quantized bodies (bench/quantization.py, a few minutes on 2 cores; ~4 GB of disk and
# ~5 GB of memory for the Llama-2-7B-shaped body): memory, fidelity and speed of int8 and
# nf4 against full precision, docs/benchmarks.md "Quantized bodies".
QUANT_ARGS ?=

bench-quantization: $(STAMP)
	$(BIN)/python bench/quantization.py $(QUANT_ARGS)

bench-openai: $(STAMP)
	$(BIN)/python bench/openai.py

# Container images (docker/images.py, docs/deploy.md "Building and testing the images"):
# podman where it runs, else docker; the host's needs (podman's runtime and limits, a base
# image without a registry, pip's CA and wheels behind a proxy) detected. Only the host's
# Python is needed.
images:
	$(PYTHON) docker/images.py build --cuda

images-test: images
	$(PYTHON) docker/images.py test
	$(PYTHON) docker/images.py deploy

# Hostile messages over mTLS to live services (tests/fuzz): `make test` sends a bounded
# sample; this sends FUZZ_EXAMPLES cases, prints the count and every failure, and fails
# if there is one (known bugs included).
FUZZ_EXAMPLES ?= 10000

fuzz: $(STAMP)
	SPLITFED_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest tests/fuzz -q $(PYTEST_ARGS)

# Federated runs (3 clients x 3 rounds, real processes) with the backbone, the aggregator
# and the key manager killed at seeded random moments; a bounded sample runs in make test
# (tests/integration/test_chaos.py). Long: run it as `nice make chaos`.
chaos: $(STAMP)
	$(BIN)/python tests/chaos/run.py $(CHAOS_ARGS)

clean:
	rm -rf build .mypy_cache .pytest_cache .ruff_cache .hypothesis
