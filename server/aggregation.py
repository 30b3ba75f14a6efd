"""The aggregation rules, as pure functions over numpy arrays (no Flower), tested by hand.

Every component of a GAN family gets its own ``ComponentPolicy``: shared or kept at the hospital,
weighting, sync schedule, normalisation layers shared or local (FedBN), reducer and server
optimizer. FedGAN (Rasouli et al. 2020) is the default policy: every shared component is the
average of the hospitals' copies, each weighted by the examples that trained *that* component —
so a hospital that holds no CT contributes nothing to a CT discriminator.

Why not Flower's ``FedMedian`` / ``FedTrimmedAvg`` / ``FedAvgM`` / ``FedAdam`` directly: each
applies one rule to the whole ``ArrayRecord`` with one weight per reply, while a GAN needs a
different rule and a different weight per component (a hospital without domain B has weight 0 for
``d_b`` only), and their server-optimizer state spans all keys. The math below follows theirs (see
``flwr/serverapp/strategy/{fedmedian,fedtrimmedavg,fedavgm,fedadam}.py``) key by key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence, get_args

import numpy as np

from shared_models.codec import norm_state_keys, split_key  # noqa: F401 (re-exported)

from .run_rules import REDUCERS, SERVER_OPTS, Reducer, ServerOpt  # noqa: F401 (re-exported)

Weighting = Literal["examples", "uniform"]
# The registries of rules (REDUCERS, SERVER_OPTS): the run setting's choices come from them,
# declared torch-free in server/run_rules.py for `fedsynth launch`'s check.


@dataclass(frozen=True)
class Update:
    """One hospital's reply after validation: arrays and per-component example counts."""

    arrays: Mapping[str, np.ndarray]
    examples: Mapping[str, float]  # component -> examples that trained it
    # training slices per class (class-weighted-aggregation); None: not sent (a hospital that
    # requires DP keeps them home), its class rows then weigh as an even mix of its examples
    class_examples: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ComponentPolicy:
    """How one component (``generator``, ``d_b``, ...) is federated.

    ``shared`` False keeps the component at each hospital: the coordinator never sends nor receives
    it. ``sync_every`` k aggregates it on rounds k, 2k, ... (hospitals train their own copy in
    between) and sends the fresh aggregate at the start of the following round. ``local_norm``
    (FedBN, Li et al. 2021) keeps normalisation parameters and buffers at each hospital.
    ``server_opt`` steps the global copy along the pseudo-gradient (aggregate - global):
    ``avg`` takes the aggregate, ``avgm`` is FedAvgM (Hsu et al. 2019), ``adam`` is FedAdam
    (Reddi et al. 2021, Alg. 2).
    """

    shared: bool = True
    weighting: Weighting = "examples"
    sync_every: int = 1
    local_norm: bool = False
    reducer: Reducer = "mean"
    trim_beta: float = 0.2  # fraction cut at each end by the trimmed mean
    server_opt: ServerOpt = "avg"
    server_lr: float = 1.0  # eta: 1.0 with avg/avgm reproduces the aggregate; FedAdam uses ~1e-2
    server_momentum: float = 0.9  # FedAvgM's beta
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {self.sync_every}")
        if self.weighting not in ("examples", "uniform"):
            raise ValueError(f"weighting must be 'examples' or 'uniform', got {self.weighting!r}")
        if self.reducer not in REDUCERS:
            raise ValueError(f"reducer must be {', '.join(REDUCERS)}, got {self.reducer!r}")
        if not 0.0 <= self.trim_beta < 0.5:
            raise ValueError(f"trim_beta must be in [0, 0.5), got {self.trim_beta}")
        if self.server_opt not in SERVER_OPTS:
            raise ValueError(f"server_opt must be {', '.join(SERVER_OPTS)}, got "
                             f"{self.server_opt!r}")
        if self.server_lr <= 0 or not 0 <= self.server_momentum < 1:
            raise ValueError("server_lr must be > 0 and server_momentum in [0, 1)")

    def sends(self, server_round: int) -> bool:
        """Whether the global copy goes out at the start of ``server_round`` (1-based)."""
        return self.shared and (server_round - 1) % self.sync_every == 0

    def collects(self, server_round: int) -> bool:
        """Whether hospitals send this component back (and it is aggregated) in ``server_round``."""
        return self.shared and server_round % self.sync_every == 0


@dataclass
class ServerOptState:
    """Per-key state of the server optimizers (momentum, Adam moments), kept between rounds."""

    momentum: dict[str, np.ndarray] = field(default_factory=dict)
    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)


