# Two commands for a fresh machine: `make demo` and `make test`.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
# pytest-xdist workers for `make test` (each test runs single-threaded: conftest.py); TEST_WORKERS=0 runs serially
TEST_WORKERS ?= 2
STAMP   := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)
# The minimum Python version, from its one place: pyproject.toml's requires-python = ">=X.Y".
PY_MIN  := $(shell sed -n 's/^requires-python *= *">= *\([0-9][0-9.]*\)".*/\1/p' pyproject.toml)
ifeq ($(PY_MIN),)
$(error pyproject.toml has no requires-python = ">=X.Y" line to read the minimum Python version from)
endif

.PHONY: setup test demo clean

setup: $(STAMP)

# Idempotent: re-runs pip only when requirements.txt changes.
$(STAMP): requirements.txt
	@$(PYTHON) -c "import sys; sys.exit(0 if sys.version_info >= tuple(int(p) for p in '$(PY_MIN)'.split('.')) else 1)" || { \
	  echo "make setup: $(PYTHON) is Python $$($(PYTHON) -c 'import platform; print(platform.python_version())'); this project needs Python >= $(PY_MIN) (pyproject.toml's requires-python; transformers 5). Install one and run: make setup PYTHON=python$(PY_MIN)" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	$(PY) -c "import torch, torchvision, pytorch_lightning, jsonargparse, torchmetrics, sklearn, matplotlib, transformers, peft"
	@rm -f $(VENV)/.installed-*
	@touch $@

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests

demo: setup
	bash scripts/demo.sh

clean:
	rm -rf runs/demo
