# One command each for a new user: `make demo` runs the pipeline on the shipped data and model,
# `make test` runs the tests. Both install first (into .venv) when needed.
PYTHON ?= python3
VENV ?= .venv
# A CPU build from local disk here; GPU users override, e.g. make install TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
PIP := $(VENV)/bin/python -m pip
STAMP := $(VENV)/.dpo-installed
PYTEST_ARGS ?=
# Most tests drive one single-threaded `dpo` process at a time, so a 2-core CI machine runs the suite
# about twice as fast with two workers; whole files per worker, so module fixtures are built once.
PYTEST_WORKERS ?= 2
DEMO_DIR ?= runs/demo

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_SPEC)
	$(PIP) install --quiet -e '.[test]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/dpo run --config examples/demo.yaml

test: install
	$(VENV)/bin/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: install
	$(VENV)/bin/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile -m 'not slow' $(PYTEST_ARGS)

# TRL is a benchmark-only extra; torch is pinned to the build already installed so pip never swaps it.
BENCH_STAMP := $(VENV)/.dpo-bench-installed
BENCH_ARGS ?=

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PIP) install --quiet -e '.[bench]' "torch==$$($(VENV)/bin/python -c 'import torch; print(torch.__version__)')"
	touch $(BENCH_STAMP)

# dpo vs TRL side by side (bench/vs_trl.py; writes bench/RESULTS.md). Quick smoke run: make bench BENCH_ARGS=--quick
bench: $(BENCH_STAMP)
	$(VENV)/bin/python bench/vs_trl.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
