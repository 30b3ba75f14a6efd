"""`make bench-segmentation` reduced: the four conditions run end to end (federated aae + maskgan,
synthetic pairs from the global models, U-Nets), Dice in [0, 1], the bench's last line printed."""

from __future__ import annotations

import numpy as np
import pytest

from bench.segmentation import dice, run


def test_dice_counts_overlap() -> None:
    t = np.zeros((2, 1, 4, 4))
    t[0, 0, :2] = 1
    p = t.copy()
    p[0, 0, 0] = 0  # half the lesion found
    assert dice(p, t) == pytest.approx(2 * 4 / (4 + 8))
    assert dice(np.zeros_like(t), np.zeros_like(t)) == 1.0


@pytest.mark.slow
def test_reduced_segmentation_bench_runs_every_condition() -> None:
    lines: list[str] = []
    out = run(hospitals=2, size=16, rounds=1, local_steps=1, small=4, synthetic=8,
              unet_steps=3, seeds=1, width=4, aae_rounds=1, aae_local_steps=1,
              log=lines.append)
    assert set(out["scores"]) == {"(a) small hospital real", "(b) small real + federated synthetic",
                                  "(c) federated synthetic only", "(d) all hospitals real, pooled"}
    assert all(0.0 <= v[0] <= 1.0 for v in out["scores"].values())
    assert lines[-1].startswith("segmentation gain (b)-(a)") and "synthetic-only / pooled" in lines[-1]
