PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Test processes (pytest-xdist); each test file runs whole in one of them.
TEST_WORKERS ?= 2

.PHONY: test test-core install demo demo-lm bench clean browser ui ui-stylegan2

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

# Fact edits on a language model: trains the small GPT-2 of the generated world (cached in
# .cache), traces where it recalls facts, and writes the ROME / MEMIT / fine-tuning table.
demo-lm: install
	$(PY) -m memedit.cli lm-demo --cache-dir .cache --out out/lm

# Core tests: the library without PyTorch (`import torch` fails; parity tests deselected).
CORE_TESTS := tests/memedit/test_covariance.py tests/memedit/test_directions.py \
	tests/memedit/test_solve.py tests/memedit/test_factored.py tests/memedit/test_edits.py \
	tests/memedit/test_io.py tests/memedit/test_specs.py tests/memedit/test_docstrings.py \
	tests/memedit/layers

test: install browser
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

test-core: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-torch $(CORE_TESTS)

# Chromium and its driver (Debian's packages) for the browser test of `memedit ui`:
# installed when missing, as root with apt-get or else with sudo.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
	    chromium chromium-driver; \
	elif command -v sudo >/dev/null 2>&1; then \
	  sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y \
	    --no-install-recommends chromium chromium-driver; \
	else \
	  echo "make browser: chromium and chromedriver are missing and apt-get needs root;" \
	    "install Debian's packages chromium and chromium-driver" >&2; exit 1; \
	fi

# The rewriting UI on the demo's DCGAN faces (makes the demo first when it is missing);
# `install` brings Flask with the test extra (`pip install 'memedit[ui]'` elsewhere).
UI_PORT ?= 8000
ui: install
	@test -d .cache/demo/faces-dcgan || $(MAKE) demo
	$(PY) -m memedit.ui .cache/demo/faces-dcgan --layer convt2 --stats .cache/demo/stats \
	  --samples 2000 --batch-size 100 --port $(UI_PORT)

# The shipped StyleGAN2 (converted by `make demo` into a folder named by its sha256).
SG2_DEMO = .cache/demo/stylegan2-$(shell $(PY) -c \
  "from ports.stylegan2.weights import FACES64_SHA256 as h; print(h[:12])")
ui-stylegan2: install
	@test -d $(SG2_DEMO) || $(MAKE) demo
	$(PY) -m memedit.ui $(SG2_DEMO) --layer conv_3 --stats .cache/demo/stats \
	  --samples 2000 --batch-size 100 --port $(UI_PORT)

bench: install
	$(PY) benchmarks/covariance_fold.py
	$(PY) benchmarks/lambda_solve.py

clean:
	rm -rf $(VENV) .pytest_cache
