# fedsynth: two commands on a fresh machine — `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedsynth-installed
# CPU build of torch when no NVIDIA GPU answers; a GPU machine gets the default (CUDA) build.
TORCH_PIN := $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo 'torch>=2.4,<2.14'; else echo 'torch==2.13.0'; fi)

.PHONY: install demo test bench bench-quality clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q '$(TORCH_PIN)'
	$(PY) -m pip install -q -e '.[demo,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedsynth demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m bench.run_all

bench-quality: $(STAMP)
	$(PY) -m bench.quality
	$(PY) -m bench.quality_extra

clean:
	rm -rf $(VENV) runs demo-data .pytest_cache
