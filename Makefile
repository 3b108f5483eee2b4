# Two commands a newcomer needs (see README): `make report` and `make test`.
# Both create .venv on first use: torch first (the local CPU wheel), then circuitlib with its dev tools.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= report
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: report test install benchmarks clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

report: install
	$(PY) -m circuitlib report --model toy --out $(OUT)

test: install
	$(PY) -m pytest

benchmarks: install
	$(PY) benchmarks/bench_scoring.py
	$(PY) benchmarks/bench_patching.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
