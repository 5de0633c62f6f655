# Two commands set up a fresh machine: `make demo` and `make test`.
# Both create .venv and install requirements on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Where no GPU is found, pin torch to the CPU build (a bare `torch` would pull the multi-GB CUDA build).
TORCH_PIN ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,torch==2.13.0)
DEMO_DIR ?= runs/demo
# Two pytest-xdist workers, one test file each at a time (module fixtures such as the SLURM cluster stay in one).
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?=

.PHONY: venv demo app test lint bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt $(TORCH_PIN)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m tinyflux.demo --output $(DEMO_DIR)

# The Gradio page (app.py) on the demo's newest checkpoint and tiny zoo; runs `make demo` first when there is none.
app: venv
	ls -d $(DEMO_DIR)/checkpoints/step_* >/dev/null 2>&1 || $(MAKE) demo
	$(PY) app.py --model $$(ls -d $(DEMO_DIR)/checkpoints/step_* | tail -1) --zoo $(DEMO_DIR)/zoo

test: venv
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench: venv
	$(PY) bench/bench_step.py

clean:
	rm -rf runs .pytest_cache
