# Two commands matter: `make demo` (the main job) and `make test` (the whole suite, as CI runs it).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llmdiff-installed

.PHONY: test lint install clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[hf,dev]'
	@touch $@

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check src tests examples bench
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
