"""The aggregation rule, as pure functions over numpy arrays (no Flower), tested by hand.

FedGAN (Rasouli et al. 2020): every shared component is the average of the hospitals' copies,
each hospital weighted by the examples that trained *that* component — so a hospital that holds no
CT contributes nothing to a CT discriminator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from shared_models.codec import split_key


@dataclass(frozen=True)
class Update:
    """One hospital's reply after validation: arrays and per-component example counts."""

    arrays: Mapping[str, np.ndarray]
    examples: Mapping[str, float]  # component -> examples that trained it


def weighted_mean(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted mean in float64, returned in the first array's dtype.

    Integer buffers (``num_batches_tracked``) are rounded back to integers.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        raise ValueError("weights sum to zero")
    acc = sum(a.astype(np.float64) * wi for a, wi in zip(arrays, w / w.sum()))
    dtype = arrays[0].dtype
    if not np.issubdtype(dtype, np.floating):
        acc = np.rint(acc)
    return np.asarray(acc, dtype=dtype)


def aggregate(updates: Sequence[Update], components: Sequence[str]) -> dict[str, np.ndarray]:
    """Per component, the example-weighted mean over the updates that carry it with weight > 0.

    A component that no update trained is absent from the result (the caller keeps the old one).
    """
    out: dict[str, np.ndarray] = {}
    for component in components:
        carriers = [u for u in updates if u.examples.get(component, 0) > 0
                    and any(split_key(k)[0] == component for k in u.arrays)]
        if not carriers:
            continue
        keys = [k for k in carriers[0].arrays if split_key(k)[0] == component]
        weights = [u.examples[component] for u in carriers]
        for key in keys:
            out[key] = weighted_mean([u.arrays[key] for u in carriers], weights)
    return out
