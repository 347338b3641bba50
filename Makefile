# The two commands the README promises; both set up from scratch when needed.
VENV ?= .venv
KVHEAD := $(VENV)/bin/kvhead
PYTEST_ARGS ?=

.PHONY: setup run test lint

setup:
	bash scripts/setup.sh

run: setup
	$(KVHEAD) serve

test: setup lint
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
