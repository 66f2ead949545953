# framelabel: `make demo` runs the main job, `make test` runs the whole suite.
# Both create .venv and install what they need on a fresh machine.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
CHECKED := pipeline services tests tools

.PHONY: demo test lint proto system-deps clean

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

system-deps:
	tools/install_system_deps.sh

demo: $(INSTALLED)
	$(BIN)/python tools/demo.py

lint: $(INSTALLED)
	$(BIN)/ruff check $(CHECKED)
	$(BIN)/ruff format --check $(CHECKED)
	$(BIN)/mypy

test: $(INSTALLED) system-deps lint
	$(BIN)/python tools/gen_proto.py --check
	$(BIN)/pytest

proto: $(INSTALLED)
	$(BIN)/python tools/gen_proto.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
