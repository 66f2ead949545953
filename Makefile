# framelabel: `make demo` runs the main job, `make test` runs the whole suite.
# Both create .venv and install what they need on a fresh machine.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
CHECKED := pipeline services tests tools bench

.PHONY: demo test lint proto system-deps bench soak fuzz clean

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

# Figures, not tests: prints one table, writes bench/results/latest.json (see docs/performance.md).
bench: $(INSTALLED) system-deps
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# The long versions of the reliability tests, not in `make test`: 60 s of 16 clients on the
# service, then a 10-minute soak of the pipeline (a looping clip and a live camera).
soak: $(INSTALLED) system-deps
	$(BIN)/python tools/load.py --clients 16 --seconds 60
	$(BIN)/python tools/soak.py --minutes 10

# The fuzz tests with FUZZ_SCALE times as many inputs (20: ~106,000), new random ones each run.
FUZZ_SCALE ?= 20
fuzz: $(INSTALLED)
	FUZZ_SCALE=$(FUZZ_SCALE) $(BIN)/pytest tests/test_fuzz.py --timeout 3600

proto: $(INSTALLED)
	$(BIN)/python tools/gen_proto.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
