# A newcomer's commands: `make book`, `make test` and `make lab` (see README.md).
PY := .venv/bin/python
STAMP := .venv/.qklib-installed

.PHONY: env book test test-fast lab bench clean

env: $(STAMP)

# The venv is (re)built when pyproject.toml changes. torch/torchvision are taken from the
# machine's local wheel store where pip has one (see README.md, "Environment").
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

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
