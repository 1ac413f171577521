# splitfed: `make demo` runs the local deployment, `make test` runs every check.
SHELL := /bin/bash
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.splitfed-installed
PYTEST_ARGS ?=
CHAOS_ARGS ?= --kills 10

.PHONY: help install demo test test-long lint format typecheck protos protos-check test-unit bench fuzz chaos clean

help:
	@echo "make demo    - create $(VENV), install, run the local end-to-end demo"
	@echo "make test    - create $(VENV), install, run ruff, mypy, pytest (incl. stub drift, buf lint)"
	@echo "make protos  - regenerate splitfed/v1 stubs from protos/"
	@echo "make bench   - run the benchmarks in bench/"
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

# mypy cannot follow setuptools' editable-install import hook, so it checks the package
# through a tree of links that mirrors the installed layout (package-dir in pyproject.toml).
typecheck: $(STAMP)
	rm -rf build/typecheck && mkdir -p build/typecheck/splitfed
	for entry in splitfed/*; do ln -s "$$PWD/$$entry" build/typecheck/splitfed/; done
	for part in services clients security models; do \
		ln -s "$$PWD/$$part" "build/typecheck/splitfed/$$part"; done
	$(BIN)/mypy -p splitfed

# `long` checks (bench smoke runs, a kill test the chaos sample covers) stay out of the
# 10-minute budget of make test; make test-long runs them.
test-unit: $(STAMP)
	$(BIN)/pytest tests -m "not long" $(PYTEST_ARGS)

test-long: $(STAMP)
	$(BIN)/pytest tests -m long $(PYTEST_ARGS)

# Stub drift and buf lint run inside pytest (tests/unit/test_project.py).
test: lint typecheck test-unit

bench: $(STAMP)
	$(BIN)/python bench/transport.py
	$(BIN)/python bench/split_overhead.py
	$(BIN)/python bench/split_step.py

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
