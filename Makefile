PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Test processes (pytest-xdist); each test file runs whole in one of them.
TEST_WORKERS ?= 2

.PHONY: test install demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m pip download --no-deps --quiet gan-face-generate==1.1.1 -d .cache/demo
	$(PY) -m memedit.cli demo --weights .cache/demo --work .cache/demo --out out

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

bench: install
	$(PY) benchmarks/covariance_fold.py
	$(PY) benchmarks/lambda_solve.py

clean:
	rm -rf $(VENV) .pytest_cache
