# Two entry points for a fresh clone: `make demo` and `make test`.
# Both create (or reuse) a local virtual environment in .venv and install the project into it.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.wsi-cmaf-installed

.PHONY: demo test lint install bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/wsi-cmaf demo

# ruff and mypy read their settings from pyproject.toml ([tool.ruff], [tool.mypy])
lint: $(STAMP)
	$(BIN)/ruff check wsi_cmaf tests benchmarks examples
	$(BIN)/mypy

# Two processes, each running whole test files (the SLURM, cluster and store tests of one file never
# interleave): the suite takes about half as long on 2 cores. `pytest tests/x.py` alone runs serially.
test: lint
	$(BIN)/python -m pytest -n 2 --dist loadfile

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_tiling.py
	$(BIN)/python benchmarks/bench_pipeline.py

clean:
	rm -rf $(VENV) wsi_cmaf_demo .pytest_cache
