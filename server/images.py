"""Sample grids as PNG: what a person opens first to judge a GAN."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image


def grid_image(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """(N, 1, H, W) in [-1, 1] -> one uint8 grid image, as square as possible.

    3D volumes (N, 1, D, H, W) show their middle slice.
    """
    if images.ndim == 5:
        images = images[:, :, images.shape[2] // 2]
    if images.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {images.shape}")
    n, _, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad), dtype=np.uint8)
    tiles = np.clip((images[:, 0] + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
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
