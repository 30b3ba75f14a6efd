"""`make bench-segmentation` reduced: the four conditions run end to end (federated aae + maskgan,
synthetic pairs from the global models, U-Nets), Dice in [0, 1], the learning curve at the kept
maskgan rounds (table and PNG), the bench's last line printed."""

from __future__ import annotations

import numpy as np
import pytest

from bench.segmentation import curve_rounds, dice, plot_curve, run


def test_dice_counts_overlap() -> None:
    t = np.zeros((2, 1, 4, 4))
    t[0, 0, :2] = 1
    p = t.copy()
    p[0, 0, 0] = 0  # half the lesion found
    assert dice(p, t) == pytest.approx(2 * 4 / (4 + 8))
    assert dice(np.zeros_like(t), np.zeros_like(t)) == 1.0


@pytest.mark.slow
def test_reduced_segmentation_bench_runs_every_condition(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lines: list[str] = []
    out = run(hospitals=2, size=16, rounds=2, local_steps=1, small=4, synthetic=8,
              unet_steps=3, seeds=1, width=4, aae_rounds=1, aae_local_steps=1, curve_points=2,
              log=lines.append)
    assert set(out["scores"]) == {"(a) small hospital real", "(b) small real + federated synthetic",
                                  "(c) federated synthetic only", "(d) all hospitals real, pooled"}
    assert all(0.0 <= v[0] <= 1.0 for v in out["scores"].values())
    assert lines[-1].startswith("segmentation gain (b)-(a)") and "synthetic-only / pooled" in lines[-1]
    # the curve: both kept rounds scored, the last one is the rows' (b) and (c)
    assert [p["steps"] for p in out["curve"]] == [1, 2]
    assert out["curve"][-1]["b"] == out["scores"]["(b) small real + federated synthetic"]
    assert out["curve"][-1]["c"] == out["scores"]["(c) federated synthetic only"]
    assert all(0.0 <= p["checkerboard"] <= 1.0 for p in out["curve"])
    assert any(line.startswith("| maskgan steps per hospital |") for line in lines)
    assert sum(line.startswith("| 1 |") or line.startswith("| 2 |") for line in lines) == 2
    assert any(line.startswith("checkerboard score") for line in lines)
    png = plot_curve(tmp_path / "curve.png", out, "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curve_rounds_spread_along_the_run_and_end_at_the_last() -> None:
    assert curve_rounds(list(range(1, 41)), 4) == [10, 20, 30, 40]
    assert curve_rounds([1, 2, 3], 5) == [1, 2, 3]
    assert curve_rounds([3], 4) == [3]
