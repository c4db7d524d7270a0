# Set-up and the two commands of README.md: `make finetune` runs the main job, `make test` the tests.
# torch==2.13.0 is installed first, on its own: that pin takes the CPU build (a bare `torch` would
# pull a multi-GB CUDA build); the project's `torch>=2.2` range is then already satisfied.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: finetune serve demo test test-slow bench clean browser

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[train,serve,test,bench]'
	touch $@

finetune: $(VENV)/.installed
	$(VENV)/bin/lorakit finetune $(ARGS)

serve: $(VENV)/.installed
	$(VENV)/bin/lorakit serve $(ARGS)

demo: $(VENV)/.installed
	$(PY) examples/quickstart.py

# tests/test_playground.py drives the serve playground in a real headless browser: Debian's chromium through
# Playwright (Playwright's own browser download is not reachable), installed here when missing.
browser:
	@command -v chromium >/dev/null || { SUDO=; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

test: $(VENV)/.installed browser
	$(PY) -m pytest -q -m "not slow"

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_core.py
	$(PY) benchmarks/bench_methods.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
