"""Quality measures that need no download: a fixed feature network and distances on its features.

FID needs Inception weights, which nothing may fetch at run time; fedsynth uses a *fixed, documented*
feature network instead: ``FeatureNet`` is a 4-stage random convolutional network whose weights
come from ``torch.manual_seed(FEATURE_SEED)`` (Kaiming-uniform init, torch's default), frozen, with
global average and standard-deviation pooling of each stage. Random conv features separate real and
generated medical images well enough to rank models (cf. "random network FID" in Naeem et al.
2020), and the numbers are only comparable between runs using the same ``FEATURE_SEED`` and size.

Colour (``channels = 3``): ``FeatureNet(3)`` convolves the three RGB channels jointly (its first
layer takes 3 inputs, seeded alike); the radiomic features (FRD) are per channel: R, G and B each
described as a grey image, the three rows side by side (3 x 93 features). Colour numbers are
comparable only with colour numbers.
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
            # a stage down to one pixel (16 px input, 4 stages) has no spread: its std is 0, not
            # the unbiased estimator's NaN, which made every 16 px evaluation fail in PRDC
            spread = x.std((2, 3)) if x.shape[2] * x.shape[3] > 1 else torch.zeros_like(x[:, :, 0, 0])
            feats += [x.mean((2, 3)), spread]
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


# ----------------------------------------------------------------------------- radiomics, PRDC

# Fréchet Radiomics Distance (Osuala et al. 2024, PyPI ``frd-score``): radiomic features of each
# whole 2D image (pyradiomics, through frd_score's own extractor factory: the "Original" image
# only, the 2D-meaningful classes below; no LoG/wavelet filters, to stay CPU-cheap), min-max
# normalised jointly over both sets (frd_score v0's normalisation, range [0, 7.4567]) and the
# Fréchet distance of Gaussians fitted to them (frd_score's ``calculate_frechet_distance``).
# frd_score's ``compute_frd`` reads image files with a process pool; the same pieces are used here
# on in-memory arrays, in this process. 93 features per image; ~10 ms per 32x32 image on one core.
RADIOMICS_CLASSES = ("firstorder", "glcm", "glrlm", "gldm", "glszm", "ngtdm")
_EXTRACTOR: dict[str, object] = {}


def _extractor():  # noqa: ANN202 - radiomics.featureextractor.RadiomicsFeatureExtractor
    if "x" not in _EXTRACTOR:
        import logging

        logging.getLogger("radiomics").setLevel(logging.ERROR)  # per-image info lines
        try:
            import radiomics
            from frd_score import frd
        except ImportError as exc:  # a hand-made install without the declared dependency
            raise RuntimeError(
                f"FRD needs pyradiomics and frd-score ({exc}); install fedsynth with pip so its "
                "declared dependencies come too, or `pip install pyradiomics-bhklab==3.1.4`"
            ) from None

        radiomics.setVerbosity(logging.ERROR)
        logging.getLogger("radiomics").setLevel(logging.ERROR)  # its handler and the root's
        _EXTRACTOR["x"] = frd.get_feature_extractor(
            frd_version=frd.FRD_VERSION_V0, features=list(RADIOMICS_CLASSES),
            image_types=["Original"])
    return _EXTRACTOR["x"]


def radiomics_features(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """(N, F) radiomic features of (N, 1, H, W) images in [-1, 1] (3D: the middle slice);
    (N, 3 F) of colour (N, 3, H, W) ones, each channel's features in RGB order.

    Each image is mapped to [0, 255] and described whole (a mask of every pixel but one corner,
    frd_score's workaround for a pyradiomics edge case); a constant image gives NaN features,
    which the normalisation below replaces.
    """
    import SimpleITK as sitk

    x = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else images
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 5:
        x = x[:, :, x.shape[2] // 2]
    if x.ndim == 4 and x.shape[1] > 1:  # colour: per channel, side by side
        return np.concatenate([radiomics_features(x[:, c:c + 1]) for c in range(x.shape[1])], 1)
    x = x.reshape(len(x), *x.shape[-2:])
    extractor = _extractor()
    mask = np.ones(x.shape[1:], np.uint8)
    mask[0, 0] = 0
    sitk_mask = sitk.GetImageFromArray(mask)
    rows = []
    for img in x:
        img = (np.clip(img, -1, 1) + 1) * 127.5
        try:
            out = extractor.execute(sitk.GetImageFromArray(img.astype(np.float32)), sitk_mask)
            rows.append([float(v) for k, v in out.items() if not k.startswith("diagnostics")])
        except (ValueError, RuntimeError):  # a flat image: no texture matrices
            rows.append(None)
    width = max((len(r) for r in rows if r is not None), default=0)
    return np.array([r if r is not None else [np.nan] * width for r in rows], dtype=np.float64)


def frechet_radiomics_distance(feats_real: np.ndarray, feats_fake: np.ndarray) -> float:
    """FRD of two radiomic feature sets (``radiomics_features``); NaN with fewer than 2 each."""
    from frd_score import frd

    if len(feats_real) < 2 or len(feats_fake) < 2 or feats_real.shape[1] == 0:
        return float("nan")
    joint = np.concatenate([feats_real, feats_fake])
    norm = [frd.min_max_normalize(f, 0.0, 7.45670747756958, base_distribution=joint)
            for f in (feats_real, feats_fake)]
    mu = [n.mean(0) for n in norm]
    sigma = [np.cov(n, rowvar=False) for n in norm]
    value = float(np.real(frd.calculate_frechet_distance(mu[0], sigma[0], mu[1], sigma[1])))
    return max(value, 0.0) if np.isfinite(value) else float("nan")  # -1e-5 for equal sets


PRDC_K = 5  # nearest neighbours (Naeem et al. 2020's default); fewer when a set is smaller


def prdc(feats_real: np.ndarray, feats_fake: np.ndarray, nearest_k: int = PRDC_K
         ) -> dict[str, float]:
    """Precision, recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020,
    PyPI ``prdc``) of generated features against real ones: precision/density fall with poor
    fidelity, recall/coverage with poor diversity (mode collapse). NaN with under 3 per set."""
    k = min(nearest_k, len(feats_real) - 2, len(feats_fake) - 2)  # prdc needs k + 1 < n
    if k < 1 or len(feats_real) < 3 or len(feats_fake) < 3:
        return {m: float("nan") for m in ("precision", "recall", "density", "coverage")}
    import contextlib
    import io

    from prdc import compute_prdc

    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        out = compute_prdc(np.asarray(feats_real, np.float64), np.asarray(feats_fake, np.float64),
                           k)
    return {m: float(out[m]) for m in ("precision", "recall", "density", "coverage")}


def checkerboard_score(images: np.ndarray | torch.Tensor) -> float:
    """Fraction of the images' spectral power (each image's mean removed) at the period-2
    frequencies: the Nyquist row and column of a 2D spectrum, including the (N/2, N/2) bin (every
    Nyquist plane of a 3D one). A stride-2 transposed convolution's uneven overlap (Odena et al.
    2016) puts its checkerboard there; white noise has about 2/N of its power there, a smooth
    image almost none. Pooled over the batch (power summed before the ratio), so constant images
    count for nothing. ``images``: (N, C, *spatial); an odd axis has no Nyquist bin."""
    x = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else \
        np.asarray(images, dtype=np.float64)
    axes = tuple(range(2, x.ndim))
    x = x - x.mean(axis=axes, keepdims=True)
    power = np.abs(np.fft.fftn(x, axes=axes)) ** 2
    at = np.zeros(x.shape[2:], dtype=bool)
    for i, n in enumerate(x.shape[2:]):
        if n % 2 == 0:
            index = [slice(None)] * len(axes)
            index[i] = n // 2
            at[tuple(index)] = True
    total = float(power.sum())
    return float(power[..., at].sum()) / total if total > 0 else 0.0
