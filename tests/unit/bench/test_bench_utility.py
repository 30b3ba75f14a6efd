"""``make bench-utility`` at a reduced size: every row trained and scored on one held-out real set
drawn from every hospital, the GAN budgets as bench-quality's, the last line the two ratios."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("phantominator")

from bench import utility  # noqa: E402
from fedsynth.lesion_data import LESION_SITES  # noqa: E402

TINY = utility.UtilityConfig(rounds=2, local_steps=2, batch=4, width=8, scale=0.5,
                             synthetic_per_class=4, clf_steps=4, clf_batch=8, curve_points=2)


def test_held_out_set_is_every_hospitals_and_never_trained_on() -> None:
    train, held = utility.load(TINY)
    assert len(train) == len(LESION_SITES)
    pooled = torch.cat([t["image"] for t in train]).flatten(1)
    held_flat = held["image"].flatten(1)
    # no held-out slice equals a training slice
    assert not (torch.cdist(held_flat, pooled).min(1).values < 1e-6).any()
    # every hospital that holds any out contributes (the small one at this scale too)
    per_site = [len(t["label"]) for t in train]
    assert len(held["label"]) >= 2 * len(LESION_SITES) and min(per_site) >= 4
    assert set(held["label"].tolist()) == {0, 1, 2}


def test_reduced_bench_prints_rows_and_ratios(tmp_path) -> None:
    rows, infos = utility.run(TINY, [0])
    assert set(rows) == set(utility.ROWS)
    for r in rows.values():
        assert 0.0 <= r["bacc"] <= 1.0
    info = infos[0]
    assert info["train"][utility.small_index()] == min(info["train"])  # (a) is the small site
    # the budget: every federated hospital took rounds x local steps, as the hospital alone
    assert info["steps"]["federated_per_hospital"] == [TINY.steps] * len(LESION_SITES)
    assert info["steps"]["local_gan"] == TINY.steps
    lines = utility.report(TINY, [0], rows, infos, 1.0)
    gain, tstr = utility.ratios(rows)
    assert gain == pytest.approx(rows["c"]["bacc"] - rows["a"]["bacc"])
    assert re.fullmatch(r"augmentation gain \(c\)-\(a\) = [+-]\d\.\d{3} balanced accuracy; "
                        r"TSTR / \(e\) = \d+\.\d{3}", lines[-1]), lines[-1]
    text = "\n".join(lines)
    assert "| (e) every hospital's real slices pooled |" in text
    # intended-class accuracy of both GANs, and the learning curve at both rounds
    assert re.search(r"intended-class accuracy, federated cGAN .*: \d\.\d{3} = \d+\.\d{3} x", text)
    assert [p["round"] for p in info["curve"]] == [1, 2]
    assert [p["steps"] for p in info["curve"]] == [2, 4]
    assert all(0.0 <= p["intended"] <= 1.0 and 0.0 <= p["tstr"] <= 1.0 for p in info["curve"])
    assert "| 4 | " in text  # a curve row per checkpoint scored
    png = utility.plot_curve(tmp_path / "curve.png", infos, "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
