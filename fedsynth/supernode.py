"""Flower's SuperNode with fedsynth's shorter waits: ``python -m fedsynth.supernode [args]``.

Everything is Flower's own ``flower-supernode``; before it starts, ``fedsynth.flower_latency``
shortens its idle poll of the coordinator (3 s → 0.25 s, ``FEDSYNTH_NODE_POLL_S``) and its object
pull retries (1-10 s → 0.02-0.25 s). Why, with the measurements: that module's docstring. Each idle
poll is one small request to the SuperLink: four per second per hospital, which it serves easily.
"""

from __future__ import annotations

import sys

from fedsynth import flower_latency


def main() -> None:
    try:
        poll = flower_latency.node_poll_interval()
    except ValueError as exc:
        sys.exit(str(exc))
    flower_latency.check()
    flower_latency.fast_object_pulls()
    flower_latency.fast_node_polls(poll)
    from flwr.supernode.cli import flower_supernode

    flower_supernode()


if __name__ == "__main__":
    main()
