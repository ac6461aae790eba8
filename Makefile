# Two commands on a fresh machine: `make demo` (environment + the default run) and `make test`.
# torch is installed first, pinned to the CPU wheel, so pip never pulls a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet $(TORCH)
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	WANDB_MODE=$${WANDB_MODE:-offline} $(VENV)/bin/distill train

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	WANDB_MODE=offline $(VENV)/bin/pytest -p no:cacheprovider --timeout=900

bench: setup
	$(PY) scripts/benchmark.py

clean:
	rm -rf $(VENV) runs build *.egg-info
