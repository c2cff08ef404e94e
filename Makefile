# Each target works on a fresh clone: it creates .venv and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint typecheck docs pytest bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m subcog_crdt.demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# Tests may leave functions unannotated and narrow unions by asserting on values.
TEST_MYPY_FLAGS := --allow-untyped-defs --allow-incomplete-defs --no-warn-unused-ignores \
	--disable-error-code union-attr --disable-error-code attr-defined \
	--disable-error-code var-annotated --disable-error-code index --disable-error-code arg-type

typecheck: $(STAMP)
	$(BIN)/mypy
	$(BIN)/mypy $(TEST_MYPY_FLAGS) tests

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir .site

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck docs pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_core.py

clean:
	rm -rf $(VENV) .site .mypy_cache .ruff_cache
