"""Flower's SuperNode with fedsynth's shorter waits: ``python -m fedsynth.supernode [args]``.

Everything is Flower's own ``flower-supernode``; before it starts, ``protocol.flower_private``
shortens its idle poll of the coordinator (3 s → 0.25 s, ``FEDSYNTH_NODE_POLL_S``) and its object
pull retries (1-10 s → 0.02-0.25 s). Why, with the measurements: that module's docstring. Each idle
poll is one small request to the SuperLink: four per second per hospital, which it serves easily.
"""

from __future__ import annotations

import sys

from protocol import flower_private


def main() -> None:
    try:
        poll = flower_private.node_poll_interval()
    except ValueError as exc:
        sys.exit(str(exc))
    flower_private.check()
    flower_private.fast_object_pulls()
    flower_private.fast_node_polls(poll)
    from protocol.flower_private import flower_supernode

    flower_supernode()


if __name__ == "__main__":
    main()
