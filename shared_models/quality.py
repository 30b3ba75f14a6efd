"""Quality measures that need no download: a fixed feature network and distances on its features.

FID needs Inception weights, which nothing may fetch at run time; fedsynth uses a *fixed, documented*
feature network instead: ``FeatureNet`` is a 4-stage random convolutional network whose weights
come from ``torch.manual_seed(FEATURE_SEED)`` (Kaiming-uniform init, torch's default), frozen, with
global average and standard-deviation pooling of each stage. Random conv features separate real and
generated medical images well enough to rank models (cf. "random network FID" in Naeem et al.
2020), and the numbers are only comparable between runs using the same ``FEATURE_SEED`` and size.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg
from torch import nn

FEATURE_SEED = 20240601


class FeatureNet(nn.Module):
    """Fixed random conv features of a (N, 1, H, W) batch in [-1, 1] -> (N, 2 * sum(widths))."""

    def __init__(self, in_channels: int = 1, widths: tuple[int, ...] = (8, 16, 32, 32)) -> None:
        super().__init__()
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(FEATURE_SEED)
        layers, c = [], in_channels
        for w in widths:
            layers.append(nn.Sequential(nn.Conv2d(c, w, 3, stride=2, padding=1), nn.LeakyReLU(0.2)))
            c = w
        self.stages = nn.ModuleList(layers)
        torch.random.set_rng_state(gen_state)
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 5:  # 3D volumes: middle slice
            x = x[:, :, x.shape[2] // 2]
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats += [x.mean((2, 3)), x.std((2, 3))]
        return torch.cat(feats, 1)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, eq. 6)."""
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a = np.cov(feats_a, rowvar=False) + eps * np.eye(feats_a.shape[1])
    cov_b = np.cov(feats_b, rowvar=False) + eps * np.eye(feats_b.shape[1])
    if len(feats_a) < 2 or len(feats_b) < 2:
        return float("nan")  # no covariance from one sample
    try:
        covmean = np.real(linalg.sqrtm(cov_a @ cov_b))
    except (linalg.LinAlgError, ValueError):  # a degenerate product (tiny images, few samples)
        return float("nan")
    if not np.isfinite(covmean).all():
        return float("nan")
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def mmd_rbf(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Squared MMD with a Gaussian kernel at the median-distance bandwidth (Gretton et al. 2012)."""
    x = np.concatenate([feats_a, feats_b]).astype(np.float64)
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    bandwidth = np.median(d2[d2 > 0]) if (d2 > 0).any() else 1.0
    k = np.exp(-d2 / bandwidth)
    n = len(feats_a)
    return float(k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean())
