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

bench: $(STAMP)
	$(BIN)/python bench/upload_memory.py --mb 500
	$(BIN)/python bench/e2e.py --json bench-e2e.json

clean:
	rm -rf $(VENV) demo-out .pytest_cache .mypy_cache .ruff_cache
