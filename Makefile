# Two commands matter on a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck imports check bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedhub demo --json demo-out/summary.json --plot demo-out/curves.png

test: $(STAMP) lint typecheck imports
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy shared services fedhub

imports: $(STAMP)
	$(BIN)/lint-imports

check: test

# Flower (bench/aggregate.py's comparison) pins older fastapi/rich/typer than ours: its own venv.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

$(BENCH_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python bench/upload_memory.py --mb 500
	$(BIN)/python bench/e2e.py --json bench-e2e.json
	$(BENCH_VENV)/bin/python bench/aggregate.py --json bench-aggregate.json --pods 1,2,4

clean:
	rm -rf $(VENV) $(BENCH_VENV) demo-out .pytest_cache .mypy_cache .ruff_cache
