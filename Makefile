# One command each for a fresh machine: `make demo` and `make test` set everything up first.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

# torch first, pinned to the CPU wheel this machine carries: a bare `torch` requirement would
# pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(PY) -m dalle_together.demo --out $(DEMO_DIR)

# pytest exits 5 when it collected nothing: a broken suite, so fail loudly instead of passing.
test: setup
	$(PY) -m ruff check dalle_together tests benchmarks
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest -q -m "not system"

lint: setup
	$(PY) -m ruff check dalle_together tests benchmarks
	$(PY) -m ruff format --check dalle_together tests benchmarks

# quick settings; `make bench FULL=1` for the settings of the tables in BENCHMARKS.md
bench: setup
	$(PY) -m benchmarks.run $(if $(FULL),--full,)

clean:
	rm -rf $(VENV) runs .pytest_cache
