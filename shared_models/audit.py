"""Memorisation audit: do generated slices copy the hospital's training slices?

Run at the hospital (``fedsynth audit``, ``fedsynth sample --audit``): nothing here leaves the
site. ``audit(generated, train, held_out)`` compares N generated slices with the training slices
and with held-out slices of the same hospital, which the model never saw and which stand for "a
new patient from the same scanner":

* nearest-neighbour distances in three spaces: pixels (RMS difference, images in [-1, 1]),
  SSIM (1 - the highest SSIM, against the ``SSIM_CANDIDATES`` nearest slices in pixel space, an
  approximation that keeps it linear in N) and the fixed random features of
  ``shared_models.quality.FeatureNet`` (L2);
* the ratio of the median distance to the training set over the median distance to the held-out
  set: about 1 for a model that generalises, well below 1 for one that reproduces its training
  slices (cf. the "memorisation ratio" of Akbar et al. 2023; Dar et al. 2024 flag copies by the
  nearest-neighbour distance of real data);
* **near-copies**: a generated slice is one when it is closer (in pixels) to some training slice
  than ANY held-out slice is to the training set, and its SSIM to that training slice is at least
  ``ssim_threshold`` (default ``SSIM_THRESHOLD`` = 0.9). The held-out slices' nearest distance is
  how close real, unseen data gets; closer than all of them is a property of having seen the
  slice, and the SSIM floor keeps blank or near-uniform images from counting.

What it cannot see: a copy of a patient under a transformation (shift, flip, contrast) that moves
pixel distance more than held-out variation; copies of slices that are themselves near-duplicates
of held-out slices (adjacent slices of one volume: held-out slices are every n-th slice, so their
distance to the training set is small and the threshold strict); features no distance here
measures (a tumour's shape on another background). It measures one sample of N images, not the
model: a generator that copies rarely can pass with a small N.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .config import SSIM_THRESHOLD  # one light home: a command line's help reads it

SSIM_CANDIDATES = 8  # SSIM is computed against this many nearest training slices (pixels)
CHUNK = 256


def _slices(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) float in [-1, 1]; 3D volumes (N, C, D, H, W) by their middle slice."""
    x = torch.as_tensor(x).float()
    if x.ndim == 5:
        x = x[:, :, x.shape[2] // 2]
    if x.ndim != 4:
        raise ValueError(f"audit needs (N, C, H, W) images, got shape {tuple(x.shape)}")
    return x


def _nn_pixels(a: torch.Tensor, b: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """RMS pixel distance of each row of ``a`` to its k nearest rows of ``b``: (dist, index)."""
    fa, fb = a.flatten(1), b.flatten(1)
    dists, idx = [], []
    for start in range(0, len(fa), CHUNK):
        d = torch.cdist(fa[start:start + CHUNK], fb) / fa.shape[1] ** 0.5
        v, i = d.topk(min(k, len(fb)), dim=1, largest=False)
        dists.append(v)
        idx.append(i)
    return torch.cat(dists), torch.cat(idx)


def _ssim_pairs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM of each pair (x_i, y_i), images in [-1, 1] (data range 2)."""
    from monai.metrics import SSIMMetric

    win = min(7, x.shape[-1]) | 1  # odd, no larger than the image
    metric = SSIMMetric(spatial_dims=2, data_range=2.0, win_size=win)
    out = []
    for start in range(0, len(x), CHUNK):
        out.append(metric(x[start:start + CHUNK], y[start:start + CHUNK]).reshape(-1))
    return torch.cat(out) if out else torch.zeros(0)


def _max_ssim(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Highest SSIM of each row of ``a`` against its ``SSIM_CANDIDATES`` pixel-nearest rows of
    ``b``, and the index in ``b`` of that row."""
    _, idx = _nn_pixels(a, b, SSIM_CANDIDATES)
    k = idx.shape[1]
    pairs = _ssim_pairs(a.repeat_interleave(k, 0), b[idx.reshape(-1)]).reshape(len(a), k)
    best, where = pairs.max(1)
    return best, idx.gather(1, where[:, None]).squeeze(1)


@dataclass
class SpaceStats:
    """Nearest-neighbour distances in one space: medians and the train / held-out ratio."""

    to_train_median: float
    to_held_out_median: float
    ratio: float  # to_train / to_held_out: ~1 generalises, << 1 memorises
    held_out_to_train_min: float  # how close unseen real slices get to the training set


@dataclass
class AuditResult:
    generated: int
    train: int
    held_out: int
    pixel: SpaceStats
    ssim: SpaceStats  # distances are 1 - SSIM
    feature: SpaceStats
    ssim_threshold: float
    near_copies: int
    near_copy_share: float
    # local only (the export gate): which generated slices are near-copies, of which training one
    near_copy_index: list[int] = field(default_factory=list)
    nearest_train: list[int] = field(default_factory=list)

    def scalars(self) -> dict[str, float]:
        """The audit as flat scalars (no index of any slice)."""
        out: dict[str, float] = {"generated": self.generated, "train": self.train,
                                 "held-out": self.held_out, "ssim-threshold": self.ssim_threshold,
                                 "near-copies": self.near_copies,
                                 "near-copy-share": self.near_copy_share}
        for space in ("pixel", "ssim", "feature"):
            for k, v in asdict(getattr(self, space)).items():
                out[f"{space}-{k.replace('_', '-')}"] = v
        return out


def _stats(to_train: torch.Tensor, to_held: torch.Tensor, held_to_train: torch.Tensor
           ) -> SpaceStats:
    tt, th = float(to_train.median()), float(to_held.median())
    return SpaceStats(tt, th, tt / th if th > 0 else float("nan"), float(held_to_train.min()))


@torch.no_grad()
def audit(generated: torch.Tensor, train: torch.Tensor, held_out: torch.Tensor,
          ssim_threshold: float = SSIM_THRESHOLD) -> AuditResult:
    """Audit ``generated`` against ``train`` and ``held_out`` (tensors in [-1, 1])."""
    from .quality import FeatureNet

    g, t, h = _slices(generated), _slices(train), _slices(held_out)
    if not (len(g) and len(t) and len(h)):
        raise ValueError(f"audit needs generated, training and held-out slices; got "
                         f"{len(g)}, {len(t)}, {len(h)}")
    if not (g.shape[1:] == t.shape[1:] == h.shape[1:]):
        raise ValueError(f"image shapes differ: generated {tuple(g.shape[1:])}, training "
                         f"{tuple(t.shape[1:])}, held-out {tuple(h.shape[1:])}")
    # pixels
    gt, gt_idx = _nn_pixels(g, t)
    gh, _ = _nn_pixels(g, h)
    ht, _ = _nn_pixels(h, t)
    pixel = _stats(gt[:, 0], gh[:, 0], ht[:, 0])
    # SSIM (as a distance: 1 - SSIM)
    g_ssim_t, g_ssim_t_idx = _max_ssim(g, t)
    g_ssim_h, _ = _max_ssim(g, h)
    h_ssim_t, _ = _max_ssim(h, t)
    ssim = _stats(1 - g_ssim_t, 1 - g_ssim_h, 1 - h_ssim_t)
    # fixed random features
    net = FeatureNet(g.shape[1])
    fg, ft, fh = net(g), net(t), net(h)
    feature = _stats(torch.cdist(fg, ft).min(1).values, torch.cdist(fg, fh).min(1).values,
                     torch.cdist(fh, ft).min(1).values)
    # near-copies: closer than any held-out slice gets, and structurally alike
    nearest = gt_idx[:, 0]
    ssim_to_nearest = _ssim_pairs(g, t[nearest])
    copies = (gt[:, 0] < ht[:, 0].min()) & (ssim_to_nearest >= ssim_threshold)
    index = copies.nonzero().squeeze(1).tolist()
    return AuditResult(len(g), len(t), len(h), pixel, ssim, feature, float(ssim_threshold),
                       len(index), len(index) / len(g), index, nearest.tolist())


def table(result: AuditResult) -> str:
    """The audit as a text table (what ``fedsynth audit`` prints)."""
    rows = [f"generated {result.generated} · training {result.train} · held-out "
            f"{result.held_out} slices", "",
            f"{'space':<8} {'to train':>10} {'to held-out':>12} {'ratio':>7} "
            f"{'held-out→train min':>19}"]
    for space in ("pixel", "ssim", "feature"):
        s: SpaceStats = getattr(result, space)
        rows.append(f"{space:<8} {s.to_train_median:>10.4g} {s.to_held_out_median:>12.4g} "
                    f"{s.ratio:>7.3f} {s.held_out_to_train_min:>19.4g}")
    rows += ["", "(medians of nearest-neighbour distances; ssim as 1 - SSIM; ratio < 1: closer to "
                 "the training slices than to unseen ones)",
             f"near-copies: {result.near_copies} of {result.generated} "
             f"({100 * result.near_copy_share:.1f} %) closer to a training slice than any "
             f"held-out slice is, with SSIM >= {result.ssim_threshold:g}"]
    return "\n".join(rows)

