# A newcomer's commands: `make book`, `make test` and `make lab` (see README.md).
# PYTHON is the interpreter that creates the venv (default: python3); VENV is the venv's folder.
#   make test PYTHON=/usr/bin/python3.13                      # a new .venv on Python 3.13
#   make test-fast PYTHON=python3.12 VENV=.venv-py3.12        # a second venv beside .venv
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qklib-installed
PYVERSION := import sys; print(*sys.version_info[:2], sep=".")

.PHONY: env book test test-fast lab bench clean clean-env check-python

env: $(STAMP)

# The venv is (re)built when pyproject.toml changes. torch/torchvision are taken from the
# machine's local wheel store where pip has one (see README.md, "Environment").
$(STAMP): pyproject.toml | check-python
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .[docs,test]
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# A PYTHON given on the command line or in the environment must be the one the venv was made with:
# otherwise make stops rather than silently testing another Python (or deleting a 6 GB venv).
check-python:
ifneq ($(origin PYTHON),file)
	@want=$$($(PYTHON) -c '$(PYVERSION)') || { echo "PYTHON=$(PYTHON) does not run" >&2; exit 1; }; \
	if [ -x $(PY) ]; then have=$$($(PY) -c '$(PYVERSION)'); \
	  if [ "$$have" != "$$want" ]; then \
	    echo "$(VENV) has Python $$have but PYTHON=$(PYTHON) is $$want:" \
	         "run 'make clean-env' first, or give another folder, e.g. VENV=$(VENV)-py$$want" >&2; exit 1; fi; \
	fi
endif

book: env
	$(PY) tools/build_book.py

test: env
	$(PY) -m pytest -ra

test-fast: env
	$(PY) -m pytest -ra -m "not slow"

# JupyterLab on 127.0.0.1 in notebooks/ with the project's kernel; prints the URL (tools/lab.py).
lab: env
	$(PY) tools/lab.py

bench: env
	$(PY) tools/bench.py

clean:
	rm -rf _build executed book/vendor

# Removes the venv (VENV, default .venv) so that the next command makes it again, e.g. with another PYTHON.
clean-env:
	rm -rf $(VENV)
