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
	$(BIN)/pip install -q -e ".[test]"

demo: setup
	$(BIN)/fastrl demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m pytest bench --benchmark-enable -o python_files='bench_*.py' -q

clean:
	rm -rf $(VENV) build *.egg-info fastrl/_C*.so
