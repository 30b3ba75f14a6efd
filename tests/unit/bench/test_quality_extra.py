"""A reduced ``python -m bench.quality_extra``: CycleGAN and conditional-DCGAN rows come from real
training through ``run_federation`` and the real ClientApp, and training beats no training."""

from __future__ import annotations

import math

import pytest
import torch

from bench.quality import BenchConfig
from bench.quality_extra import (UNTRAINED, ExtraConfig, alone_rows, family_data, run_family,
                                 summary, table, tstr_accuracy)

SMALL = ExtraConfig(bench=BenchConfig(hospitals=2, image_size=32, width=8, rounds=3,
                                      local_steps=4, batch=4, lr=1e-3), lr_generation=1e-3)


def test_family_data_keys_and_labels() -> None:
    cd_train, cd_held = family_data("cdcgan", SMALL)
    assert set(cd_train[0]) == set(cd_held) == {"image", "label"}
    # both contrasts, label 1 = T2w, in equal numbers (the phantom writes a T1w/T2w pair a slice)
    labels = cd_train[0]["label"]
    assert 0 < int(labels.sum()) < len(labels)
    d_train, d_held = family_data("dcgan", SMALL)
    assert set(d_train[0]) == set(d_held) == {"image"}
    assert len(d_train[0]["image"]) == len(cd_train[0]["image"])
    c_train, c_held = family_data("cyclegan", SMALL)
    assert set(c_train[0]) == {"a", "b"} and len(c_held["a"]) == len(c_held["b"]) > 0


def test_tstr_separates_informative_from_shuffled_labels() -> None:
    cd_train, cd_held = family_data("cdcgan", SMALL)
    x = torch.cat([t["image"] for t in cd_train])
    y = torch.cat([t["label"] for t in cd_train])
    real = tstr_accuracy(x, y, cd_held["image"], cd_held["label"], seed=0)
    flipped = tstr_accuracy(x, 1 - y, cd_held["image"], cd_held["label"], seed=0)
    assert real > 0.7 and flipped < 0.3


@pytest.mark.slow
def test_cyclegan_rows_train_through_every_preset() -> None:
    rows = run_family("cyclegan", SMALL, variants={"fedmed-gan": "fedmed-gan"})
    trained = ["centralized", *alone_rows(SMALL), "fedmed-gan"]
    assert set(trained) <= set(rows)
    for name in trained:
        r = rows[name]
        assert -1 <= r["ssim"] <= 1 and math.isfinite(r["psnr"]) and r["mae"] >= 0
        assert r["ssim"] > rows[UNTRAINED]["ssim"] + 0.02, name
        assert r["mae"] < rows[UNTRAINED]["mae"], name
    assert "| fedmed-gan |" in table("cyclegan", rows)
    assert summary("cyclegan", rows, SMALL, trained[-1:]).startswith("cyclegan: best federated")


@pytest.mark.slow
def test_cdcgan_rows_have_frechet_and_tstr() -> None:
    rows = run_family("cdcgan", SMALL, variants={"fedgan": "fedgan"})
    for name in ("centralized", "fedgan"):
        assert rows[name]["frechet"] < rows[UNTRAINED]["frechet"], name
        assert 0.0 <= rows[name]["tstr"] <= 1.0
    assert rows["reference: real training slices"]["tstr"] > 0.7
    assert "TSTR" in table("cdcgan", rows)
