"""Reply validation: nothing reaches the aggregate unless it fits the global model exactly.

A rejected reply is logged with its reason and counted; the round goes on with the rest.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from fedsynth import protocol
from flwr.app import RecordDict

from .aggregation import Update, update_norm

NORM_OUTLIER_RATIO = 10.0  # a reply moving the model > 10x the median reply's distance is dropped


class RejectedReply(ValueError):
    """Why one hospital's reply was not aggregated (the message names the key or value).

    ``kind`` is a short fixed label (``missing-key``, ``extra-key``, ``shape``, ``dtype``,
    ``non-finite``, ``norm``, ``metric``, ``no-record``) for counters and metric labels: it never
    carries text from the reply itself.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def validate_train_reply(
    content: RecordDict,
    expected: Mapping[str, np.ndarray],
    components: tuple[str, ...],
) -> tuple[Update, dict[str, float]]:
    """Check a train reply against the expected arrays; return the update and its metrics.

    ``expected`` maps each key the hospital must send to an array of the right shape and a float
    or integer dtype. Floating arrays may come as float32 or float16 (the wire format).
    """
    if protocol.ARRAYS not in content.array_records:
        raise RejectedReply("no-record", "reply has no arrays record")
    if protocol.METRICS not in content.metric_records:
        raise RejectedReply("no-record", "reply has no metrics record")
    arrays = protocol.from_record(content.array_records[protocol.ARRAYS])
    missing = set(expected) - set(arrays)
    extra = set(arrays) - set(expected)
    if missing:
        raise RejectedReply("missing-key",
                            f"missing key {sorted(missing)[0]!r} ({len(missing)} missing)")
    if extra:
        raise RejectedReply("extra-key",
                            f"unexpected key {sorted(extra)[0]!r} ({len(extra)} extra)")
    for key, ref in expected.items():
        got = arrays[key]
        if got.shape != ref.shape:
            raise RejectedReply("shape", f"key {key!r}: shape {got.shape} != {ref.shape}")
        if np.issubdtype(ref.dtype, np.floating):
            if got.dtype not in (np.float32, np.float16):
                raise RejectedReply("dtype",
                                    f"key {key!r}: dtype {got.dtype} is not float32/float16")
            if not np.isfinite(got).all():
                raise RejectedReply("non-finite", f"key {key!r}: contains NaN or Inf")
            arrays[key] = got.astype(ref.dtype)
        elif got.dtype != ref.dtype:
            raise RejectedReply("dtype", f"key {key!r}: dtype {got.dtype} != {ref.dtype}")
    metrics = {k: float(v) for k, v in content.metric_records[protocol.METRICS].items()
               if isinstance(v, (int, float))}
    examples = {}
    for component in components:
        n = metrics.get(protocol.examples_key(component), metrics.get(protocol.NUM_EXAMPLES, 0.0))
        if not np.isfinite(n) or n < 0:
            raise RejectedReply("metric",
                                f"metric {protocol.examples_key(component)!r}: bad value {n}")
        examples[component] = n
    return Update(arrays=arrays, examples=examples), metrics


def norm_outliers(
    updates: Mapping[str, Update],
    reference: Mapping[str, np.ndarray],
    ratio: float = NORM_OUTLIER_RATIO,
) -> dict[str, str]:
    """Replies whose update norm is more than ``ratio`` x the median of all replies' norms.

    Returns ``{hospital: reason}``. Needs at least three replies (with two, neither is "far beyond
    the others"); a median of 0 (nobody moved) flags any reply that moved at all.
    """
    if len(updates) < 3:
        return {}
    norms = {h: update_norm(u.arrays, reference) for h, u in updates.items()}
    median = float(np.median(list(norms.values())))
    return {h: f"update norm {n:.3g} > {ratio:g} x median {median:.3g}"
            for h, n in norms.items() if n > ratio * median}
