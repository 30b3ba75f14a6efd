"""A reduced ``make bench-quality``: the whole pipeline runs and its figures are sane."""

from __future__ import annotations

import math

import pytest

from bench.quality import PRESETS, BenchConfig, hospital_data, run, table


def test_data_split_is_non_iid_and_held_out() -> None:
    train, held = hospital_data(BenchConfig(hospitals=2, image_size=16))
    assert len(train) == 2 and len(held["a"]) > 0
    assert train[0]["a"].shape[1:] == (1, 16, 16) and train[0]["a"].min() >= -1.0
    # different scanner settings: the two hospitals' mean T2w intensities differ
    assert abs(float(train[0]["b"].mean() - train[1]["b"].mean())) > 1e-3


@pytest.mark.slow
def test_reduced_benchmark_runs_every_row() -> None:
    cfg = BenchConfig(hospitals=2, image_size=16, width=4, rounds=1, local_steps=2, batch=2)
    rows, fed_ratio, alone_ratio = run(cfg)
    assert set(rows) == {"centralized", "hospital-1 alone", "hospital-2 alone", *PRESETS}
    for r in rows.values():
        assert -1.0 <= r["ssim"] <= 1.0 and r["mae"] >= 0 and math.isfinite(r["psnr"])
    assert fed_ratio > 0 and alone_ratio > 0
    assert "| fedbn |" in table(rows)
