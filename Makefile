# Two commands matter: `make run` and `make test`. Everything else supports them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run install test test-fast lint format services clean screenshots

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev,cloudwatch]'
	@touch $@ $(VENV)/.installed

## Start the server with the embedded defaults on http://127.0.0.1:8080; events go to
## $DATA_DIR/events.jsonl (DATA_DIR: ./data unless set) unless FILE_EVENT_LOG names another file
run: $(VENV)/.installed
	FILE_EVENT_LOG="$${FILE_EVENT_LOG:-$${DATA_DIR:-./data}/events.jsonl}" $(BIN)/llm-proxy server

## Create .venv and install llm-proxy into it (what `make run` does before starting)
install: $(VENV)/.installed

## Install what the tests need (Python packages, redis-server, chromium) and run them all
test: $(VENV)/.installed-dev services
	$(BIN)/pytest --cov --cov-report=term-missing:skip-covered

## Run only the tests that start no process (no server, Redis, browser or node), without coverage
test-fast: $(VENV)/.installed-dev
	$(BIN)/pytest -m "not process and not slow" --no-cov -q

services:
	@bash scripts/ensure-services.sh

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(VENV)/.installed-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .coverage htmlcov .pytest_cache .mypy_cache .ruff_cache

## Refresh the admin-page screenshots in docs/screenshots (needs chromium, like make test)
screenshots: $(VENV)/.installed-dev services
	UPDATE_SCREENSHOTS=1 $(BIN)/pytest --no-cov -q tests/admin_ui/test_browser.py
