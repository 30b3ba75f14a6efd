"""FRD (frd-score's radiomic features, no download) and precision/recall/density/coverage (prdc):
they rank what they should, on in-memory arrays, cheaply."""

from __future__ import annotations

import time

import numpy as np
import torch

from shared_models.quality import (FeatureNet, frechet_radiomics_distance, prdc,
                                   radiomics_features)


def _blobs(n: int, seed: int, radius: float = 6.0, size: int = 32) -> torch.Tensor:
    """Noisy bright discs at random places: a toy 'anatomy' in [-1, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.empty((n, 1, size, size), np.float32)
    for i in range(n):
        cy, cx = rng.uniform(10, size - 10, 2)
        disc = np.hypot(yy - cy, xx - cx) < radius * rng.uniform(0.8, 1.2)
        out[i, 0] = np.where(disc, 0.6, -0.6) + rng.normal(0, 0.1, (size, size))
    return torch.from_numpy(out)


def test_frd_ranks_a_shifted_set_above_another_draw_of_the_same() -> None:
    t0 = time.perf_counter()
    real = radiomics_features(_blobs(24, 0))
    seconds = time.perf_counter() - t0
    same = radiomics_features(_blobs(24, 1))
    other = radiomics_features(_blobs(24, 2, radius=3.0) * 0.5)
    assert real.shape[0] == 24 and real.shape[1] > 50 and np.isfinite(real).all()
    assert frechet_radiomics_distance(real, real) < 1e-6
    assert frechet_radiomics_distance(real, same) < frechet_radiomics_distance(real, other)
    assert np.isnan(frechet_radiomics_distance(real[:1], same))
    assert seconds < 20  # 24 images (first call loads pyradiomics); ~10 ms an image after that
    flat = radiomics_features(torch.zeros(3, 1, 32, 32))  # no texture: NaN, not an exception
    assert flat.shape[0] == 3


def test_prdc_tells_mode_collapse_from_poor_fidelity() -> None:
    feat = FeatureNet()
    real = feat(_blobs(40, 0)).numpy()
    fresh = prdc(real, feat(_blobs(40, 1)).numpy())
    collapsed = prdc(real, feat(_blobs(1, 1).repeat(40, 1, 1, 1)).numpy())  # one image, 40 times
    noise = prdc(real, feat(torch.rand(40, 1, 32, 32) * 2 - 1).numpy())
    assert fresh["recall"] > 0.5 and fresh["coverage"] > 0.5
    assert collapsed["coverage"] < 0.2 and collapsed["recall"] < 0.2  # diversity gone
    assert noise["precision"] < fresh["precision"] and noise["density"] < fresh["density"]
    assert all(np.isnan(v) for v in prdc(real[:2], real[:2]).values())


def test_hospital_evaluation_reports_frd_and_prdc_as_scalars() -> None:
    import math

    from client.trainer import FRD_MAX_IMAGES, LocalTrainer
    from shared_models import ModelConfig

    trainer = LocalTrainer(ModelConfig(family="cdcgan", image_size=32, width=8, num_classes=3),
                           torch.device("cpu"))
    held = {"image": _blobs(12, 0), "label": torch.arange(12) % 3}
    first = trainer.evaluate(held, seed=1)
    assert trainer._real_radiomics is not None and trainer._real_radiomics[0] is held["image"]
    again = trainer.evaluate(held, seed=1)  # held-out features reused: same numbers
    assert first["eval-frd"] == again["eval-frd"] and math.isfinite(first["eval-frd"])
    assert first["eval-frd"] > 0  # an untrained generator is not the held-out blobs
    for key in ("eval-precision", "eval-recall", "eval-density", "eval-coverage"):
        assert isinstance(first[key], float) and 0.0 <= first[key] <= 12.0, key
    assert FRD_MAX_IMAGES >= 32


def test_16_px_features_are_finite_and_32_px_features_unchanged() -> None:
    """At 16 px the last of FeatureNet's four stride-2 stages is one pixel: its spread is 0, not
    the unbiased std's NaN, which failed every 16 px evaluation in PRDC; 32 px and up keep
    the features they had (the spread of more than one pixel is computed as before)."""
    feat = FeatureNet()
    small = feat(_blobs(20, 0)[:, :, 8:24, 8:24])
    assert torch.isfinite(small).all()
    assert (small[:, -32:] == 0).all()  # the one-pixel stage's std block
    scores = prdc(small.numpy(), feat(_blobs(20, 1)[:, :, 8:24, 8:24]).numpy())
    assert all(np.isfinite(v) for v in scores.values()), scores
    x = _blobs(4, 2)
    by_hand, h = [], x
    for stage in feat.stages:
        h = stage(h)
        by_hand += [h.mean((2, 3)), h.std((2, 3))]
    assert torch.equal(feat(x), torch.cat(by_hand, 1))
