# fedsynth: two commands on a fresh machine — `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedsynth-installed
# CPU build of torch when no NVIDIA GPU answers; a GPU machine gets the default (CUDA) build.
TORCH_PIN := $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo 'torch>=2.4,<2.14'; else echo 'torch==2.13.0'; fi)

.PHONY: install tools demo test test-quick bench bench-net bench-quality bench-ray bench-privacy bench-utility bench-segmentation bench-small-data docs-mask-grid docs-operations clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q '$(TORCH_PIN)'
	$(PY) -m pip install -q -e '.[demo,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedsynth demo

# The Debian tools the tests drive for real. Root with apt installs what is missing; anyone else
# gets one line naming it. Under CI=true a test skipped for a missing tool fails (tests/conftest.py).
TOOLS := dcmdjpeg:dcmtk dciodvfy:dicom3tools prometheus:prometheus chromium:chromium \
         nginx:nginx ip:iproute2 tc:iproute2 systemd-analyze:systemd
tools:
	@missing=""; for t in $(TOOLS); do command -v $${t%%:*} >/dev/null 2>&1 || missing="$$missing $${t#*:}"; done; \
	missing=$$(echo $$missing | tr ' ' '\n' | sort -u | xargs); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian packages the tests use: $$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else \
	  echo "make test: missing Debian packages: $$missing -- install them with: sudo apt-get install $$missing"; exit 1; \
	fi

# 4 workers on 2 cores: most tests wait on processes, timeouts and links, not on the CPU. A file
# stays on one worker (its module-scoped federation is built once); torch uses one thread each.
# xdist starts the files with the most tests first (longest-first all at once overloaded the
# box: BENCHMARKS.md, "The test loop"); tests/conftest.py's order breaks its ties.
test: $(STAMP) tools
	$(PY) -m pytest -n 4 --dist loadfile

# The edit loop: tests/unit (in process, no daemon), less the in-process federations marked slow.
# tests/system (daemons, netns, nginx, Prometheus, Chromium, DCMTK, wheel) runs in `make test` only.
test-quick: $(STAMP)
	$(PY) -m pytest -q tests/unit -m "not slow"

bench: $(STAMP)
	$(PY) -m bench.run_all

# shaped links (tbf, netns) fp32/fp16/int8 against their floor, and a 120-round soak (root)
bench-net: $(STAMP)
	$(PY) -m bench.net

bench-quality: $(STAMP)
	$(PY) -m bench.quality
	$(PY) -m bench.quality_extra
	$(PY) -m bench.quality_int8

bench-ray: $(STAMP)
	$(PY) -m bench.ray_cluster --hospitals 100,300,1000

# membership inference (LOGAN, GAN-Leaks) vs DP (no DP, eps 8, eps 1) with utility beside
bench-privacy: $(STAMP)
	$(PY) -m bench.privacy

# Downstream utility of synthetic lesion slices (issue 13): classifier on the small hospital's real
# slices, + local / federated cGAN synthetic, synthetic only (TSTR), every hospital pooled.
bench-utility: $(STAMP)
	$(PY) -m bench.utility

# U-Net Dice: small hospital real / + federated synthetic / synthetic only / pooled (issue 15).
bench-segmentation: $(STAMP)
	$(PY) -m bench.segmentation

# docs/operations-transcript.md: what the operator commands print, from a real local federation
docs-operations: $(STAMP)
	$(PY) -m bench.operations_transcript

# The README's mask | real | synthetic | overlay grid (maskgan, phantom SEGs; ~2 min on a CPU).
docs-mask-grid: $(STAMP)
	$(PY) -m bench.mask_grid --out docs/img/maskgan-grid.png

# DiffAugment / R1 / generator EMA off vs on, 3 seeds (BENCHMARKS.md "Small local data")
bench-small-data: $(STAMP)
	$(PY) -m bench.small_data

clean:
	rm -rf $(VENV) runs demo-data .pytest_cache
