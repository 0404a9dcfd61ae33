# Two commands for a newcomer: `make demo` and `make test`. Both build .venv first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test test-fast venv clean

venv: $(INSTALLED)

$(INSTALLED): pyproject.toml
	@echo ">> creating $(VENV) and installing npyloader with its keras, demo and test extras"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --progress-bar off -e '.[keras,demo,test]'
	@touch $@

demo: $(INSTALLED)
	$(PY) -m loader_client.demo

test: $(INSTALLED)
	$(PY) -m pytest -ra

test-fast: $(INSTALLED)
	$(PY) -m pytest -ra -m "not slow"

clean:
	rm -rf $(VENV) demo-data .pytest_cache .hypothesis
