"""``make bench-privacy`` at reduced size: it runs the three arms side by side on labelled lesion
slices, the DP arms spend what they target (the hospital's accountant) and their epsilon grows
along the learning curve, the PNG is written, and the last line carries the numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from bench.privacy import _auc, _nearest, lesion_slices, main


def test_privacy_bench_reduced(tmp_path: Path, capsys) -> None:
    out, png = tmp_path / "privacy.json", tmp_path / "curve.png"
    assert main(["--seeds", "1", "--members", "12", "--size", "32", "--width", "4",
                 "--latent", "8", "--steps", "4", "--batch", "4", "--generated", "6",
                 "--frd-images", "6", "--synthetic-per-class", "2", "--clf-steps", "2",
                 "--curve-points", "2", "--jobs", "1", "--plot", str(png),
                 "--json", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("at eps=8: LOGAN AUC ") and "utility ratio to no DP" in lines[-1]
    assert lines[-2].startswith("at eps=1: LOGAN AUC ")
    assert png.stat().st_size > 0
    saved = json.loads(out.read_text())
    result = saved["summary"]
    assert set(result) == {"no DP", "eps=8", "eps=1"}
    for arm, target in (("eps=8", 8.0), ("eps=1", 1.0)):
        assert 0.8 * target < result[arm]["epsilon"] <= target * 1.001
        curve = [p for p in saved["curve"] if p["arm"] == arm]
        assert [p["steps"] for p in curve] == [2, 4]
        assert 0 < curve[0]["epsilon"] < curve[1]["epsilon"]  # spent so far, along the run
    assert result["eps=1"]["sigma"] > result["eps=8"]["sigma"] > 0 == result["no DP"]["sigma"]
    for arm in result.values():
        assert 0 <= arm["logan_auc"] <= 1 and 0 <= arm["ganleaks_auc"] <= 1
        assert arm["frd"] >= 0 and 0 <= arm["tstr_bacc"] <= 1
    assert result["no DP"]["utility_ratio"] == 1.0
    assert result["no DP"]["tstr_ratio"] == result["no DP"]["frd_ratio"] == 1.0
    for arm in ("eps=8", "eps=1"):  # the lower of the two ratios
        r = result[arm]
        assert r["utility_ratio"] <= max(r["tstr_ratio"], r["frd_ratio"])
    (real,) = saved["rows"]["real members"]
    assert 0 <= real["bacc"] <= 1


def test_lesion_slices_are_labelled_and_normalised() -> None:
    data = lesion_slices(60, 32, seed=0)
    assert data["image"].shape == (60, 1, 32, 32)
    assert -1 <= float(data["image"].min()) < float(data["image"].max()) <= 1
    counts = np.bincount(data["label"].numpy(), minlength=3)
    assert counts.tolist() == [30, 18, 12]  # hospital-1's class mix, 50 / 30 / 20 %
    assert torch.equal(lesion_slices(60, 32, seed=0)["image"], data["image"])


def test_ganleaks_finds_a_generator_that_copies_its_members() -> None:
    data = lesion_slices(40, 32, seed=1)
    members = {k: v[:20] for k, v in data.items()}
    nonmembers = {k: v[20:] for k, v in data.items()}
    assert _auc(-_nearest(members, members), -_nearest(nonmembers, members)) == 1.0