class NonFiniteAggregate(ArithmeticError):
    """An aggregate that overflowed its dtype or is not finite: the caller keeps the old copy."""


def weighted_mean(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted mean in float64, returned in the first array's dtype.

    Weights are normalised by their largest first, so counts up to float64's maximum cannot
    overflow the sum. Integer buffers (``num_batches_tracked``) are rounded back to integers.
    """
    w = np.asarray(weights, dtype=np.float64)
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be finite, >= 0 and not all zero")
    w = w / w.max()
    w = w / w.sum()
    with np.errstate(over="ignore", invalid="ignore"):
        acc = sum(a.astype(np.float64) * wi for a, wi in zip(arrays, w))
    return _cast_like(np.asarray(acc), arrays[0].dtype)


def coordinate_median(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Coordinate-wise median (Yin et al. 2018; Flower's FedMedian): ignores example weights."""
    stacked = np.stack([a.astype(np.float64) for a in arrays])
    return _cast_like(np.median(stacked, axis=0), arrays[0].dtype)


def trimmed_mean(arrays: Sequence[np.ndarray], beta: float) -> np.ndarray:
    """Coordinate-wise mean after cutting ``int(beta * n)`` values at each end (FedTrimmedAvg)."""
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trim beta must be in [0, 0.5), got {beta}")
    stacked = np.stack([a.astype(np.float64) for a in arrays])
    n = len(arrays)
    cut = int(beta * n)
    ordered = np.sort(stacked, axis=0)
    return _cast_like(ordered[cut:n - cut].mean(axis=0), arrays[0].dtype)


def class_shares(update: Update, num_classes: int) -> np.ndarray:
    """The share of each class in ``update``'s training slices; an even split where it sent no
    (or no usable) counts, so a hospital without counts weighs as under ordinary FedAvg."""
    counts = update.class_examples
    if counts is not None and len(counts) == num_classes and sum(counts) > 0:
        c = np.asarray(counts, dtype=np.float64)
        return c / c.sum()
    return np.full(num_classes, 1.0 / num_classes)


def class_weighted_mean(arrays: Sequence[np.ndarray], weights: Sequence[float],
                        shares: Sequence[np.ndarray], where: tuple[int, int]) -> np.ndarray:
    """The weighted mean, except class c's slice (index start + c along axis, ``where``), which
    is weighted by each hospital's examples x its share of class c: a hospital that trained no
    slice of class c leaves that class's rows to those that did. A class nobody trained keeps
    the ordinary weights."""
    axis, start = where
    out = weighted_mean(arrays, weights).copy()
    for c in range(len(shares[0])):
        w = [wi * float(s[c]) for wi, s in zip(weights, shares)]
        if sum(w) <= 0:
            continue
        index = tuple(start + c if d == axis else slice(None) for d in range(out.ndim))
        out[index] = weighted_mean([a[index] for a in arrays], w)
    return out


def reduce(arrays: Sequence[np.ndarray], weights: Sequence[float],
           policy: ComponentPolicy) -> np.ndarray:
    """One key's aggregate under ``policy``'s reducer (weights matter for the mean only)."""
    if policy.reducer == "median":
        return coordinate_median(arrays)
    if policy.reducer == "trimmed-mean":
        return trimmed_mean(arrays, policy.trim_beta)
    if policy.weighting == "uniform":
        weights = [1.0] * len(arrays)
    return weighted_mean(arrays, weights)


def server_step(key: str, current: np.ndarray, aggregate_: np.ndarray, policy: ComponentPolicy,
                state: ServerOptState) -> np.ndarray:
    """Move the global copy of ``key`` toward the aggregate with the policy's server optimizer.

    With Δ = aggregate - current (the negative pseudo-gradient):
    avg: current + Δ; FedAvgM: v = β v + Δ (v = Δ in the first round), current + η v;
    FedAdam: m = β1 m + (1-β1) Δ, v = β2 v + (1-β2) Δ², current + η m / (√v + τ).
    Integer buffers (``num_batches_tracked``) always take the aggregate.
    """
    if policy.server_opt == "avg" and policy.server_lr == 1.0:
        return aggregate_
    if not np.issubdtype(current.dtype, np.floating):
        return aggregate_
    x = current.astype(np.float64)
    delta = aggregate_.astype(np.float64) - x
    with np.errstate(over="ignore", invalid="ignore"):
        return _cast_like(_step(key, x, delta, policy, state), current.dtype)


def _step(key: str, x: np.ndarray, delta: np.ndarray, policy: ComponentPolicy,
          state: ServerOptState) -> np.ndarray:
    if policy.server_opt == "avg":
        step = delta
    elif policy.server_opt == "avgm":
        prev = state.momentum.get(key)
        step = delta if prev is None else policy.server_momentum * prev + delta
        state.momentum[key] = step
    else:
        m = state.m.get(key, np.zeros_like(x))
        v = state.v.get(key, np.zeros_like(x))
        m = policy.adam_beta1 * m + (1 - policy.adam_beta1) * delta
        v = policy.adam_beta2 * v + (1 - policy.adam_beta2) * delta**2
        state.m[key], state.v[key] = m, v
        step = m / (np.sqrt(v) + policy.adam_tau)
    return x + policy.server_lr * step


def aggregate(
    updates: Sequence[Update],
    components: Sequence[str],
    policies: Mapping[str, ComponentPolicy] | None = None,
    current: Mapping[str, np.ndarray] | None = None,
    state: ServerOptState | None = None,
    refused: list[str] | None = None,
    class_slices: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, np.ndarray]:
    """Per component, the reduced update over the replies that trained it (weight > 0).

    ``class_slices`` (key -> (axis, start), the family's ``class_slices``): under an
    example-weighted mean those keys' class slices are weighted per class
    (``class_weighted_mean``, class-weighted-aggregation); every other key as before.

    ``policies`` defaults to FedGAN for every component; a server optimizer other than plain
    averaging needs ``current`` (the global arrays before the round) and a ``state``. A component
    that no update trained is absent from the result (the caller keeps the old one), and so is
    one whose aggregate is not finite in its dtype: its name is appended to ``refused``.
    Server-optimizer state is only kept for components whose aggregate is accepted.
    """
    out: dict[str, np.ndarray] = {}
    state = state if state is not None else ServerOptState()
    for component in components:
        policy = (policies or {}).get(component, ComponentPolicy())
        carriers = [u for u in updates if u.examples.get(component, 0) > 0
                    and any(split_key(k)[0] == component for k in u.arrays)]
        if not carriers:
            continue
        keys = [k for k in carriers[0].arrays if split_key(k)[0] == component]
        weights = [u.examples[component] for u in carriers]
        trial = ServerOptState({k: v for k, v in state.momentum.items() if k in keys},
                               {k: v for k, v in state.m.items() if k in keys},
                               {k: v for k, v in state.v.items() if k in keys})
        merged_c: dict[str, np.ndarray] = {}
        try:
            for key in keys:
                where = (class_slices or {}).get(key)
                if (where is not None and policy.reducer == "mean"
                        and policy.weighting == "examples"):
                    k = carriers[0].arrays[key].shape[where[0]] - where[1]
                    merged = class_weighted_mean([u.arrays[key] for u in carriers], weights,
                                                 [class_shares(u, k) for u in carriers], where)
                else:
                    merged = reduce([u.arrays[key] for u in carriers], weights, policy)
                if current is not None and key in current:
                    merged = server_step(key, current[key], merged, policy, trial)
                merged_c[key] = merged
        except NonFiniteAggregate:
            if refused is not None:
                refused.append(component)
            continue
        out.update(merged_c)
        state.momentum.update(trial.momentum)
        state.m.update(trial.m)
        state.v.update(trial.v)
    return out


def update_norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of (reply - global) over the floating keys: how far one hospital moved the model."""
    total = 0.0
    for key, ref in reference.items():
        if key in arrays and np.issubdtype(ref.dtype, np.floating):
            total += float(((arrays[key].astype(np.float64) - ref.astype(np.float64)) ** 2).sum())
    return float(np.sqrt(total))


def _cast_like(acc: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``acc`` (float64) in ``dtype``; ``NonFiniteAggregate`` if it is not finite there."""
    acc = np.asarray(acc, dtype=np.float64)
    if not np.isfinite(acc).all():
        raise NonFiniteAggregate("aggregate is not finite")
    if not np.issubdtype(dtype, np.floating):
        acc = np.rint(acc)
        info = np.iinfo(dtype)
        # float64 of iinfo.max rounds up past it; stay a margin inside the range
        if (acc < float(info.min)).any() or (acc >= float(info.max)).any():
            raise NonFiniteAggregate(f"aggregate out of the range of {np.dtype(dtype)}")
        return acc.astype(dtype)
    with np.errstate(over="ignore"):
        out = acc.astype(dtype)
    if not np.isfinite(out).all():
        raise NonFiniteAggregate(f"aggregate overflows {np.dtype(dtype)}")
    return out
