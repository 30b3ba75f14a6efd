"""Reply validation: nothing reaches the aggregate unless it fits the global model exactly.

A rejected reply is logged with its reason and counted; the round goes on with the rest.

Beyond shape and dtype, what a hospital claims is bounded by what the coordinator knows:

* its update per component may move that component at most ``UPDATE_NORM_RATIO`` x (the global
  component's norm + ``NORM_FLOOR_RMS`` per element) away from the global model (works with one
  reply); ``norm_outliers`` rejects a reply moving a component more than ``NORM_OUTLIER_RATIO`` x
  the median of the *other* replies (works with two);
* with ``max-update-norm`` set, each update per component is clipped to that norm
  (``clip_updates``) before aggregation;
* normalisation statistics must be usable: ``running_var`` finite and >= 0, ``running_mean``
  finite, ``num_batches_tracked`` in [0, 2**53];
* its example count per component is clipped (``cap_examples``) to ``EXAMPLES_RATIO`` x the median
  of the other replies' counts for that component and to ``MAX_EXAMPLES``;
* only metric keys of the protocol are kept (``known_metrics``), the others are counted.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import replace
from typing import Any, Iterable, Mapping

import numpy as np

from protocol import records as protocol
from flwr.app import RecordDict
from shared_models.codec import CodecError, dequantize_update, is_int8_reply, split_key

from .aggregation import Update, update_norm

NORM_OUTLIER_RATIO = 10.0  # a reply moving the model > 10x the median reply's distance is dropped
# UPDATE_NORM_RATIO, NORM_FLOOR_RMS, EXAMPLES_RATIO, MAX_EXAMPLES: the run settings' defaults,
# declared torch-free for `fedsynth launch`'s check
from .run_rules import EXAMPLES_RATIO, MAX_EXAMPLES, NORM_FLOOR_RMS, UPDATE_NORM_RATIO  # noqa: F401
MAX_BATCHES_TRACKED = 2**53  # num_batches_tracked beyond this no longer round-trips float64

DROPPED_METRIC_KEYS = "dropped-metric-keys"  # ``notes`` counter: metric keys not kept


class RejectedReply(ValueError):
    """Why one hospital's reply was not aggregated (the message names the key or value).

    ``kind`` is a short fixed label (``decode``, ``missing-key``, ``extra-key``, ``shape``,
    ``dtype``, ``non-finite``, ``norm-stats``, ``norm``, ``metric``, ``no-record``, ``int8``,
    ``class-counts``) for counters
    and metric labels: it never carries text from the reply itself.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def number(value: Any) -> float | None:
    """A metric value as a float (an int beyond float range becomes +-inf); None if not a number."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if isinstance(value, float):
        return value
    return None


def train_metric_keys(components: Iterable[str], num_classes: int = 0) -> frozenset[str]:
    """Metric keys a train reply may carry: the protocol's lists (a train reply also carries the
    evaluation of the model it received, when the message asked for it), the example counts,
    and with ``num_classes`` (a class-weighted run asked for them) the per-class counts."""
    return frozenset((*protocol.TRAIN_METRICS, *protocol.EVAL_METRICS, protocol.NUM_EXAMPLES,
                      *(protocol.examples_key(c) for c in components),
                      *(protocol.class_examples_key(k) for k in range(num_classes))))


def class_counts(record: Any, num_classes: int, total: float) -> tuple[float, ...] | None:
    """A reply's per-class training-slice counts, checked; None when it sent none (a hospital
    that requires DP keeps them home). ``RejectedReply("class-counts")`` for a key naming no
    class of the run, a count that is not a whole number in [0, MAX_EXAMPLES], counts for only
    some classes, or counts that do not add up to the reply's ``num-examples`` (``total``)."""
    found: dict[int, float] = {}
    for key, value in list(record.items()):
        if not (isinstance(key, str) and key.startswith(protocol.CLASS_EXAMPLES_PREFIX)):
            continue
        suffix = key[len(protocol.CLASS_EXAMPLES_PREFIX):]
        if not (suffix.isascii() and suffix.isdigit() and int(suffix) < num_classes):
            raise RejectedReply("class-counts", f"class count key {key[:80]!r} names no class "
                                                f"0..{num_classes - 1} of this run")
        v = number(value)
        if v is None or not math.isfinite(v) or v < 0 or v != int(v) or v > MAX_EXAMPLES:
            raise RejectedReply("class-counts", f"metric {key!r}: {str(value)[:40]} is not a "
                                                f"whole number in [0, {MAX_EXAMPLES:g}]")
        found[int(suffix)] = v
    if not found:
        return None
    if len(found) != num_classes:
        raise RejectedReply("class-counts", f"class counts for {len(found)} of the run's "
                                            f"{num_classes} classes")
    if sum(found.values()) != total:
        raise RejectedReply("class-counts", f"class counts add up to {sum(found.values()):g}, "
                                            f"not the reply's num-examples {total:g}")
    return tuple(found[k] for k in range(num_classes))


