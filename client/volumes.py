"""3D volumes per series for 3D models: slices sorted along the normal, resampled with MONAI.

A series becomes one volume when its frames share size, orientation and pixel spacing
and sit at distinct, evenly spaced positions along the slice normal (a missing slice or
a mixed series is skipped as ``inconsistent-geometry``, never silently stitched).

Two entry points:

- production (:func:`series_geometry` + :func:`volume_from_slices`, used by
  :mod:`client.datasets` for ``spatial_dims`` 3): a series' cached 2D slices (already
  ``image_size`` squares, aspect kept, see :func:`client.dicom.preprocess`) and their
  per-slice geometry from the slice cache (:data:`client.cache.GEOMETRY_KEYS`) become one
  ``image_size`` cube with isotropic voxels. The series is turned to one anatomical frame
  (axes S, P, L: an axial series keeps its (slice, row, column) layout, a sagittal or coronal
  one is permuted onto it), then resampled with ``monai.transforms.Spacing`` to an
  isotropic voxel of ``longest physical extent / image_size`` mm and centre-padded with
  background (-1) to the cube. Why fit by the longest extent rather than a fixed mm grid
  cropped/padded to the cube: nothing of the series is cut off (a crop would silently drop
  anatomy, and a fixed mm needs a federation-wide voxel size that the run's config does not
  carry), it is the 3D twin of the 2D path (whose slices scale their longer side to
  ``image_size`` and pad the other), and in the usual case where the in-plane field of view
  is the longest extent the in-plane grid is not resampled at all: only the slice axis is,
  to the in-plane pixel size. Physical proportions are kept (a sphere stays a sphere); the
  scale (mm per voxel) may differ between series of different field of view, as in 2D.
- :func:`load_volumes` (tests, tools): reads the DICOM itself, normalises the volume as a
  whole (CT: HU window; otherwise percentiles over the volume) and resamples to
  ``VolumeSettings.spacing`` mm, centre-padded/cropped to ``VolumeSettings.shape``.

Everything stays on the hospital's machine, like :mod:`client.dicom`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

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
NO_GEOMETRY = "no-geometry"  # pixel spacing, orientation or positions missing (not a volume)


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


def slice_order(positions: np.ndarray) -> tuple[np.ndarray, float]:
    """(order sorting the slices along the normal, slice spacing in mm) of evenly spaced positions.

    Raises ``ValueError(INCONSISTENT_GEOMETRY)`` for an unknown position, two slices at one
    position, a missing slice or uneven spacing (gaps more than 10 % off their median).
    """
    pos = np.asarray(positions, dtype=np.float64)
    if len(pos) < 2 or not np.isfinite(pos).all():
        raise ValueError(INCONSISTENT_GEOMETRY)
    order = np.argsort(pos, kind="stable")
    gaps = np.diff(pos[order])
    dz = float(np.median(gaps))
    if dz <= 0 or np.any(gaps <= 1e-3) or np.max(np.abs(gaps - dz)) > 0.1 * dz:
        raise ValueError(INCONSISTENT_GEOMETRY)  # duplicates, a missing slice or uneven spacing
    return order, dz


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
    if len(frames) < min_slices:
        raise ValueError(TOO_FEW_SLICES)
    order, dz = slice_order(np.asarray(positions, dtype=np.float64))
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


# ----------------------------------------------------------------------------- production 3D


@dataclass(frozen=True)
class SeriesGeometry:
    """One series' slices as a volume: ``rows`` (slice indices sorted along the normal), voxel
    ``spacing`` (slice, row, column) in mm of the cached slices, ``orientation`` (6 cosines)."""

    rows: np.ndarray
    spacing: tuple[float, float, float]
    orientation: tuple[float, ...]

    def extent(self, shape: tuple[int, int]) -> tuple[float, float, float]:
        """Physical size (mm) of the volume with slices of ``shape`` (rows, columns)."""
        dz, dy, dx = self.spacing
        return (len(self.rows) * dz, shape[0] * dy, shape[1] * dx)


def has_geometry(meta: Mapping[str, np.ndarray]) -> bool:
    """Whether ``meta`` carries the per-slice geometry of the slice cache (format 4 on)."""
    return "pixel_spacing" in meta and "orientation" in meta


def series_geometry(meta: Mapping[str, np.ndarray], members: Sequence[int]) -> SeriesGeometry:
    """The geometry of the slices ``members`` of one series, from the cache's per-slice meta.

    Raises ``ValueError`` with a skip reason: :data:`NO_GEOMETRY` when a slice has no pixel
    spacing or orientation, ``inconsistent-geometry`` when they differ between slices or the
    positions are not distinct and evenly spaced (see :func:`slice_order`).
    """
    rows = np.asarray(members, dtype=np.int64)
    spacing = np.asarray(meta["pixel_spacing"], dtype=np.float64)[rows]
    orient = np.asarray(meta["orientation"], dtype=np.float64)[rows]
    if not (np.isfinite(spacing).all() and np.isfinite(orient).all()) or np.any(spacing <= 0):
        raise ValueError(NO_GEOMETRY)
    if not (np.allclose(spacing, spacing[0], rtol=1e-3) and np.allclose(orient, orient[0], atol=1e-3)):
        raise ValueError(INCONSISTENT_GEOMETRY)
    order, dz = slice_order(np.asarray(meta["position"], dtype=np.float64)[rows])
    return SeriesGeometry(rows[order], (dz, float(spacing[0][0]), float(spacing[0][1])),
                          tuple(float(v) for v in orient[0]))


def to_canonical(volume: np.ndarray, spacing: Sequence[float], orientation: Sequence[float]
                 ) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Permute/flip (slice, row, column) axes onto patient (S, P, L), i.e. LPS z, y, x ascending.

    An axial series (orientation 1,0,0,0,1,0) is unchanged; sagittal and coronal series land in
    the same anatomical frame. Each array axis goes to the patient axis its direction is closest
    to; an oblique series too close to 45 degrees to decide is left as it is.
    (``monai.transforms.Orientation`` would do this but needs nibabel, not a dependency here.)
    """
    o = np.asarray(orientation, dtype=np.float64)
    row_dir, col_dir = o[:3], o[3:]
    normal = np.cross(row_dir, col_dir)
    dirs = [normal, col_dir, row_dir]  # array axes D (sorted along the normal), H, W
    patient = [int(np.argmax(np.abs(d))) for d in dirs]  # 0 x (L), 1 y (P), 2 z (S)
    if sorted(patient) != [0, 1, 2]:
        return volume, (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    target = [2 - k for k in patient]  # S -> axis 0, P -> 1, L -> 2
    perm = [target.index(j) for j in range(3)]
    out = np.transpose(volume, perm)
    flips = tuple(j for j, a in enumerate(perm) if dirs[a][patient[a]] < 0)
    if flips:
        out = np.flip(out, axis=flips)
    return np.ascontiguousarray(out), tuple(float(spacing[a]) for a in perm)  # type: ignore[return-value]


def fit_spacing(extent: Sequence[float], size: int) -> float:
    """The isotropic voxel (mm) that fits the longest physical ``extent`` into ``size`` voxels."""
    return float(max(extent)) / size


def volume_from_slices(images: np.ndarray, geometry: SeriesGeometry, size: int,
                       voxel_mm: float | None = None) -> np.ndarray:
    """A series' slices ``images`` (N, 1, H, W) in [-1, 1] -> a (size, size, size) cube.

    Turned to the (S, P, L) frame, resampled by ``monai.transforms.Spacing`` to isotropic
    ``voxel_mm`` (default :func:`fit_spacing` of the series' extent, so the longest side spans
    the cube) and centre-padded (cropped by at most a rounding voxel) with background -1.
    Axes being downsampled are Gaussian-smoothed first (sigma (factor - 1) / 2 voxels, as
    ``skimage``/MONAI ``Resize`` anti-aliasing). Pairs pass one ``voxel_mm`` for both series,
    so A and B share the physical scale.
    """
    from monai.data import MetaTensor
    from monai.transforms import GaussianSmooth, ResizeWithPadOrCrop, Spacing

    stacked = np.asarray(images[geometry.rows], dtype=np.float32)[:, 0]  # (D, H, W)
    volume, spacing = to_canonical(stacked, geometry.spacing, geometry.orientation)
    voxel = voxel_mm or fit_spacing([n * d for n, d in zip(volume.shape, spacing)], size)
    sigma = [max(0.0, (voxel / d - 1.0) / 2.0) for d in spacing]
    tensor = torch.from_numpy(volume[None] + 1.0)  # background 0 while smoothing/resampling
    if max(sigma) > 0:
        tensor = torch.as_tensor(GaussianSmooth(sigma=sigma)(tensor)).as_subclass(torch.Tensor)
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    out = Spacing(pixdim=(voxel,) * 3, mode="bilinear", padding_mode="zeros")(
        MetaTensor(tensor, affine=affine))
    out = ResizeWithPadOrCrop(spatial_size=(size,) * 3, mode="constant", value=0.0)(out)
    cube = np.asarray(torch.as_tensor(out).detach().cpu().numpy()[0], dtype=np.float32) - 1.0
    return np.clip(cube, -1.0, 1.0)


__all__ = ["NoUsableDicomError", "VolumeSet", "VolumeSettings", "load_volumes", "resample", "TOO_FEW_SLICES",
           "NO_GEOMETRY", "SeriesGeometry", "fit_spacing", "has_geometry", "series_geometry",
           "slice_order", "to_canonical", "volume_from_slices"]
