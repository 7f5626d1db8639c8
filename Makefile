# Two commands from a fresh clone:  make train   and   make test
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
NPROCS ?= 2
# the real datasets: $XD_DATA_DIR, else ../shared/data beside the clone, else ./data
export XD_DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),./data)

.PHONY: setup train lint test clean
setup: $(VENV)/.installed

# torch goes first and pinned: an unpinned torch pulls gigabytes of CUDA packages.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

train: setup
	$(PY) train.py --model gcn --strategy mpi --nprocs $(NPROCS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
