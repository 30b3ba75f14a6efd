"""Preprocessing: frames in modality units to the GAN's square [-1, 1] slices.

Why public: :mod:`client.segmentation` must put its masks pixel for pixel on the slices
made here (same resize, same padding), and :mod:`client.cache` must predict their shape.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .types import DicomSettings


def normalise(frames: np.ndarray, modality: str, settings: DicomSettings) -> np.ndarray:
    """Map modality units to [-1, 1]: fixed HU window for CT, per-slice percentiles otherwise."""
    frames = frames.astype(np.float32, copy=False)
    if modality.upper() == "CT":
        level, width = settings.ct_window
        width = max(float(width), 1e-6)
        lo = level - width / 2.0
        scaled = (frames - np.float32(lo)) * np.float32(2.0 / width) - 1.0
        return np.clip(scaled, -1.0, 1.0).astype(np.float32, copy=False)
    p_lo, p_hi = settings.mr_percentiles
    flat = frames.reshape(frames.shape[0], -1)
    lo, hi = np.percentile(flat, [p_lo, p_hi], axis=1).astype(np.float32)
    lo, hi = lo[:, None, None], hi[:, None, None]
    span = hi - lo
    safe = np.where(span > 0, span, 1.0)
    scaled = (frames - lo) / safe * 2.0 - 1.0
    # A constant slice carries no contrast: map it to background (-1).
    scaled = np.where(span > 0, scaled, -1.0)
    return np.clip(scaled, -1.0, 1.0).astype(np.float32, copy=False)


def resized_shape(rows: int, cols: int, size: int) -> tuple[int, int]:
    """The (rows, cols) of a frame after :func:`resize_keep_aspect`: longer side ``size``."""
    side = max(rows, cols)
    if side == size:
        return rows, cols
    return max(1, round(rows * size / side)), max(1, round(cols * size / side))


def resize_keep_aspect(frames: np.ndarray, size: int) -> np.ndarray:
    """Scale so the longer side is ``size`` (area when shrinking, bilinear when enlarging).

    ``(n, h, w)`` grey frames, or ``(n, h, w, 3)`` colour ones (each channel alike)."""
    n, h, w = frames.shape[:3]
    if max(h, w) == size:
        return frames
    out_h, out_w = resized_shape(h, w, size)
    side = max(h, w)
    tensor = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))
    tensor = tensor.unsqueeze(1) if frames.ndim == 3 else tensor.permute(0, 3, 1, 2)
    if side > size:
        tensor = F.interpolate(tensor, size=(out_h, out_w), mode="area")
    else:
        tensor = F.interpolate(tensor, size=(out_h, out_w), mode="bilinear", align_corners=False)
    return tensor[:, 0].numpy() if frames.ndim == 3 else tensor.permute(0, 2, 3, 1).numpy()


def pad_square(frames: np.ndarray, size: int) -> np.ndarray:
    """Centre-pad ``(n, h, w)`` (h, w <= size) to ``(n, 1, size, size)`` with -1 (background);
    colour ``(n, h, w, 3)`` to ``(n, 3, size, size)`` (-1 in every channel: black)."""
    n, h, w = frames.shape[:3]
    chans = 1 if frames.ndim == 3 else frames.shape[3]
    out = np.full((n, chans, size, size), -1.0, dtype=np.float32)
    top, left = (size - h) // 2, (size - w) // 2
    if frames.ndim == 3:
        out[:, 0, top : top + h, left : left + w] = frames
    else:
        out[:, :, top : top + h, left : left + w] = frames.transpose(0, 3, 1, 2)
    return out


def preprocess(frames: np.ndarray, modality: str, settings: DicomSettings) -> np.ndarray:
    """Modality units ``(n, rows, cols)`` -> ``(n, 1, size, size)`` float32 in [-1, 1].

    Resizing first is exact for the CT window (both linear) and makes the MR
    percentiles cheap on large images. Colour frames ``(n, rows, cols, 3)`` (a colour run's,
    already RGB in [-1, 1]: ``pixels.decode_rgb``) are only resized and padded, to
    ``(n, 3, size, size)``.
    """
    small = resize_keep_aspect(frames, settings.image_size)
    if small.ndim == 4:
        return pad_square(np.clip(small, -1.0, 1.0), settings.image_size)
    return pad_square(normalise(small, modality, settings), settings.image_size)

