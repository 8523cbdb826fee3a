# Two entry points a newcomer needs: `make book` and `make test` (see README.md).
PY := .venv/bin/python
STAMP := .venv/.qklib-installed

.PHONY: env book test test-fast bench clean

env: $(STAMP)

# The venv is (re)built when pyproject.toml changes. torch/torchvision are taken from the
# machine's local wheel store where pip has one (see README.md, "Environment").
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .[test]
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

book: env
	$(PY) tools/build_book.py

test: env
	$(PY) -m pytest -ra

test-fast: env
	$(PY) -m pytest -ra -m "not slow"

bench: env
	$(PY) tools/bench.py

clean:
	rm -rf _build executed book/vendor
