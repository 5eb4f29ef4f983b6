# Entry points for a fresh machine: `make demo` / `make test` build .venv, install attndenoise with the CPU torch wheel,
# then run the demo / the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/attndenoise demo

test: install
	$(BIN)/python -m pytest -n 2 tests

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy src

bench: install
	$(BIN)/python bench/bench_step.py

clean:
	rm -rf $(VENV)
