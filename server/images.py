"""Sample images: how the coordinator draws them from a global model, and grids as PNG.

:func:`sample_images` is what both the per-round sample grids (``server/federation.py``) and
``fedsynth sample`` call. It differs from ``family.sample`` in one case, FedBN: there the
hospitals keep their normalisation layers, so the global model's BatchNorm running statistics
are never aggregated and stay at their initial values (mean 0, variance 1, no batch tracked).
Sampling in eval mode with those would normalise nothing and give washed-out or saturated
images. Whenever a generator's running statistics are still the initial ones, the generator is
therefore run with *batch statistics*: each BatchNorm normalises over the sampled batch itself
(as in training), which needs no stored statistics. The stored statistics are left untouched;
the affine scale and shift of those layers are the global (initial) ones as well, so such
samples show what the shared weights do under a neutral normalisation, not any one hospital's
model. Batch statistics need at least two images per batch (callers draw 16 or more).
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, Collection, Mapping

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

NORM_STATS = ("auto", "stored", "batch")
MIN_BATCH_STATS = 16  # images drawn at least when sampling with batch statistics


def _batch_norms(net: Any) -> list[Any]:
    from torch import nn

    return [m for m in net.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


def untrained_norm_stats(nets: Mapping[str, Any], samplers: Collection[str]) -> bool:
    """True when a component of ``samplers`` (the family's: what ``sample`` runs) has BatchNorm
    running statistics that never saw a batch (``num_batches_tracked`` 0, mean exactly 0,
    variance exactly 1): an untrained model, or the global model of a FedBN run, whose norm
    layers stay at the hospitals."""
    import torch

    for component, net in nets.items():
        if component not in samplers:
            continue
        for bn in _batch_norms(net):
            tracked = bn.num_batches_tracked
            if ((tracked is None or int(tracked) == 0)
                    and bool(torch.all(bn.running_mean == 0))
                    and bool(torch.all(bn.running_var == 1))):
                return True
    return False


def with_batch_stats(nets: Mapping[str, Any], samplers: Collection[str]) -> dict[str, Any]:
    """A copy of ``nets`` whose ``samplers``' BatchNorms normalise with batch statistics.

    The ``samplers`` components (the family's, what ``sample`` runs) are deep-copied and their
    running statistics dropped (a BatchNorm without running statistics uses the batch's own, in
    eval mode too); the other components and the originals are not touched.
    """
    out = dict(nets)
    for component, net in nets.items():
        if component not in samplers or not _batch_norms(net):
            continue
        net = copy.deepcopy(net)
        for bn in _batch_norms(net):
            bn.running_mean = None
            bn.running_var = None
            bn.num_batches_tracked = None
            bn.track_running_stats = False
        out[component] = net
    return out


def resolve_norm_stats(nets: Mapping[str, Any], samplers: Collection[str],
                       norm_stats: str = "auto") -> str:
    """``"stored"`` or ``"batch"``: what :func:`sample_images` uses for ``norm_stats``."""
    if norm_stats not in NORM_STATS:
        raise ValueError(f"norm_stats must be one of {NORM_STATS}, got {norm_stats!r}")
    if norm_stats == "auto":
        return "batch" if untrained_norm_stats(nets, samplers) else "stored"
    return norm_stats


def sample_images(family: Any, nets: Mapping[str, Any], inputs: Any, labels: Any = None,
                  norm_stats: str = "auto") -> Any:
    """``family.sample(nets, inputs, labels)``, with batch statistics where they are needed.

    ``norm_stats``: ``"stored"`` (the checkpoint's running statistics, eval mode), ``"batch"``
    (normalise over the batch; at least two inputs) or ``"auto"``: batch statistics when the
    running statistics were never trained (:func:`untrained_norm_stats`, e.g. FedBN), else the
    stored ones. With ``"auto"`` a single input falls back to the stored statistics.
    """
    mode = resolve_norm_stats(nets, family.samplers, norm_stats)
    if mode == "batch" and len(inputs) < 2:
        if norm_stats == "batch":
            raise ValueError("sampling with batch statistics needs at least two inputs")
        log.warning("one sample only: using the stored (untrained) normalisation statistics")
        mode = "stored"
    if mode == "batch":
        nets = with_batch_stats(nets, family.samplers)
    if labels is None:
        return family.sample(nets, inputs)
    return family.sample(nets, inputs, labels)


def grid_image(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """(N, 1, H, W) in [-1, 1] -> one uint8 grid image, as square as possible.

    3D volumes (N, 1, D, H, W) show their middle slice; colour (N, 3, H, W) images (RGB) give
    an (h, w, 3) RGB grid.
    """
    if images.ndim == 5:
        images = images[:, :, images.shape[2] // 2]
    if images.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {images.shape}")
    n, chans, h, w = images.shape
    colour = chans == 3
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad) + ((3,) if colour else ()),
                      dtype=np.uint8)
    shown = images.transpose(0, 2, 3, 1) if colour else images[:, 0]
    tiles = np.clip((shown + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y:y + h, x:x + w] = tile
    return canvas


def save_grid(images: np.ndarray, path: Path, scale: int = 2) -> Path:
    """Write a sample grid PNG (upscaled with nearest neighbour so small slices stay visible)."""
    img = Image.fromarray(grid_image(images))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    tmp.replace(path)
    return path
