#!/usr/bin/env bash
# GPU throughput of fedsynth's trainer vs a bare PyTorch loop (see bench/gpu.py).
# Installs nothing: uses the project's .venv (or $PYTHON). Bounded to 7 min 50 s of wall time.
# Usage: bench/gpu.sh [--device cuda:N]       CPU check of the same path: bench/gpu.sh --device cpu --quick
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname) nproc=$(nproc)"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/# gpu: /' || true
fi
exec timeout --signal=TERM --kill-after=10 470 "$PY" -m bench.gpu "$@"
