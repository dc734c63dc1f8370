# The two quick-start commands. torch is pinned first so that pip never pulls CUDA wheels on a
# machine without a GPU (an unpinned torch requirement would).
PYTHON ?= python3
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1

.PHONY: install install-test demo test

install:
	$(PYTHON) -m pip install -q "$(TORCH)"
	$(PYTHON) -m pip install -q -e .

install-test: install
	$(PYTHON) -m pip install -q -e ".[test]"

demo: install
	bash scripts/run_demo.sh

test: install-test
	$(PYTHON) -m pytest -q -p no:cacheprovider tests
