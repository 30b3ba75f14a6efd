"""Flower 1.42's fixed waits, shortened for the processes fedsynth starts. One place, each measured.

Flower moves a message as: sender pushes the message, then its objects (arrays, in chunks);
receiver polls, sees the message, pulls its objects. Three fixed waits in that path cost whole
seconds per message on a localhost deployment (BENCHMARKS.md, "deployed rounds"), none of them
settable:

1. ``pull_objects`` retries an object that is not there yet after 1 s, then 2, 4, 8, capped at
   10 s (``PULL_INITIAL_BACKOFF``/``PULL_BACKOFF_CAP``, bound as default arguments). A receiver
   that polls promptly sees the message before the sender has pushed its objects (the SuperNode
   even stores the message before pulling its objects, so its task is handed out first), and
   then sleeps 1 + 2 + 4 s for objects that arrived milliseconds later. Here: 0.02 s, capped at
   0.25 s. Same retries, same give-up time (``max_time``), only finer steps.
2. The SuperNode sleeps 3 s after an empty poll of the SuperLink and 0.5 s while waiting for a
   reply (``start_client_internal.time.sleep``). Here: at most ``FEDSYNTH_NODE_POLL_S`` (0.25 s).
3. The ServerApp's ``Grid.send_and_receive`` checks for replies every 3 s. That one is replaced
   in our own code, not patched: ``server.metrics.MeteredGrid`` polls every 0.1 s.

These patch module attributes of a pinned Flower (``flwr>=1.42,<1.43``); ``check`` raises if a
name moved, and ``tests/test_flower_latency.py`` fails on such a Flower before a deployment does.
"""

from __future__ import annotations

import functools
import os
import time as _time
import types
from typing import Any, Callable

PULL_INITIAL_BACKOFF_S = 0.02
PULL_BACKOFF_CAP_S = 0.25
POLL_ENV = "FEDSYNTH_NODE_POLL_S"
DEFAULT_NODE_POLL_S = 0.25

# module: the name it calls ``pull_objects`` by (it imported the function, so each copy is patched)
_PULLERS = ("flwr.supercore.inflatable.inflatable_utils",
            "flwr.supernode.start_client_internal",
            "flwr.superlink.grid.http_grid")


def node_poll_interval() -> float:
    raw = os.environ.get(POLL_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_NODE_POLL_S
    except ValueError:
        raise ValueError(f"{POLL_ENV}={raw!r} is not a number of seconds") from None
    if not 0.01 <= value <= 3.0:
        raise ValueError(f"{POLL_ENV}={raw!r} must be between 0.01 and 3 seconds")
    return value


def _finer(pull_objects: Callable[..., Any]) -> Callable[..., Any]:
    if getattr(pull_objects, "_fedsynth_finer", False):
        return pull_objects

    @functools.wraps(pull_objects)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("initial_backoff", PULL_INITIAL_BACKOFF_S)
        kwargs.setdefault("backoff_cap", PULL_BACKOFF_CAP_S)
        return pull_objects(*args, **kwargs)

    wrapper._fedsynth_finer = True  # type: ignore[attr-defined]
    return wrapper


def fast_object_pulls() -> None:
    """Wait 1 of the module docstring: finer retry steps for objects that are not there yet."""
    import importlib

    for name in _PULLERS:
        module = importlib.import_module(name)
        module.pull_objects = _finer(module.pull_objects)  # type: ignore[attr-defined]


def capped_time(poll_s: float) -> types.ModuleType:
    """A stand-in for the ``time`` module whose ``sleep`` never sleeps longer than ``poll_s``."""
    shim = types.ModuleType("time")
    shim.__dict__.update({k: getattr(_time, k) for k in dir(_time) if not k.startswith("__")})
    shim.sleep = lambda seconds: _time.sleep(min(float(seconds), poll_s))  # type: ignore[attr-defined]
    return shim


def fast_node_polls(poll_s: float) -> None:
    """Wait 2: the SuperNode's idle and reply polls (only sleeps above ``poll_s`` shorten)."""
    from flwr.supernode import start_client_internal

    start_client_internal.time = capped_time(poll_s)  # type: ignore[attr-defined]


def check() -> None:
    """Raise if this Flower no longer has what the patches replace."""
    import importlib

    from flwr.supercore.inflatable import inflatable_utils

    for name in _PULLERS:
        if not hasattr(importlib.import_module(name), "pull_objects"):
            raise RuntimeError(f"{name} has no pull_objects: fedsynth.flower_latency needs "
                               "updating for this Flower")
    code = inflatable_utils.pull_objects.__wrapped__.__code__ if hasattr(
        inflatable_utils.pull_objects, "__wrapped__") else inflatable_utils.pull_objects.__code__
    if not {"initial_backoff", "backoff_cap"} <= set(code.co_varnames):
        raise RuntimeError("flwr pull_objects lost initial_backoff/backoff_cap")
    from flwr.supernode import start_client_internal

    if not hasattr(start_client_internal, "time"):
        raise RuntimeError("flwr.supernode.start_client_internal no longer sleeps with 'time'")
