"""Every use of Flower's non-public modules, in one place: names fedsynth imports, and patches.

Names: ``PRIVATE_NAMES`` maps each non-public Flower name fedsynth uses (the warm executor's
Runtime API client, node registration, the Fleet routes the proxy lets through, constants) to its
``module:attribute``. ``from protocol.flower_private import NAME`` imports it on first use, so a
hospital never imports the SuperLink's web routers; ``check_names`` resolves them all and
``tests/unit/protocol/test_flower_latency.py`` runs it, so a Flower release that moved one fails
there first (tests/unit/test_import_graph.py keeps such imports out of every other module).

Patches: Flower 1.42's fixed waits, shortened for the processes fedsynth starts, each measured.

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
name moved, and ``tests/unit/protocol/test_flower_latency.py`` fails on such a Flower before a
deployment does.
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
            raise RuntimeError(f"{name} has no pull_objects: protocol.flower_private needs "
                               "updating for this Flower")
    code = inflatable_utils.pull_objects.__wrapped__.__code__ if hasattr(
        inflatable_utils.pull_objects, "__wrapped__") else inflatable_utils.pull_objects.__code__
    if not {"initial_backoff", "backoff_cap"} <= set(code.co_varnames):
        raise RuntimeError("flwr pull_objects lost initial_backoff/backoff_cap")
    from flwr.supernode import start_client_internal

    if not hasattr(start_client_internal, "time"):
        raise RuntimeError("flwr.supernode.start_client_internal no longer sleeps with 'time'")


# ---- non-public names (imported on first use) ----

PRIVATE_NAMES: dict[str, str] = {
    "ErrorCode": "flwr.common.constant:ErrorCode",
    "sample_nodes": "flwr.serverapp.strategy.strategy_utils:sample_nodes",
    "AcquireTaskRequest": "flwr.proto.runtime_pb2:AcquireTaskRequest",
    "RuntimeVersionHttpInterceptor": "flwr.supercore.interceptors:RuntimeVersionHttpInterceptor",
    "make_simple_http_retry_invoker": "flwr.supercore.retry:make_simple_http_retry_invoker",
    "RuntimeHttpClient": "flwr.supercore.runtime:RuntimeHttpClient",
    "TaskType": "flwr.supercore.constant:TaskType",
    "SubStatus": "flwr.common.constant:SubStatus",
    "HeartbeatSender": "flwr.supercore.heartbeat:HeartbeatSender",
    "make_task_heartbeat_fn_http": "flwr.supercore.heartbeat:make_task_heartbeat_fn_http",
    "RuntimeTokenHttpInterceptor": "flwr.supercore.interceptors:RuntimeTokenHttpInterceptor",
    "TaskIdentity": "flwr.supercore.task_identity:TaskIdentity",
    "pull_task_input": "flwr.supernode.runtime.run_clientapp:pull_task_input",
    "push_message": "flwr.supernode.runtime.run_clientapp:push_message",
    "push_task_output": "flwr.supernode.runtime.run_clientapp:push_task_output",
    "start_parent_process_monitor": "flwr.supercore.app_utils:start_parent_process_monitor",
    "FLWR_INTERNAL_GRPC_CONTROL_API": "flwr.common.constant:FLWR_INTERNAL_GRPC_CONTROL_API",
    "FLWR_INTERNAL_GRPC_FLEET_API": "flwr.common.constant:FLWR_INTERNAL_GRPC_FLEET_API",
    "read_superlink_connection": "flwr.cli.flower_config:read_superlink_connection",
    "init_http_client_from_connection": "flwr.cli.utils:init_http_client_from_connection",
    "RegisterNodeRequest": "flwr.proto.control_pb2:RegisterNodeRequest",
    # fedsynth.control: launch / status speak the Control API in-process (no `flwr` start)
    "ListRunsRequest": "flwr.proto.control_pb2:ListRunsRequest",
    "ListNodesRequest": "flwr.proto.control_pb2:ListNodesRequest",
    "StartRunRequest": "flwr.proto.control_pb2:StartRunRequest",
    "run_from_proto": "flwr.common.serde:run_from_proto",
    "fab_to_proto": "flwr.common.serde:fab_to_proto",
    "user_config_to_proto": "flwr.common.serde:user_config_to_proto",
    "parse_config_args": "flwr.common.config:parse_config_args",
    "Fab": "flwr.supercore.fab:Fab",
    "build_fab_from_disk": "flwr.cli.build:build_fab_from_disk",
    "format_runs": "flwr.cli.run_utils:format_runs",
    "public_key_to_bytes": "flwr.supercore.primitives.asymmetric:public_key_to_bytes",
    "fleet_router": "flwr.superlink.routers.fleet.router:router",
    # the largest array chunk one push-object carries: sizes the proxy's body limit
    "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE": "flwr.common.constant:FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE",
    "flower_supernode": "flwr.supernode.cli:flower_supernode",
}


def __getattr__(name: str) -> Any:
    """``from protocol.flower_private import NAME`` for a name of ``PRIVATE_NAMES``."""
    import importlib

    target = PRIVATE_NAMES.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def check_names() -> list[str]:
    """Import every name of ``PRIVATE_NAMES``; returns those Flower no longer has."""
    import importlib

    missing = []
    for name, target in PRIVATE_NAMES.items():
        module, _, attr = target.partition(":")
        try:
            getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            missing.append(f"{name} ({target})")
    return missing


# -- Secure aggregation (server/secure_aggregation.py, client/secure_aggregation.py) -------------
# Flower's SecAgg+ lives on its legacy path: its workflow builds ``FitIns`` and reads ``FitRes``
# (``flwr.common``), and its mod keeps its state under a constant of ``flwr.common``.
SECAGG_CONFIGS = "secaggplus_configs"  # flwr.common.secure_aggregation...RECORD_KEY_CONFIGS
SECAGG_STATE = "secaggplus_state"  # ... RECORD_KEY_STATE: the mod's state in context.state
SECAGG_MASKED = "masked_params"  # ...secaggplus_constants.Key.MASKED_PARAMETERS
# fedsynth's own record for the masked vector on the wire (masked_as_arrays below)
SECAGG_MASKED_ARRAYS = "fedsynth-secagg-masked"


def masked_as_arrays(reply: Any) -> Any:
    """The mod's masked vector moved from its ConfigRecord (``bytes`` in numpy's save format)
    into an ArrayRecord of the same int64 arrays, in place.

    Why: a ConfigRecord travels as one object, pushed in one request, so a masked vector of a
    DCGAN-64 (about 14 MiB) was refused by the Fleet proxy's push-object limit (8 MiB: one
    5 MiB array chunk and its header; fedsynth/proxy_limits.py) and every secure round on a
    real-size model failed (413 Request Entity Too Large). Arrays go in Flower's 5 MiB chunks
    like every model. The numbers are the mod's, unchanged; ``masked_from_arrays`` puts them
    back where Flower's workflow reads them. No cryptography is touched."""
    from flwr.app import Array, ArrayRecord
    from flwr.common import bytes_to_ndarray

    configs = reply.content.config_records.get(SECAGG_CONFIGS) if not reply.has_error() else None
    if configs is None or SECAGG_MASKED not in configs:
        return reply
    vectors = [bytes_to_ndarray(b) for b in configs[SECAGG_MASKED]]
    del configs[SECAGG_MASKED]
    reply.content.array_records[SECAGG_MASKED_ARRAYS] = ArrayRecord(
        {str(i): Array.from_numpy_ndarray(v) for i, v in enumerate(vectors)})
    return reply


