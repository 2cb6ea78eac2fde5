# Two commands do all the set-up on a fresh machine (Python >= 3.10 with venv):
#   make demo   - venv + install, then real nnU-Net on the CPU under the supervisor (synthetic data)
#   make test   - venv + install, then the whole test suite (unit, fake trainer, real nnU-Net e2e)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-fast bench gpu-check docs clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/cardiacseg-train demo

# Two workers (pytest-xdist), each test file on one of them: most tests wait on real processes, so two
# files at a time take about half the time on 2 cores (measured: docs/development.md). The slowest 15 are listed.
PYTEST_WORKERS ?= 2
test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -ra -n $(PYTEST_WORKERS) --dist loadfile --durations=15

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -ra -n $(PYTEST_WORKERS) --dist loadfile -m "not e2e"

bench: $(BIN)/.installed
	$(BIN)/python bench/run.py

docs: $(BIN)/.installed
	$(BIN)/python -m supervisor.commands.docs

gpu-check: $(BIN)/.installed
	$(BIN)/python -m pytest -q -ra tests/gpu

clean:
	rm -rf demo-run .pytest_cache
