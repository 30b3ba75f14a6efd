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

from shared_models.config import ModelConfig, TrainConfig, from_flat, to_flat

ARRAYS = "arrays"  # the one ArrayRecord: component-prefixed keys (see shared_models.codec)
CONFIG = "config"
METRICS = "metrics"

NUM_EXAMPLES = "num-examples"  # Flower's own weighting key, kept for its stock strategies
SERVER_ROUND = "server-round"


def examples_key(component: str) -> str:
    """Metric key: examples that trained ``component`` (a hospital without CT has 0 for a CT D)."""
    return f"num-examples-{component}"


# Scalar metrics a hospital may report; anything else in a reply is rejected by the coordinator.
TRAIN_METRICS = ("loss-g", "loss-d", "d-real", "d-fake", "train-seconds", "steps",
                 "images-per-second", "data-seconds", "loss-gp", "w-distance", "loss-l1",
                 "loss-cycle", "loss-identity")
EVAL_METRICS = ("eval-d-real", "eval-d-fake", "eval-frechet", "eval-mmd", "eval-examples",
                "eval-ssim", "eval-psnr", "eval-mae")

# ConfigRecord entries the strategy writes so a hospital knows what to send back.
REPLY_COMPONENTS = "reply-components"  # components whose arrays the reply must carry
LOCAL_NORM_COMPONENTS = "local-norm-components"  # of those, norm-layer entries stay at home


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
