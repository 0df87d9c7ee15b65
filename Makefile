# The two commands of the README: `make demo` and `make test`. Both set up what they need first
# (Java, the virtual environment with the locked dependencies, the real sample data); a second
# run finds everything in place and starts in seconds.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.moonpipe-deps
RAW := data/raw
PYTEST_ARGS ?=

.PHONY: help setup java sample-data demo test bench docs clean

help:
	@echo "make demo      set up, then run the main job on the embedded default"
	@echo "make test      set up, then run the test suite (2 cores, ~15 min budget)"
	@echo "make setup     only set up: Java 17, .venv with the locked dependencies, sample data"
	@echo "make bench     set up, then run the benchmarks (CPU; see README for GPU)"
	@echo "make docs      regenerate docs/tables.md from schemas/"

setup: java $(DEPS_STAMP) sample-data

java:
	@command -v java >/dev/null 2>&1 || infra/setup/install_java.sh

$(DEPS_STAMP): requirements.lock constraints.txt pyproject.toml infra/setup/install_python_deps.sh
	infra/setup/install_python_deps.sh $(VENV)
	@touch $@

sample-data: $(RAW)/fashion-mnist/.ready $(RAW)/vendure/.ready

$(RAW)/fashion-mnist/.ready $(RAW)/vendure/.ready &: infra/setup/fetch_sample_data.sh
	infra/setup/fetch_sample_data.sh $(RAW)

demo: setup
	$(VENV)/bin/moonpipe demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/moonpipe bench moon3 --presets tiny,small --products 128 --reasoning-products 32
	$(VENV)/bin/moonpipe bench pipeline
	infra/setup/autofaiss_env.sh && $(VENV)/bin/python -m benchmarks.vector_index
	$(VENV)/bin/moonpipe creatives bench all

docs: $(DEPS_STAMP)
	$(VENV)/bin/moonpipe schemas --markdown > docs/tables.md

clean:
	rm -rf var .pytest_cache
