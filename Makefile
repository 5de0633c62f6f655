# Two commands set up a fresh machine: `make demo` and `make test`.
# Both create .venv and install requirements on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Where no GPU is found, pin torch to the CPU build (a bare `torch` would pull the multi-GB CUDA build).
TORCH_PIN ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,torch==2.13.0)
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: venv demo test lint bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt $(TORCH_PIN)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m tinyflux.demo --output $(DEMO_DIR)

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench: venv
	$(PY) bench/bench_step.py

clean:
	rm -rf runs .pytest_cache
