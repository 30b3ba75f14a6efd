"""The coordinator's moving average of the aggregated generator across rounds (``server-ema-decay``).

After each round's aggregation: ema <- decay * ema + (1 - decay) * aggregate, per floating array
of the family's ``ema_components`` (its generators), starting at round 1's aggregate (not at the
untrained weights, which would bias a short run toward noise). Training goes on from the raw
aggregate: hospitals never receive the average, so it changes nothing they compute. The round's
sample grid is drawn from the average, and each checkpoint stores it beside the raw weights under
``EMA_PREFIX`` keys: ``load_checkpoint(path, ema=True)`` (what ``fedsynth sample`` reads) gives
the average in place of the generator, ``load_checkpoint(path)`` the raw weights a resumed run
continues from.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

EMA_PREFIX = "ema:"  # checkpoint keys "ema:generator.body.0.weight"


class ServerEMA:
    """``components``: what the average keeps, the family's ``ema_components``."""

    def __init__(self, decay: float, components: Iterable[str],
                 state: Mapping[str, np.ndarray] | None = None) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"server-ema-decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.components = frozenset(components)
        self.arrays: dict[str, np.ndarray] | None = (
            {k: np.array(v, copy=True) for k, v in state.items()} if state else None)

    @property
    def active(self) -> bool:
        return self.decay > 0

    def update(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Fold in a round's aggregate (only its generator arrays are kept)."""
        if not self.active:
            return
        gen = {k: v for k, v in arrays.items() if k.partition(".")[0] in self.components}
        if self.arrays is None or set(self.arrays) != set(gen):
            self.arrays = {k: np.array(v, copy=True) for k, v in gen.items()}
            return
        for k, v in gen.items():
            if np.issubdtype(v.dtype, np.floating):
                ema = self.arrays[k]
                self.arrays[k] = (self.decay * ema.astype(np.float64)
                                  + (1 - self.decay) * v.astype(np.float64)).astype(v.dtype)
            else:  # counters (num_batches_tracked): the latest
                self.arrays[k] = np.array(v, copy=True)

    def overlay(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``arrays`` with the generator replaced by its average (as is when off or empty)."""
        out = dict(arrays)
        if self.active and self.arrays:
            out.update({k: v for k, v in self.arrays.items() if k in out})
        return out

    def checkpoint_arrays(self) -> dict[str, np.ndarray]:
        """The average under ``EMA_PREFIX`` keys, for the round's checkpoint."""
        if not self.active or not self.arrays:
            return {}
        return {EMA_PREFIX + k: v for k, v in self.arrays.items()}


def split_ema(arrays: Mapping[str, np.ndarray]
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A checkpoint's arrays -> (raw weights, the average's arrays without the prefix)."""
    raw = {k: v for k, v in arrays.items() if not k.startswith(EMA_PREFIX)}
    ema = {k[len(EMA_PREFIX):]: v for k, v in arrays.items() if k.startswith(EMA_PREFIX)}
    return raw, ema
