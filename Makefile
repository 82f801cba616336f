# visrec-pipeline: the two commands a new machine needs are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# resolved when a recipe runs, so a uv installed by `make uv` is found
UV = $$(command -v uv 2>/dev/null || echo "$(HOME)/.local/bin/uv")
export DAGSTER_HOME := $(CURDIR)/dagster_home
export VISREC_DATA_DIR ?= $(CURDIR)/data
export VISREC_DATASET ?= demo
HOST ?= 127.0.0.1
PORT ?= 3000

.PHONY: help uv install demo test ui bench bench-scale clean

help:
	@echo "make demo   set up and materialize the whole pipeline on VISREC_DATASET (default: bundled demo)"
	@echo "make test   set up and run the whole test suite"
	@echo "make ui     open the Dagster UI on http://$(HOST):$(PORT)"
	@echo "make bench  run the benchmarks in bench/ (bench/scale.py apart: make bench-scale)"

uv:
	@command -v uv >/dev/null 2>&1 || test -x "$(HOME)/.local/bin/uv" || python3 -m pip install --user --quiet uv || python3 -m pip install --quiet uv

# --compile-bytecode: where PYTHONDONTWRITEBYTECODE is set (CI boxes, containers) every process would
# otherwise recompile torch, dagster and pandas from source (~7 s per Dagster step process and per test
# subprocess); the first install pays ~20 s. Later targets run with --no-sync, as `uv run` would check
# every file again.
install: uv
	@$(UV) sync --frozen --quiet --compile-bytecode

demo: install
	@$(UV) run --frozen --no-sync python -m visrec_pipeline.cli demo

test: install
	@$(UV) run --frozen --no-sync pytest

ui: install
	@echo "Dagster UI: http://$(HOST):$(PORT)  (DAGSTER_HOME=$(DAGSTER_HOME))"
	@$(UV) run --frozen --no-sync dg dev -h $(HOST) -p $(PORT)

bench: uv
	@$(UV) sync --frozen --quiet --group bench
	@for b in bench/*.py; do [ "$$b" = bench/scale.py ] && continue; echo "== $$b"; $(UV) run --frozen --group bench python $$b || exit 1; done

# every model at 100k / 500k / 1M interactions: hours on 2 cores (SIZES=S for minutes)
bench-scale: install
	@$(UV) run --frozen --no-sync python bench/scale.py --sizes $${SIZES:-S,M,L}

clean:
	rm -rf data dagster_home/storage dagster_home/history dagster_home/logs dagster_home/schedules
