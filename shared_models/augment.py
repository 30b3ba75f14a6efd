"""Differentiable augmentation of everything a discriminator sees (DiffAugment, Zhao et al. 2020).

With a few hundred slices a discriminator memorises the training set within a few hundred steps and
its gradient stops telling the generator anything. DiffAugment applies the SAME random policy to
real and generated images, in the discriminator's AND the generator's step, as differentiable
batch operations, so G is trained through the augmentation and never learns to produce augmented
images (sec. 3: augmenting real images only makes G copy the augmentation). Each image of the batch
draws its own parameters. The ops, for (B, C, S, S) slices and (B, C, S, S, S) volumes alike:

- ``translation``: an integer shift of up to 1/8 of each side, per image and axis, the uncovered
  border filled with the background (-1: images live in [-1, 1], air is -1);
- ``cutout``: one square (cube) of half the side set to the background, at a random place (it
  may overhang the border, as in the paper's code);
- ``brightness``: + U(-0.5, 0.5) per image (the paper's range, for images in [-1, 1]);
- ``contrast``: (x - mean) * U(0.5, 1.5) + mean per image;
- ``saturation`` (colour runs, ``channels = 3``): (x - m) * U(0, 2) + m per image, m the mean of
  each pixel's three channels (RGB), as the paper's code; a pix2pix pair's six channels are two
  RGB images, each pulled to its own pixel means by the same factor.

``color`` (or ``colour``) is the paper's colour policy: brightness, saturation, contrast, in that
order. Saturation is meaningless for grey images: with ``channels = 1`` it (and ``color``) is
refused by name rather than silently ignored.

Written here rather than taken from MONAI: MONAI 1.6's array transforms act on ONE un-batched image
per call with parameters drawn from a NumPy RandomState (so per-image parameters mean a Python loop
over the batch), and ``RandCoarseDropout`` (its cutout) returns a tensor detached from the graph
(``requires_grad`` False, measured with monai 1.6.1), so the generator could not be trained
through it. The ops below are a few tensor operations on the batch, on whatever device it lives on.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

# the policy's names and parser are torch-free (run settings are checked without torch)
from .augment_policy import COLOUR_OPS, COLOUR_POLICY, OPS, parse_policy  # noqa: E402,F401

BACKGROUND = -1.0  # the value of air in [-1, 1] images: what translation and cutout fill with
TRANSLATION_RATIO = 0.125  # Zhao et al. 2020's code: shifts up to 1/8 of the side
CUTOUT_RATIO = 0.5  # a square of half the side


def _per_image(x: torch.Tensor) -> tuple[int, ...]:
    """Shape of one random value per image, broadcastable against ``x``."""
    return (x.shape[0],) + (1,) * (x.ndim - 1)


def brightness(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.rand(_per_image(x), device=x.device, dtype=x.dtype) - 0.5)


def contrast(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    factor = torch.rand(_per_image(x), device=x.device, dtype=x.dtype) + 0.5
    return (x - mean) * factor + mean


def saturation(x: torch.Tensor) -> torch.Tensor:
    """Scale each pixel's distance from its own RGB mean by U(0, 2) per image (channel groups of
    3: one RGB image, or a pix2pix pair's two)."""
    b, c = x.shape[:2]
    if c % 3:
        raise ValueError(f"saturation needs RGB channels (a multiple of 3), got {c}")
    groups = x.view(b, c // 3, 3, *x.shape[2:])
    mean = groups.mean(dim=2, keepdim=True)
    factor = (torch.rand((b,) + (1,) * (groups.ndim - 1), device=x.device, dtype=x.dtype) * 2.0)
    return ((groups - mean) * factor + mean).view_as(x)


def translation(x: torch.Tensor, ratio: float = TRANSLATION_RATIO) -> torch.Tensor:
    """Shift each image by its own integer offset per axis; the border shows the background."""
    b, spatial = x.shape[0], x.shape[2:]
    pads = [int(s * ratio + 0.5) for s in spatial]
    if not any(pads):
        return x
    # F.pad takes (last axis first) pairs
    padded = F.pad(x, [p for p in reversed(pads) for _ in (0, 1)], value=BACKGROUND)
    nd = len(spatial)
    index: list[torch.Tensor] = [torch.arange(b, device=x.device).view((b,) + (1,) * nd)]
    for axis, (size, pad) in enumerate(zip(spatial, pads)):
        shift = torch.randint(-pad, pad + 1, (b, 1), device=x.device)
        idx = torch.arange(size, device=x.device).view(1, size) + pad + shift  # within the pad
        shape = [b] + [1] * nd
        shape[1 + axis] = size
        index.append(idx.view(shape))
    # channels last for the gather, then back: (B, *S, C) -> (B, C, *S)
    moved = padded.movedim(1, -1)[tuple(index)]
    return moved.movedim(-1, 1)


def cutout(x: torch.Tensor, ratio: float = CUTOUT_RATIO) -> torch.Tensor:
    """Set one box of ``ratio`` of each side to the background, at a random place per image."""
    b, spatial = x.shape[0], x.shape[2:]
    nd = len(spatial)
    inside = torch.ones((b,) + (1,) * nd, dtype=torch.bool, device=x.device)
    for axis, size in enumerate(spatial):
        cut = max(1, int(size * ratio + 0.5))
        # the paper's centre is uniform on [0, size): the box may overhang the border
        centre = torch.randint(0, size + (1 - cut % 2), (b, 1), device=x.device)
        grid = torch.arange(size, device=x.device).view(1, size)
        hit = (grid >= centre - cut // 2) & (grid < centre - cut // 2 + cut)
        shape = [b] + [1] * nd
        shape[1 + axis] = size
        inside = inside & hit.view(shape)
    return torch.where(inside.unsqueeze(1), torch.full_like(x, BACKGROUND), x)


_FUNCS = {"translation": translation, "cutout": cutout, "brightness": brightness,
          "contrast": contrast, "saturation": saturation}


def diff_augment(x: torch.Tensor, ops: tuple[str, ...] | str) -> torch.Tensor:
    """``x`` (B, C, S, S[, S]) through ``ops`` (a policy string or ``parse_policy``'s tuple).

    Differentiable in ``x``; every image draws its own parameters from torch's generator on
    ``x``'s device (the trainer seeds it per round)."""
    if isinstance(ops, str):
        ops = parse_policy(ops, channels=3)  # saturation itself refuses a non-RGB x
    for op in ops:
        x = _FUNCS[op](x)
    return x
