# Two entry points (see README): `make demo` and `make test`. Both create the virtual
# environment on first use. torch and torchvision are pinned and installed first, so that
# the extras resolve against the tested versions.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[export,dev,serve]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/scan demo --out demo_out

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo_out
