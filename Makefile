# One-line entry points (see README): `make train` and `make test` set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 is the newest release this project's machines install (from local disk);
# override on other machines, e.g. `make test TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=

.PHONY: setup train test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev,dali]'
	touch $@

train: setup
	$(VENV)/bin/fastmbv1 train $(ARGS)

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
