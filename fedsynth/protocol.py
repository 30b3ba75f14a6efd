"""The wire protocol between coordinator and hospitals, in one place.

Record names, metric keys and the conversion between the codec's numpy arrays and Flower's records
live here, so neither side spells a key the other must match by hand. Everything a hospital sends is
built by ``train_reply`` / ``evaluate_reply``: model arrays plus a fixed set of scalar metrics, which
is what the privacy audit test checks.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsynth.keys import (  # noqa: F401  re-exported: protocol is the one place callers look
    ARRAYS, CONFIG, EVAL_METRICS, LOCAL_NORM_COMPONENTS, METRICS, NUM_EXAMPLES, REPLY_COMPONENTS,
    SERVER_ROUND, TRAIN_METRICS, examples_key,
)
from shared_models.config import ModelConfig, TrainConfig, from_flat, to_flat


PACKED = "fedsynth-packed"  # the one Array of a packed ArrayRecord
_ALIGN = 8


def _pad(n: int) -> int:
    return -n % _ALIGN


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """All of ``arrays`` as ONE Flower Array: a JSON index (name, dtype, shape) and the raw bytes.

    Why not one Array per tensor: Flower 1.42 moves every Array of a message as its own object,
    one request per object on each hop (ServerApp → SuperLink → SuperNode → ClientApp and back),
    and on the deployed localhost federation each request cost ~0.2 s, so a DCGAN's ~50 tensors
    took ~7 s per hop (BENCHMARKS.md, "deployed rounds"). One packed Array is one object (plus
    Flower's 5 MB chunks). The bytes on the wire are the same plus the index (~60 B a tensor).
    """
    items = [(k, np.asarray(v, order="C")) for k, v in arrays.items()]  # 0-d arrays stay 0-d
    index = json.dumps([[k, v.dtype.str, list(v.shape)] for k, v in items]).encode()
    head = len(index).to_bytes(8, "little") + index + b"\0" * _pad(len(index))
    sizes = [v.nbytes for _, v in items]
    blob = np.empty(len(head) + sum(n + _pad(n) for n in sizes), np.uint8)
    blob[:len(head)] = np.frombuffer(head, np.uint8)
    at = len(head)
    for (_, v), n in zip(items, sizes):
        blob[at:at + n] = v.reshape(-1).view(np.uint8)
        blob[at + n:at + n + _pad(n)] = 0
        at += n + _pad(n)
    return ArrayRecord(array_dict={PACKED: Array.from_numpy_ndarray(blob)})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of a record made by ``to_record`` (or a plain one Array per tensor)."""
    if list(record.keys()) != [PACKED]:
        return {k: v.numpy() for k, v in record.items()}
    blob = record[PACKED].numpy()
    if blob.dtype != np.uint8 or blob.ndim != 1 or len(blob) < 8:
        raise ValueError("packed array record is malformed")
    n = int.from_bytes(blob[:8].tobytes(), "little")
    try:
        index = json.loads(blob[8:8 + n].tobytes())
    except ValueError:
        raise ValueError("packed array record has an unreadable index") from None
    out: dict[str, np.ndarray] = {}
    at = 8 + n + _pad(n)
    for key, dtype, shape in index:
        dt = np.dtype(dtype)
        if dt.hasobject:
            raise ValueError(f"packed array {key!r}: object dtype refused")
        size = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if at + size > len(blob):
            raise ValueError(f"packed array record is truncated at {key!r}")
        out[key] = blob[at:at + size].view(dt).reshape(shape)
        at += size + _pad(size)
    return out


def train_config(model: ModelConfig, train: TrainConfig, server_round: int,
                 **extra: int | float | str | bool) -> ConfigRecord:
    values: dict[str, Any] = {**to_flat(model, "model"), **to_flat(train, "train")}
    values[SERVER_ROUND] = server_round
    values.update(extra)
    return ConfigRecord(values)


def parse_train_config(record: Mapping[str, Any]) -> tuple[ModelConfig, TrainConfig, int]:
    """Typed configs from a received ConfigRecord; a malformed one raises ``ValueError``."""
    return (
        from_flat(ModelConfig, record, "model"),
        from_flat(TrainConfig, record, "train"),
        int(record.get(SERVER_ROUND, 0)),
    )


def _metrics(values: Mapping[str, float | int], allowed: tuple[str, ...]) -> MetricRecord:
    out: dict[str, float | int] = {}
    for key, value in values.items():
        if key not in allowed and not key.startswith("num-examples"):
            raise ValueError(f"metric {key!r} is not part of the protocol")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"metric {key!r} must be a number, got {type(value).__name__}")
        out[key] = value if math.isfinite(value) else float("nan")
    return MetricRecord(out)


def train_reply(arrays: Mapping[str, np.ndarray], metrics: Mapping[str, float | int]) -> RecordDict:
    return RecordDict({ARRAYS: to_record(arrays), METRICS: _metrics(metrics, TRAIN_METRICS)})


def evaluate_reply(metrics: Mapping[str, float | int]) -> RecordDict:
    return RecordDict({METRICS: _metrics(metrics, EVAL_METRICS)})
