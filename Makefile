# Two commands on a fresh machine with Python 3.11:
#   make test                 # create .venv if missing, install, run the test suite
#   make reproduce            # create .venv if missing, install, run notebooks 00-06 (PROFILE=cpu)
#   make reproduce PROFILE=smoke SEED=0
PROFILE ?= cpu
SEED ?= 0
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sd_lib-installed

.PHONY: install test reproduce bench clean-build

$(STAMP): pyproject.toml requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: on the project's CPU machines this takes the local CPU build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[notebooks,unsloth-runtime,dev]"
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

reproduce: $(STAMP)
	$(PY) -m sd_lib.reproduce --profile $(PROFILE) --seed $(SEED)

bench: $(STAMP)
	$(PY) bench/bench_loss.py

clean-build:
	rm -rf build
