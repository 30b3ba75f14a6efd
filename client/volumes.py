"""3D volumes per series for 3D models: slices sorted along the normal, resampled with MONAI.

A series becomes one volume when its frames share size, orientation and pixel spacing
and sit at distinct, evenly spaced positions along the slice normal (a missing slice or
a mixed series is skipped as ``inconsistent-geometry``, never silently stitched). The
volume is normalised as a whole (CT: HU window; otherwise percentiles over the volume,
so contrast between slices is kept), resampled to ``spacing`` mm with
``monai.transforms.Spacing`` and centre-padded/cropped to ``shape`` with background -1.
Everything stays on the hospital's machine, like :mod:`client.dicom`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from client.dicom import (
    INCONSISTENT_GEOMETRY,
    DicomSettings,
    FileRecord,
    NoUsableDicomError,
    iter_files,
    no_usable_error,
    normalise,
)

logger = logging.getLogger(__name__)

TOO_FEW_SLICES = "too-few-slices"


@dataclass(frozen=True)
class VolumeSettings:
    """Target grid of the 3D model: voxel size (slice, row, column) in mm and array shape."""

    spacing: tuple[float, float, float] = (4.0, 4.0, 4.0)
    shape: tuple[int, int, int] = (32, 64, 64)
    min_slices: int = 4

    def __post_init__(self) -> None:
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be three positive mm values, got {self.spacing}")
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be three positive sizes, got {self.shape}")


@dataclass
class VolumeSet:
    """``volumes`` (N, 1, D, H, W) float32 in [-1, 1]; the rest is local-only bookkeeping."""

    volumes: np.ndarray
    series_uids: list[str]
    modalities: list[str]
    skipped_series: list[tuple[str, str]] = field(default_factory=list)


def _series_volume(records: list[FileRecord], min_slices: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Stack one series' frames sorted by position: ((D, H, W) modality units, (dz, dy, dx) mm)."""
    frames, positions = [], []
    shapes = {r.frames.shape[1:] for r in records}
    orientations = [r.orientation for r in records]
    spacings = {r.pixel_spacing for r in records}
    if len(shapes) != 1 or len(spacings) != 1 or None in spacings or any(o is None for o in orientations):
        raise ValueError(INCONSISTENT_GEOMETRY)
    if not all(np.allclose(o, orientations[0], atol=1e-4) for o in orientations):  # type: ignore[arg-type]
        raise ValueError(INCONSISTENT_GEOMETRY)
    for r in records:
        frames.extend(list(r.frames))
        positions.extend(r.positions.tolist())
    pos = np.asarray(positions, dtype=np.float64)
    if len(frames) < min_slices:
        raise ValueError(TOO_FEW_SLICES)
    if not np.isfinite(pos).all():
        raise ValueError(INCONSISTENT_GEOMETRY)
    order = np.argsort(pos, kind="stable")
    gaps = np.diff(pos[order])
    dz = float(np.median(gaps))
    if dz <= 0 or np.any(gaps <= 1e-3) or np.max(np.abs(gaps - dz)) > 0.1 * dz:
        raise ValueError(INCONSISTENT_GEOMETRY)  # duplicates, a missing slice or uneven spacing
    volume = np.stack([frames[i] for i in order]).astype(np.float32)
    dy, dx = next(iter(spacings))  # type: ignore[misc]
    return volume, (dz, float(dy), float(dx))


def resample(volume: np.ndarray, spacing: tuple[float, float, float], settings: VolumeSettings) -> np.ndarray:
    """(D, H, W) in [-1, 1] at ``spacing`` mm -> ``settings.shape`` at ``settings.spacing`` mm."""
    from monai.data import MetaTensor
    from monai.transforms import Compose, ResizeWithPadOrCrop, Spacing

    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    image = MetaTensor(torch.from_numpy(volume[None]), affine=affine)
    transform = Compose([
        Spacing(pixdim=settings.spacing, mode="bilinear", padding_mode="border"),
        ResizeWithPadOrCrop(spatial_size=settings.shape, mode="constant", value=-1.0),
    ])
    out = transform(image)
    return np.clip(np.asarray(out.detach().cpu().numpy()[0], dtype=np.float32), -1.0, 1.0)


def load_volumes(folder: Path, settings: VolumeSettings | None = None,
                 dicom_settings: DicomSettings | None = None) -> VolumeSet:
    """One resampled volume per usable series under ``folder``.

    Raises :class:`client.dicom.NoUsableDicomError` when no series makes a volume.
    """
    settings = settings or VolumeSettings()
    dicom_settings = dicom_settings or DicomSettings()
    series: dict[str, list[FileRecord]] = {}
    skipped: dict[str, int] = {}
    files_seen = 0
    for item in iter_files(Path(folder), dicom_settings):
        files_seen += 1
        if isinstance(item, tuple):
            skipped[item[1]] = skipped.get(item[1], 0) + 1
            continue
        series.setdefault(item.series_uid or f"file-{item.index}", []).append(item)

    volumes, uids, modalities, skipped_series = [], [], [], []
    for uid, records in sorted(series.items()):
        try:
            raw, spacing = _series_volume(records, settings.min_slices)
        except ValueError as exc:
            skipped_series.append((uid, str(exc)))
            skipped[str(exc)] = skipped.get(str(exc), 0) + len(records)
            logger.debug("series %s not a volume: %s", uid, exc)
            continue
        modality = records[0].modality
        normalised = normalise(raw[None], modality, dicom_settings)[0]  # whole-volume statistics
        volumes.append(resample(normalised, spacing, settings))
        uids.append(uid)
        modalities.append(modality)
    if not volumes:
        raise no_usable_error(Path(folder), files_seen, skipped)
    logger.info("%d volumes from %s (%d series skipped)", len(volumes), Path(folder).name, len(skipped_series))
    return VolumeSet(np.stack(volumes)[:, None], uids, modalities, skipped_series)


__all__ = ["NoUsableDicomError", "VolumeSet", "VolumeSettings", "load_volumes", "resample", "TOO_FEW_SLICES"]
