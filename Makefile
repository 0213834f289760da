# modelbus: `make run` and `make test` each do the whole set-up on a fresh machine.
PY ?= python3.11
VENV ?= .venv
# GPU users: make install TORCH_SPEC='torch==2.13.0 --index-url <a CUDA wheel index>'
TORCH_SPEC ?= torch==2.13.0
# test processes (pytest-xdist): every test has its own Redis namespace, root and ports
TEST_JOBS ?= 2
BIN := $(VENV)/bin
STAMP := $(VENV)/.modelbus-installed

.PHONY: install run test bench lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	# setuptools warns once per data folder (services/configs, the page's static files) that it ships as
	# package data; tests/test_packaging.py checks the wheel holds them, so the wall of warnings is muted
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/modelbus up

test: install
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) tests --ignore=tests/bench

bench: install
	$(BIN)/python tests/bench/run_all.py

lint: install
	$(BIN)/ruff check events services workers tests
	# by their installed names (modelbus.*: .typecheck/modelbus links the top folders; pyproject's mypy_path)
	$(BIN)/mypy -p modelbus.events -p modelbus.services -p modelbus.workers
	$(BIN)/mypy --strict -p modelbus.events

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
