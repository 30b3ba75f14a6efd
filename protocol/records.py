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

from protocol.keys import (  # noqa: F401  re-exported: protocol is the one place callers look
    ARRAYS, CLASS_EXAMPLES, CLASS_EXAMPLES_PREFIX, CONFIG, EVAL_KEPT_HOME, EVAL_METRICS,
    EVALUATE_ROUND, LOCAL_NORM_COMPONENTS, METRICS, NUM_EXAMPLES, REPLY_COMPONENTS, SERVER_ROUND,
    TRAIN_METRICS, class_examples_key, examples_key,
)
from shared_models.config import DataConfig, ModelConfig, TrainConfig, from_flat, to_flat


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


_MAX_DIMS = 32


def _shape_of(value: Any, key: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > _MAX_DIMS:
        raise ValueError(f"packed array {key[:80]!r}: shape is not a list of at most "
                         f"{_MAX_DIMS} dimensions")
    if not all(type(d) is int and 0 <= d < 2**63 for d in value):
        raise ValueError(f"packed array {key[:80]!r}: shape has a negative, huge or "
                         f"non-integer dimension")
    return tuple(value)


def _dtype_of(value: Any, key: str) -> np.dtype:
    """A plain numeric dtype (float, int, uint, bool) from an index entry; anything else refused."""
    code = value[1:] if isinstance(value, str) and value[:1] in ("<", ">", "|", "=") else value
    if not (isinstance(code, str) and len(code) == 2 and code[0] in "fiub" and code[1] in "1248"):
        raise ValueError(f"packed array {key[:80]!r}: dtype refused")
    try:
        dt = np.dtype(value)
    except TypeError:
        raise ValueError(f"packed array {key[:80]!r}: dtype refused") from None
    if dt.hasobject or dt.shape != () or dt.fields is not None or dt.kind not in "fiub":
        raise ValueError(f"packed array {key[:80]!r}: dtype refused")
    return dt


def _plain_array(key: Any, value: Any) -> np.ndarray:
    """One Flower Array of a non-packed record, its .npy header checked before anything is
    allocated (``np.load`` would allocate whatever shape the header claims)."""
    import io

    from numpy.lib import format as npy

    if not isinstance(key, str):
        raise ValueError("array record key is not a string")
    data = getattr(value, "data", None)
    if not isinstance(data, bytes):
        raise ValueError(f"array {key[:80]!r}: no byte payload")
    fh = io.BytesIO(data)
    try:
        version = npy.read_magic(fh)
        if version == (1, 0):
            shape, _fortran, dt = npy.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _fortran, dt = npy.read_array_header_2_0(fh)
        else:
            raise ValueError("unsupported .npy version")
    except Exception:  # noqa: BLE001 - numpy's header parser raises many kinds (TokenError...)
        raise ValueError(f"array {key[:80]!r}: unreadable .npy header") from None
    dt = _dtype_of(dt.str, key)
    shape = _shape_of(list(shape), key)
    if math.prod(shape) * dt.itemsize > len(data) - fh.tell():
        raise ValueError(f"array {key[:80]!r}: shape {shape} does not fit its bytes")
    try:
        out = value.numpy()
    except Exception:  # noqa: BLE001 - whatever np.load makes of hostile bytes
        raise ValueError(f"array {key[:80]!r}: cannot be decoded") from None
    if not isinstance(out, np.ndarray) or out.dtype.hasobject:
        raise ValueError(f"array {key[:80]!r}: not a numeric array")
    return out


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of a record made by ``to_record`` (or a plain one Array per tensor).

    A record from a hospital is hostile input: anything that does not decode to plain numeric
    arrays (an unreadable or non-list index, a non-string or duplicate key, a dtype other than
    float/int/uint/bool, a negative or huge dimension, a size beyond the bytes that came) raises
    ``ValueError``, and nothing is allocated beyond the bytes received.
    """
    try:
        keys = list(record.keys())
    except Exception:  # noqa: BLE001
        raise ValueError("array record is malformed") from None
    if keys != [PACKED]:
        out_plain: dict[str, np.ndarray] = {}
        for key in keys:
            out_plain[key] = _plain_array(key, record[key])
        return out_plain
    blob = _plain_array(PACKED, record[PACKED])
    if blob.dtype != np.uint8 or blob.ndim != 1 or len(blob) < 8:
        raise ValueError("packed array record is malformed")
    n = int.from_bytes(blob[:8].tobytes(), "little")
    if n > len(blob) - 8:
        raise ValueError("packed array record: index longer than the record")
    try:
        index = json.loads(blob[8:8 + n].tobytes())
    except (ValueError, RecursionError):
        raise ValueError("packed array record has an unreadable index") from None
    if not isinstance(index, list):
        raise ValueError("packed array record: index is not a list")
    out: dict[str, np.ndarray] = {}
    at = 8 + n + _pad(n)
    for entry in index:
        if not isinstance(entry, list) or len(entry) != 3 or not isinstance(entry[0], str):
            raise ValueError("packed array record: index entry is not [name, dtype, shape]")
        key = entry[0]
        if key in out:
            raise ValueError(f"packed array record: duplicate key {key[:80]!r}")
        dt = _dtype_of(entry[1], key)
        shape = _shape_of(entry[2], key)
        size = math.prod(shape) * dt.itemsize  # Python ints: no overflow
        if at + size > len(blob):
            raise ValueError(f"packed array record is truncated at {key[:80]!r}")
        try:
            out[key] = blob[at:at + size].view(dt).reshape(shape)
        except (ValueError, TypeError):
            raise ValueError(f"packed array {key[:80]!r}: shape {shape} refused") from None
        at += size + _pad(size)
    return out


def train_config(model: ModelConfig, train: TrainConfig, server_round: int,
                 data: DataConfig | None = None, **extra: int | float | str | bool
                 ) -> ConfigRecord:
    """The round's signed config: model, training and data selection (classes, domains)."""
    values: dict[str, Any] = {**to_flat(model, "model"), **to_flat(train, "train"),
                              **to_flat(data or DataConfig(), "data")}
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


def parse_data_config(record: Mapping[str, Any]) -> DataConfig:
    """The federation's classes and domains from a received ConfigRecord (defaults if absent)."""
    return from_flat(DataConfig, record, "data")


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
    return RecordDict({ARRAYS: to_record(arrays),
                       METRICS: _metrics(metrics, TRAIN_METRICS + EVAL_METRICS)})


def evaluate_reply(metrics: Mapping[str, float | int]) -> RecordDict:
    return RecordDict({METRICS: _metrics(metrics, EVAL_METRICS)})
