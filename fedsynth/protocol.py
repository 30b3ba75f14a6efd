"""The wire protocol between coordinator and hospitals, in one place.

Record names, metric keys and the conversion between the codec's numpy arrays and Flower's records
live here, so neither side spells a key the other must match by hand. Everything a hospital sends is
built by ``train_reply`` / ``evaluate_reply``: model arrays plus a fixed set of scalar metrics, which
is what the privacy audit test checks.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsynth.keys import (  # noqa: F401  re-exported: protocol is the one place callers look
    ARRAYS, CONFIG, EVAL_METRICS, LOCAL_NORM_COMPONENTS, METRICS, NUM_EXAMPLES, REPLY_COMPONENTS,
    SERVER_ROUND, TRAIN_METRICS, examples_key,
)
from shared_models.config import ModelConfig, TrainConfig, from_flat, to_flat


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array.from_numpy_ndarray(v) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


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
