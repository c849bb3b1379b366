# gyrodrop developer commands. `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q -c constraints.txt

.PHONY: demo test bench install install-dev clean lint format docs docs-serve examples dist mutants

$(PY):
	$(PYTHON) -m venv $(VENV)

# Install with the pinned CPU torch first, so no extra ever pulls another torch.
install: $(PY)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[experiments]"

install-dev: $(PY)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev,experiments,lightning,transformers,triton]"

# The experiment CLI on scikit-learn's digits: 3 methods x 3 seeds, a table and plots
# (results/demo/), well under 2 minutes on 2 cores; a second run reuses results/demo.db.
demo: install
	$(PY) -m gyrodrop compare --dataset digits --methods none,dropout,gyro --seeds 3 --epochs 20 --threads 1 \
		--db results/demo.db --out results/demo

test: install-dev
	$(PY) -m pytest

bench: install-dev
	$(PY) benchmarks/bench_gyro.py
	$(PY) benchmarks/bench_blockwise.py
	$(PY) benchmarks/bench_stochastic_depth.py
	$(PY) benchmarks/bench_compile.py

# Mutation testing of the core modules with their fast unit tests ([tool.mutmut] in
# pyproject.toml; report and surviving mutants: docs/testing.md). Not part of CI: run it
# before a release and after changing a core module. Resumable (results in mutants/).
# Select modules by mutant-name glob: make mutants MUTANTS="gyrodrop.masks.* gyrodrop.schedule.*"
MUTANTS ?=
JOBS    ?= 2
mutants: install-dev
	$(VENV)/bin/mutmut run --max-children $(JOBS) $(MUTANTS)
	$(VENV)/bin/mutmut export-cicd-stats
	$(VENV)/bin/mutmut results

# Lint, format check and static types (what CI enforces). `make format` rewrites.
LINT_PATHS := src tests benchmarks examples docs .ci conftest.py
lint: install-dev
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

format: install-dev
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)

# Documentation site (mkdocs-material + mkdocstrings); warnings are errors.
docs: install-dev
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

docs-serve: install-dev
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

# Every example with --quick (seconds each); tests/test_examples.py knows how each is
# launched (ddp_train.py under torchrun) and is also part of `make test`.
examples: install-dev
	$(PY) -m pytest tests/test_examples.py -vv -p no:cacheprovider

# Release check: wheel + sdist, twine check, then install the wheel into a clean venv
# that has only the pinned CPU torch, and import it there without any extra.
DIST_VENV := build/dist-venv
dist: install-dev
	rm -rf dist $(DIST_VENV)
	$(PY) -m build --outdir dist .
	$(PY) -m twine check --strict dist/*
	$(PYTHON) -m venv $(DIST_VENV)
	$(DIST_VENV)/bin/python -m pip install -q -c constraints.txt torch==2.13.0
	$(DIST_VENV)/bin/python -m pip install -q -c constraints.txt dist/*.whl
	cd $(DIST_VENV) && bin/python $(CURDIR)/.ci/check_dist.py $(CURDIR)/dist

clean:
	rm -rf $(VENV) build dist site *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
