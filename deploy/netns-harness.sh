#!/bin/sh
# A federation across "hosts" on one Linux machine: coordinator and each hospital in a network
# namespace of its own, on tbf-shaped links (default h1, h2 at 20 Mbit/s, h3 at 5 Mbit/s), one
# run, then everything it made is removed (also on Ctrl-C or failure). Root only.
#   sudo deploy/netns-harness.sh --rounds 3 --wire-dtype int8
#   sudo deploy/netns-harness.sh --rates h1=20,h2=20,h3=5 --hold   # keep it up to inspect
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
py="${PYTHON:-$here/.venv/bin/python}"
[ -x "$py" ] || py=python3
cd "$here"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m bench.netns "$@"
