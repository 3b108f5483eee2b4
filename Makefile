# Two commands a newcomer needs (see README): `make report` and `make test`.
# Both create .venv on first use: torch first, then circuitlib with its dev tools.
#
# Installing for a room of laptops (README, "Two commands"):
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
#       laptops without a GPU: torch's CPU build (on Linux, pip's default torch is the multi-GB CUDA one)
#   make wheelhouse [WHEELHOUSE=dir] [TORCH_INDEX=...]
#       every wheel once, into dir (default: wheelhouse/), e.g. to copy to a USB stick
#   make install WHEELHOUSE=dir
#       install from that folder alone, no network
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= report
TORCH_VERSION ?= 2.13.0
# Index to take torch from (empty: pip's configured index, as before).
TORCH_INDEX ?=
# A folder made by `make wheelhouse`: `make install` then uses it alone (pip --no-index).
WHEELHOUSE ?=
# Extra `pip download` flags for `make wheelhouse`, e.g. for laptops of another platform:
#   DOWNLOAD_FLAGS="--platform win_amd64 --python-version 3.11 --only-binary=:all:"
DOWNLOAD_FLAGS ?=
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

PIP_FROM := $(if $(WHEELHOUSE),--no-index --find-links $(WHEELHOUSE))
TORCH_FROM := $(if $(WHEELHOUSE),,$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)))
# setuptools prints a box on every editable install ("Editable installation ... be careful with folders
# ... same name as your package"); pip >= 25 shows it even with -q. Only that warning is filtered.
comma := ,
QUIET_EDITABLE := PYTHONWARNINGS="ignore:Editable installation$(if $(PYTHONWARNINGS),$(comma)$(PYTHONWARNINGS))"
WH_DIR := $(or $(WHEELHOUSE),wheelhouse)

.PHONY: report test test-browser workshop install wheelhouse benchmarks clean rehearse

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIP_FROM) --upgrade pip
	$(PY) -m pip install -q $(PIP_FROM) $(TORCH_FROM) torch==$(TORCH_VERSION)
	$(QUIET_EDITABLE) $(PY) -m pip install -q $(PIP_FROM) -e ".[dev]"
	touch $@

# Every wheel `make install` needs, downloaded once into $(WH_DIR) (run it with network, on the laptops'
# OS / architecture with Python 3.11, or pass DOWNLOAD_FLAGS); then `make install WHEELHOUSE=$(WH_DIR)`.
wheelhouse:
	mkdir -p $(WH_DIR)
	$(PYTHON) -c 'import tomllib, sys; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; sys.stdout.write("".join(r + chr(10) for r in p["dependencies"] + p["optional-dependencies"]["dev"]))' > $(WH_DIR)/requirements.txt
	$(PYTHON) -m pip download -q -d $(WH_DIR) $(DOWNLOAD_FLAGS) pip "setuptools>=68"
	$(PYTHON) -m pip download -q -d $(WH_DIR) $(DOWNLOAD_FLAGS) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==$(TORCH_VERSION)
	$(PYTHON) -m pip download -q -d $(WH_DIR) $(DOWNLOAD_FLAGS) --find-links $(WH_DIR) torch==$(TORCH_VERSION) -r $(WH_DIR)/requirements.txt
	@echo "wheelhouse: $$(ls $(WH_DIR) | wc -l) files in $(WH_DIR); install with: make install WHEELHOUSE=$(WH_DIR)"

report: install
	$(PY) -m circuitlib report --model toy --out $(OUT)

# The report on a random-weight model in REHEARSE_MODEL's hub format, offline (issue 12): wall time per
# section and peak memory in $(REHEARSE_OUT)/summary.json. A benchmark, not a test (gpt2-medium: see README).
#   make rehearse REHEARSE_ARGS="--plan discovery_prompts=32 --skip path_patch"
REHEARSE_MODEL ?= gpt2-medium
REHEARSE_OUT ?= rehearsal-$(subst /,--,$(REHEARSE_MODEL))
REHEARSE_ARGS ?=
rehearse: install
	$(PY) -m circuitlib rehearse $(REHEARSE_MODEL) --out $(REHEARSE_OUT) $(REHEARSE_ARGS)

test: install
	@status=0; \
	echo "make test 1/2: notebooks (nbval) and bad_input tests, plain"; \
	$(PY) -m pytest -m "notebook or bad_input" || status=1; \
	echo "make test 2/2: every other test, tensor shapes and annotations checked at run time (jaxtyping + beartype)"; \
	$(PY) -m pytest tests -o addopts="" -p no:nbval -p no:cacheprovider -m "not bad_input" \
	  --jaxtyping-packages="circuitlib,beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))" || status=1; \
	exit $$status

# Only the end-to-end test of notebook 05's explorer in JupyterLab + headless Chromium (part of `make test`;
# needs Debian's chromium or CIRCUITLIB_CHROMIUM=/path/to/chrome, else it skips). Screenshots, browser
# console and server log: test-artifacts/browser/.
test-browser: install
	$(PY) -m pytest tests/test_browser.py -rs

# The workshop's notebooks: workshop/instructor (as in notebooks/) and workshop/participant (solutions
# and model answers replaced by prompts, outputs cleared).
workshop: install
	$(PY) -m circuitlib.workshop notebooks workshop

benchmarks: install
	$(PY) benchmarks/bench_scoring.py
	$(PY) benchmarks/bench_patching.py
	$(PY) benchmarks/bench_load.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache test-artifacts
