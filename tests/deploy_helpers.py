"""The deployment tests' helpers live in ``bench.localdeploy`` (the round benchmark uses them too)."""

from bench.localdeploy import (FEDSYNTH, Proc, free_port, hospital_toml,  # noqa: F401
                               launch_toml, metrics_rows, run, start, wait_for)
