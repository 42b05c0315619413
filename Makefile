# The whole set-up is two commands:  `make study`  and  `make test`.
# Both create .venv, install the pinned versions of constraints.txt (CPU torch 2.13.0),
# the package itself, its compiled fast lane (C++, about a minute), and the embedded data set, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup study test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt scripts/install-data.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt "torch==2.13.0"
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	$(PY) -m groupnorm.backends.native
	bash scripts/install-data.sh
	touch $@

study: setup
	$(VENV)/bin/groupnorm study $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

bench: setup
	$(VENV)/bin/groupnorm bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