EVAL_METRIC_KEYS = frozenset((*protocol.EVAL_METRICS, protocol.NUM_EXAMPLES))


def known_metrics(record: Any, allowed: frozenset[str]) -> tuple[dict[str, float], int]:
    """The numeric metrics of ``record`` whose key is in ``allowed``, and how many were dropped.

    A key a hospital invented (or a value that is not a number) never reaches metrics.jsonl.
    """
    out: dict[str, float] = {}
    dropped = 0
    try:
        items = list(record.items())
    except Exception:  # noqa: BLE001 - a hostile record
        raise RejectedReply("decode", "metrics record cannot be read") from None
    for key, value in items:
        v = number(value)
        if not isinstance(key, str) or key not in allowed or v is None:
            dropped += 1
            continue
        out[key] = v
    return out, dropped


def _stat_name(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def check_norm_stats(arrays: Mapping[str, np.ndarray], norm_keys: frozenset[str] = frozenset()
                     ) -> None:
    """Normalisation buffers a BatchNorm can use: raises ``RejectedReply("norm-stats")``.

    A key counts when it is in ``norm_keys`` (``shared_models.codec.norm_state_keys``) or, when
    none are given, by its name (``running_var``, ``running_mean``, ``num_batches_tracked``).
    A ``running_var`` of 0 is accepted: float16 transport flushes tiny variances to 0 and
    BatchNorm adds its eps; a negative one makes NaN.
    """
    for key, a in arrays.items():
        if norm_keys and key not in norm_keys:
            continue
        name = _stat_name(key)
        if name == "running_var":
            if not (np.isfinite(a).all() and (a >= 0).all()):
                raise RejectedReply("norm-stats", f"key {key!r}: running_var not finite and >= 0")
        elif name == "running_mean":
            if not np.isfinite(a).all():
                raise RejectedReply("norm-stats", f"key {key!r}: running_mean not finite")
        elif name == "num_batches_tracked":
            if not ((a >= 0).all() and (a <= MAX_BATCHES_TRACKED).all()):
                raise RejectedReply("norm-stats", f"key {key!r}: num_batches_tracked out of "
                                                  f"[0, 2**53]")


def validate_train_reply(
    content: RecordDict,
    expected: Mapping[str, np.ndarray],
    components: tuple[str, ...],
    *,
    norm_keys: frozenset[str] = frozenset(),
    notes: Counter[str] | None = None,
    int8_base: Mapping[str, np.ndarray] | None = None,
    num_classes: int = 0,
) -> tuple[Update, dict[str, float]]:
    """Check a train reply against the expected arrays; return the update and its metrics.

    ``int8_base``: in a ``wire-dtype = "int8"`` run, the weights the hospital was sent (as it got
    them); an int8 key is its update against them (``shared_models.codec.dequantize_update``,
    which refuses scales that are not finite, negative, beyond ``MAX_INT8_SCALE`` or of the wrong
    shape, and int8 arrays for keys that were not sent). The weights it gives back then go through
    every check below like any other reply. Outside an int8 run an int8 reply is refused.

    ``expected`` maps each key the hospital must send to an array of the right shape and a float
    or integer dtype. Floating arrays may come as float32 or float16 (the wire format). Metric keys
    outside the protocol are dropped (counted in ``notes["dropped-metric-keys"]``).
    ``num_classes`` > 0: the run asked for per-class slice counts (``class_counts``).
    """
    try:
        has_arrays = protocol.ARRAYS in content.array_records
        has_metrics = protocol.METRICS in content.metric_records
    except Exception:  # noqa: BLE001
        raise RejectedReply("decode", "reply content cannot be read") from None
    if not has_arrays:
        raise RejectedReply("no-record", "reply has no arrays record")
    if not has_metrics:
        raise RejectedReply("no-record", "reply has no metrics record")
    try:
        arrays = protocol.from_record(content.array_records[protocol.ARRAYS])
    except ValueError as exc:
        raise RejectedReply("decode", f"arrays do not decode: {exc}") from None
    if is_int8_reply(arrays):
        if int8_base is None:
            raise RejectedReply("int8", "int8 arrays in a run whose wire-dtype is not int8")
        try:
            arrays = dequantize_update(arrays, int8_base)
        except CodecError as exc:
            raise RejectedReply("int8", str(exc)) from None
    missing = set(expected) - set(arrays)
    extra = set(arrays) - set(expected)
    if missing:
        raise RejectedReply("missing-key",
                            f"missing key {sorted(missing)[0]!r} ({len(missing)} missing)")
    if extra:
        raise RejectedReply("extra-key",
                            f"unexpected key {sorted(extra)[0][:80]!r} ({len(extra)} extra)")
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
    check_norm_stats({k: arrays[k] for k in expected}, norm_keys)
    metrics, dropped = known_metrics(content.metric_records[protocol.METRICS],
                                     train_metric_keys(components, num_classes))
    if notes is not None and dropped:
        notes[DROPPED_METRIC_KEYS] += dropped
    examples = {}
    for component in components:
        n = metrics.get(protocol.examples_key(component), metrics.get(protocol.NUM_EXAMPLES, 0.0))
        if not np.isfinite(n) or n < 0:
            raise RejectedReply("metric",
                                f"metric {protocol.examples_key(component)!r}: bad value {n}")
        examples[component] = n
    counts = (class_counts(content.metric_records[protocol.METRICS], num_classes,
                           metrics.get(protocol.NUM_EXAMPLES, 0.0)) if num_classes else None)
    return Update(arrays=arrays, examples=examples, class_examples=counts), metrics


def component_norms(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
                    ) -> dict[str, float]:
    """L2 norm of (reply - global) per component, over the floating keys of ``reference``.

    Per component, so a push on a small discriminator cannot hide under a large generator's norm.
    """
    sums: dict[str, float] = {}
    for key, ref in reference.items():
        if np.issubdtype(ref.dtype, np.floating):
            component = split_key(key)[0]
            delta = (arrays[key].astype(np.float64) - ref.astype(np.float64)
                     if key in arrays else np.zeros(0))
            sums[component] = sums.get(component, 0.0) + float(np.square(delta).sum())
    return {c: math.sqrt(s) for c, s in sums.items()}


def norm_outliers(
    updates: Mapping[str, Update],
    reference: Mapping[str, np.ndarray],
    ratio: float = NORM_OUTLIER_RATIO,
) -> dict[str, str]:
    """Replies that move the model far beyond the others; ``{hospital: reason}``.

    Two rules, either rejects:

    * leave-one-out, per component: a reply's norm > ``ratio`` x the median of the *other*
      replies' norms for that component. Works with two replies (each judged against the other;
      with all replies in the median, one huge reply drags the median up and passes). Only replies
      that trained the component (its example count > 0) are compared;
    * with three or more replies, the whole update's norm > ``ratio`` x the median of all
      replies' norms (stricter for a hospital whose others include the attacker).

    A reference median of 0 (nobody else moved) flags any reply that moved at all.
    """
    out: dict[str, str] = {}
    norms = {h: component_norms(u.arrays, reference) for h, u in updates.items()}
    for component in sorted({c for n in norms.values() for c in n}):
        carriers = {h: norms[h][component] for h, u in updates.items()
                    if u.examples.get(component, 0.0) > 0}
        for hospital, n in carriers.items():
            others = [m for h, m in carriers.items() if h != hospital]
            if others and hospital not in out and n > ratio * statistics.median(others):
                out[hospital] = (f"component {component!r} moved {n:.3g} > {ratio:g} x the "
                                 f"other replies' median {statistics.median(others):.3g}")
    if len(updates) >= 3:
        total = {h: update_norm(u.arrays, reference) for h, u in updates.items()}
        median = float(np.median(list(total.values())))
        out.update({h: f"update norm {n:.3g} > {ratio:g} x median {median:.3g}"
                    for h, n in total.items() if n > ratio * median and h not in out})
    return out


def update_bound(
    updates: Mapping[str, Update],
    reference: Mapping[str, np.ndarray],
    ratio: float = UPDATE_NORM_RATIO,
    floor_rms: float = NORM_FLOOR_RMS,
) -> dict[str, str]:
    """Replies that move some component c further than ``ratio`` x (||global_c|| + floor x
    sqrt(n_c)) from the global model; ``{hospital: reason}``. Needs no other reply."""
    sizes: dict[str, int] = {}
    for key, ref in reference.items():
        if np.issubdtype(ref.dtype, np.floating):
            sizes[split_key(key)[0]] = sizes.get(split_key(key)[0], 0) + ref.size
    zero = {k: np.zeros_like(v) for k, v in reference.items()}
    bounds = {c: ratio * (norm + floor_rms * math.sqrt(sizes[c]))
              for c, norm in component_norms(reference, zero).items()}
    out: dict[str, str] = {}
    for hospital, update in updates.items():
        for component, moved in component_norms(update.arrays, reference).items():
            if not moved <= bounds[component]:
                out[hospital] = (f"component {component!r} moved {moved:.3g} > bound "
                                 f"{bounds[component]:.3g} ({ratio:g} x (global norm + floor))")
                break
    return out


def clip_updates(
    updates: Mapping[str, Update],
    reference: Mapping[str, np.ndarray],
    cap: float,
) -> tuple[dict[str, Update], list[tuple[str, str, float]]]:
    """Each reply's update (reply - global) per component scaled down to L2 norm ``cap``.

    Norm clipping (robust FL, DP-FedAvg): whatever its weight, one hospital then moves a mean
    aggregate of a component by at most ``cap``. ``cap`` <= 0 is off. Returns the updates and
    ``[(hospital, component, norm before)]`` for each clip.
    """
    if cap <= 0:
        return dict(updates), []
    out: dict[str, Update] = {}
    clipped: list[tuple[str, str, float]] = []
    for hospital, update in updates.items():
        arrays = dict(update.arrays)
        for component, norm in component_norms(update.arrays, reference).items():
            if norm <= cap:
                continue
            clipped.append((hospital, component, norm))
            scale = cap / norm
            for key, ref in reference.items():
                if (key in arrays and split_key(key)[0] == component
                        and np.issubdtype(ref.dtype, np.floating)):
                    base = ref.astype(np.float64)
                    arrays[key] = (base + scale * (arrays[key] - base)).astype(ref.dtype)
        out[hospital] = replace(update, arrays=arrays)
    return out, clipped


def cap_examples(
    updates: Mapping[str, Update],
    ratio: float = EXAMPLES_RATIO,
    absolute: float = MAX_EXAMPLES,
) -> tuple[dict[str, Update], list[tuple[str, str, float, float]]]:
    """Each reply's per-component example count clipped to ``absolute`` and to ``ratio`` x the
    median of the other replies' (already clipped) counts for that component.

    Only replies that trained the component (count > 0) are "others". Returns the updates with
    their weights clipped and ``[(hospital, component, claimed, kept)]`` for each clip.
    """
    capped = {h: dict(u.examples) for h, u in updates.items()}
    clipped: list[tuple[str, str, float, float]] = []
    components = {c for u in updates.values() for c in u.examples}
    for component in sorted(components):
        base = {h: min(float(u.examples.get(component, 0.0)), absolute)
                for h, u in updates.items()}
        carriers = {h: n for h, n in base.items() if n > 0}
        for hospital, n in carriers.items():
            others = [m for h, m in carriers.items() if h != hospital]
            kept = min(n, ratio * statistics.median(others)) if others else n
            capped[hospital][component] = kept
            claimed = float(updates[hospital].examples.get(component, 0.0))
            if kept < claimed:
                clipped.append((hospital, component, claimed, kept))
    return ({h: replace(u, examples=capped[h]) for h, u in updates.items()},
            clipped)