def masked_from_arrays(reply: Any) -> Any:
    """``masked_as_arrays`` undone, in place: the workflow finds the bytes where it looks."""
    from flwr.common import ndarray_to_bytes

    if reply.has_error() or SECAGG_MASKED_ARRAYS not in reply.content.array_records:
        return reply
    record = reply.content.array_records[SECAGG_MASKED_ARRAYS]
    vectors = [record[str(i)].numpy() for i in range(len(record))]
    del reply.content.array_records[SECAGG_MASKED_ARRAYS]
    reply.content.config_records[SECAGG_CONFIGS][SECAGG_MASKED] = [
        ndarray_to_bytes(v) for v in vectors]
    return reply


def legacy_fit_ins() -> Any:
    """An empty legacy ``FitIns`` (the workflow's stage 2 content is replaced by fedsynth's)."""
    from flwr.common import FitIns, Parameters

    return FitIns(Parameters(tensors=[], tensor_type=""), {})


def legacy_ndarrays(parameters: Any) -> list:
    from flwr.common import parameters_to_ndarrays

    return parameters_to_ndarrays(parameters)


def legacy_fitres_record(arrays: list, num_examples: int, metrics: dict) -> Any:
    """A legacy ``FitRes`` as the RecordDict ``secaggplus_mod`` reads (``fitres.*`` records)."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    fitres = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(arrays),
                    num_examples=num_examples, metrics=metrics)
    return fitres_to_recorddict(fitres, keep_input=False)
