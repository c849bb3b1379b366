# gyrodrop developer commands. `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q -c constraints.txt

.PHONY: demo test bench install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Install with the pinned CPU torch first, so no extra ever pulls another torch.
install: $(PY)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[experiments]"

install-dev: $(PY)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev,experiments]"

demo: install
	$(PY) examples/digits_demo.py

test: install-dev
	$(PY) -m pytest

bench: install-dev
	$(PY) benchmarks/bench_gyro.py

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .pytest_cache
