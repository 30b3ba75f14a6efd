"""DICOM discovery and decoding on the hospital side.

Everything in here runs next to the hospital's images and never leaves it: the
decoded slices feed the local GAN training, and the per-file details (paths,
UIDs, skip reasons) exist only for the hospital's own log.  Only model weights
travel to the server.

Pipeline per file:

1. cheap header read (``stop_before_pixels=True``) to skip non-DICOM files,
   DICOMDIRs, non-image objects and filtered-out series without touching pixels;
2. full read + ``pixel_array`` decode (pydicom 3 + pylibjpeg cover the
   compressed transfer syntaxes); each frame of a multi-frame object is a slice;
3. modality units (modality LUT / rescale), MONOCHROME1 inversion, colour to
   luminance;
4. intensity normalisation to [-1, 1]: CT through a fixed HU window, every other
   modality (MR, CR, US, NM, ...) by per-slice percentiles, because MR and
   projection intensities have no absolute scale;
5. centre-pad to square and resize to ``image_size``.

A single bad file never aborts a scan: it is skipped with one of a fixed set of
short reasons and counted in the :class:`ScanReport`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

logger = logging.getLogger(__name__)

# Bump when the preprocessing changes so cached slices from older code are not reused.
PIPELINE_VERSION = 1

# Skip reasons: short fixed strings, used as keys in ScanReport.skipped.
NOT_DICOM = "not-dicom"
EMPTY_FILE = "empty-file"
DICOMDIR = "dicomdir"
NO_PIXEL_DATA = "no-pixel-data"
NON_IMAGE_OBJECT = "non-image-object"
UNDECODABLE = "undecodable"
TRUNCATED_PIXEL_DATA = "truncated-pixel-data"
TOO_SMALL = "too-small"
FILTERED_OUT = "filtered-out"
INCONSISTENT_GEOMETRY = "inconsistent-geometry"

SKIP_REASONS: tuple[str, ...] = (
    NOT_DICOM,
    EMPTY_FILE,
    DICOMDIR,
    NO_PIXEL_DATA,
    NON_IMAGE_OBJECT,
    UNDECODABLE,
    TRUNCATED_PIXEL_DATA,
    TOO_SMALL,
    FILTERED_OUT,
    INCONSISTENT_GEOMETRY,
)

_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage

# Modalities whose objects are not anatomical images even when they carry pixel
# data (an RT dose grid or a segmentation mask would poison the GAN's training set).
_NON_IMAGE_MODALITIES = frozenset(
    {
        "SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "RTIMAGE_PLAN", "SEG", "PR",
        "KO", "REG", "FID", "ECG", "HD", "EPS", "RESP", "AU", "DOC", "PLAN", "RWV",
        "IOL", "MPR", "OAM", "OPV", "OPM", "LEN", "KER", "SMR", "STAIN",
    }
)

# SOP class UID prefixes of non-image objects, for files whose Modality is absent or misleading.
_NON_IMAGE_SOP_PREFIXES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.88.",      # structured reports (SR, KO, CAD, dose SR)
    "1.2.840.10008.5.1.4.1.1.481.",     # RT objects (RTPLAN, RTSTRUCT, RTDOSE, ...)
    "1.2.840.10008.5.1.4.1.1.11.",      # presentation states
    "1.2.840.10008.5.1.4.1.1.9.",       # waveforms
    "1.2.840.10008.5.1.4.1.1.66",       # raw data, registration, segmentation, fiducials
    "1.2.840.10008.5.1.4.1.1.104.",     # encapsulated PDF/CDA
)
# RT Image is an image (portal films); keep it even though it sits under .481.
_IMAGE_SOP_EXCEPTIONS = frozenset({"1.2.840.10008.5.1.4.1.1.481.1"})

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True)
class DicomSettings:
    """What to select and how to preprocess; hashed into the cache key."""

    image_size: int = 64
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    series_pattern: str = ""
    min_size: int = 16
    ct_window: tuple[float, float] = (40.0, 400.0)
    mr_percentiles: tuple[float, float] = (1.0, 99.0)

    def fingerprint(self) -> str:
        """Stable hash of every field (plus the pipeline version) for cache keys."""
        payload = {"pipeline_version": PIPELINE_VERSION, **asdict(self)}
        text = json.dumps(payload, sort_keys=True, default=list)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


@dataclass
class ScanReport:
    """What a scan found; ``skipped_files`` holds local paths and stays in the hospital."""

    folder_name: str
    files_seen: int
    usable_files: int
    slices: int
    usable_by_modality: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One human-readable line for logs and the local UI."""
        mods = ", ".join(f"{m} {n}" for m, n in sorted(self.usable_by_modality.items()))
        line = f"{self.slices} slices from {self.usable_files} files"
        if mods:
            line += f" ({mods})"
        total_skipped = sum(self.skipped.values())
        if total_skipped:
            line += f"; skipped {total_skipped}: {_format_counts(self.skipped)}"
        return line


@dataclass
class SliceSet:
    """Preprocessed slices, their local-only metadata and the scan report.

    ``meta`` holds per-slice arrays of length N: ``modality``, ``series_description``,
    ``study_uid``, ``series_uid`` (str), ``position`` (float, NaN if unknown) and
    ``file_index`` (int, index into :func:`list_candidate_files` of the folder).
    """

    images: np.ndarray
    meta: dict[str, np.ndarray]
    report: ScanReport


class NoUsableDicomError(ValueError):
    """The folder has no usable image; the message says what was found instead."""


class _Skip(Exception):
    """Internal: a file is skipped for ``reason``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def list_candidate_files(folder: Path) -> list[Path]:
    """Every regular file under ``folder``, recursively, sorted by relative path.

    DICOM files often have no suffix, so nothing is filtered by name; DICOMDIRs and
    non-DICOM files are recognised by content later.  Symlinked directories are not
    followed (avoids loops).
    """
    folder = Path(folder)
    found: list[Path] = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in files:
            p = Path(root) / name
            if p.is_file():
                found.append(p)
    found.sort(key=lambda p: p.relative_to(folder).as_posix())
    return found


# --------------------------------------------------------------------------- header stage


def _read_header(path: Path) -> Dataset:
    """Read the header only; fall back to ``force=True`` for old preamble-less DICOM."""
    if path.stat().st_size == 0:
        raise _Skip(EMPTY_FILE)
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=False)
    except InvalidDicomError:
        pass
    except Exception as exc:  # corrupt file that does have a preamble
        raise _Skip(NOT_DICOM, f"{type(exc).__name__}: {exc}") from exc
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, defer_size="64 KB")
        # Random bytes parse "successfully" under force; demand real image-ish content.
        if "SOPClassUID" in ds or "Rows" in ds or "DirectoryRecordSequence" in ds:
            # Touch the elements so deferred parse errors surface here.
            ds.get("SOPClassUID")
            ds.get("Rows")
            return ds
    except Exception as exc:
        raise _Skip(NOT_DICOM, f"{type(exc).__name__}: {exc}") from exc
    raise _Skip(NOT_DICOM)


def _str(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword, "")
    except Exception:
        return ""
    return "" if value is None else str(value).strip()


def _is_non_image(ds: Dataset) -> bool:
    modality = _str(ds, "Modality").upper()
    if modality in _NON_IMAGE_MODALITIES:
        return True
    sop = _str(ds, "SOPClassUID")
    if sop and sop not in _IMAGE_SOP_EXCEPTIONS and sop.startswith(_NON_IMAGE_SOP_PREFIXES):
        return True
    return False


def _check_header(ds: Dataset, settings: DicomSettings, series_re: re.Pattern[str] | None) -> None:
    """Apply the cheap skips that need no pixel data."""
    sop = _str(ds, "SOPClassUID")
    media_sop = _str(getattr(ds, "file_meta", Dataset()), "MediaStorageSOPClassUID")
    if _DICOMDIR_SOP_CLASS in (sop, media_sop) or "DirectoryRecordSequence" in ds:
        raise _Skip(DICOMDIR)
    if _is_non_image(ds):
        raise _Skip(NON_IMAGE_OBJECT, _str(ds, "Modality") or sop)
    if settings.modalities:
        wanted = {m.upper() for m in settings.modalities}
        if _str(ds, "Modality").upper() not in wanted:
            raise _Skip(FILTERED_OUT, f"modality {_str(ds, 'Modality')!r}")
    if settings.body_parts:
        wanted = {b.upper() for b in settings.body_parts}
        if _str(ds, "BodyPartExamined").upper() not in wanted:
            raise _Skip(FILTERED_OUT, f"body part {_str(ds, 'BodyPartExamined')!r}")
    if series_re is not None and not series_re.search(_str(ds, "SeriesDescription")):
        raise _Skip(FILTERED_OUT, "series description")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if rows > 0 and cols > 0 and (rows < settings.min_size or cols < settings.min_size):
        raise _Skip(TOO_SMALL, f"{rows}x{cols}")


def _int(ds: Dataset, keyword: str, default: int = 0) -> int:
    try:
        value = ds.get(keyword, None)
        return default if value in (None, "") else int(value)
    except Exception:
        return default


# --------------------------------------------------------------------------- pixel stage


def _expected_native_bytes(ds: Dataset) -> int | None:
    """Bytes an uncompressed PixelData must hold, or None for compressed syntaxes."""
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is not None and tsyntax.is_compressed:
        return None
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    frames = max(_int(ds, "NumberOfFrames", 1), 1)
    samples = max(_int(ds, "SamplesPerPixel", 1), 1)
    bits = _int(ds, "BitsAllocated", 16)
    if "PixelData" not in ds:
        bits = 32 if "FloatPixelData" in ds else 64
    if _str(ds, "PhotometricInterpretation") == "YBR_FULL_422":
        # 4:2:2 subsampled: two luma + two chroma values per pixel pair.
        return (rows * cols * 2 * frames * bits + 7) // 8
    return (rows * cols * samples * frames * bits + 7) // 8


def _pixel_bytes_len(ds: Dataset) -> int:
    for kw in _PIXEL_KEYWORDS:
        if kw in ds:
            value = ds[kw].value
            return len(value) if value is not None else 0
    return 0


def _rescale_from_functional_groups(ds: Dataset, n_frames: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-frame (slope, intercept) from enhanced multi-frame functional groups.

    Per-frame groups win over the shared group; returns None when neither holds a
    PixelValueTransformationSequence (caller then uses identity).
    """

    def from_item(item: Dataset) -> tuple[float, float] | None:
        seq = item.get("PixelValueTransformationSequence")
        if not seq:
            return None
        pvt = seq[0]
        try:
            return float(pvt.get("RescaleSlope", 1.0)), float(pvt.get("RescaleIntercept", 0.0))
        except (TypeError, ValueError):
            return None

    shared = None
    sfg = ds.get("SharedFunctionalGroupsSequence")
    if sfg:
        shared = from_item(sfg[0])
    per_frame: list[tuple[float, float] | None] = [None] * n_frames
    pfg = ds.get("PerFrameFunctionalGroupsSequence")
    if pfg and len(pfg) == n_frames:
        per_frame = [from_item(item) for item in pfg]
    if shared is None and all(p is None for p in per_frame):
        return None
    default = shared or (1.0, 0.0)
    pairs = [p or default for p in per_frame]
    slopes = np.array([p[0] for p in pairs], dtype=np.float64)
    intercepts = np.array([p[1] for p in pairs], dtype=np.float64)
    return slopes, intercepts


def _to_luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma from RGB in the last axis."""
    rgb = rgb.astype(np.float32, copy=False)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def decode_frames(ds: Dataset) -> np.ndarray:
    """Decode all frames of ``ds`` to float32 ``(frames, rows, cols)`` in modality units.

    - Grayscale: the modality LUT / rescale slope+intercept is applied (``apply_modality_lut``;
      for enhanced multi-frame, the PixelValueTransformationSequence of the per-frame or
      shared functional groups, else identity), so CT comes out in Hounsfield units.
    - MONOCHROME1 (low value = bright): inverted as ``min + max - v`` over the whole
      object, so that afterwards bright means high signal and the value range is kept.
    - Colour (RGB; YBR is converted to RGB by pydicom 3's decoder; PALETTE COLOR through
      its colour LUT): converted to BT.601 luminance, no modality LUT.

    Raises whatever the decoder raises (the scanner maps that to "undecodable").
    """
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    arr = ds.pixel_array
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    n_frames = max(_int(ds, "NumberOfFrames", 1), 1)
    samples = max(_int(ds, "SamplesPerPixel", 1), 1)
    photometric = _str(ds, "PhotometricInterpretation").upper()

    if photometric == "PALETTE COLOR" and samples == 1:
        rgb = apply_color_lut(arr, ds)
        out = _to_luminance(rgb)
    elif samples == 3:
        # pydicom 3's pixel_array already converts YBR_* to RGB (as_rgb=True default).
        out = _to_luminance(arr)
    else:
        out = None

    if out is not None:
        frames = out.reshape(n_frames, rows, cols).astype(np.float32)
        return frames

    arr = arr.reshape(n_frames, rows, cols)
    fg = None
    if "RescaleSlope" not in ds and "ModalityLUTSequence" not in ds:
        fg = _rescale_from_functional_groups(ds, n_frames)
    if fg is not None:
        slopes, intercepts = fg
        values = arr.astype(np.float64) * slopes[:, None, None] + intercepts[:, None, None]
    else:
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    values = values.reshape(n_frames, rows, cols)

    if photometric == "MONOCHROME1":
        values = values.min() + values.max() - values
    return values.astype(np.float32)


def _normalise(frames: np.ndarray, modality: str, settings: DicomSettings) -> np.ndarray:
    """Map modality units to [-1, 1]: fixed HU window for CT, per-slice percentiles otherwise."""
    frames = frames.astype(np.float32, copy=False)
    if modality.upper() == "CT":
        level, width = settings.ct_window
        width = max(float(width), 1e-6)
        lo = level - width / 2.0
        scaled = (frames - lo) / width * 2.0 - 1.0
        return np.clip(scaled, -1.0, 1.0).astype(np.float32)
    p_lo, p_hi = settings.mr_percentiles
    flat = frames.reshape(frames.shape[0], -1)
    lo = np.percentile(flat, p_lo, axis=1).astype(np.float32)[:, None, None]
    hi = np.percentile(flat, p_hi, axis=1).astype(np.float32)[:, None, None]
    span = hi - lo
    safe = np.where(span > 0, span, 1.0)
    scaled = (frames - lo) / safe * 2.0 - 1.0
    # A constant slice carries no contrast: map it to background (-1).
    scaled = np.where(span > 0, scaled, -1.0)
    return np.clip(scaled, -1.0, 1.0).astype(np.float32)


def _pad_and_resize(frames: np.ndarray, size: int) -> np.ndarray:
    """Centre-pad to square with -1 (background after normalisation), then resize.

    Area interpolation when shrinking (anti-aliased), bilinear when enlarging.
    """
    n, h, w = frames.shape
    side = max(h, w)
    if h != w:
        padded = np.full((n, side, side), -1.0, dtype=np.float32)
        top, left = (side - h) // 2, (side - w) // 2
        padded[:, top : top + h, left : left + w] = frames
        frames = padded
    tensor = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32)).unsqueeze(1)
    if side > size:
        tensor = F.interpolate(tensor, size=(size, size), mode="area")
    elif side < size:
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)
    out = tensor.numpy().astype(np.float32, copy=False)
    return np.clip(out, -1.0, 1.0)


def _frame_positions(ds: Dataset, n_frames: int) -> np.ndarray:
    """Slice location along the plane normal per frame; NaN where unknown."""
    positions = np.full(n_frames, np.nan, dtype=np.float64)

    def normal_of(orientation: Any) -> np.ndarray | None:
        try:
            o = np.asarray([float(v) for v in orientation], dtype=np.float64)
            if o.shape != (6,):
                return None
            nrm = np.cross(o[:3], o[3:])
            return nrm if np.linalg.norm(nrm) > 0 else None
        except Exception:
            return None

    def dot(pos: Any, nrm: np.ndarray | None) -> float:
        try:
            p = np.asarray([float(v) for v in pos], dtype=np.float64)
            return float(p @ nrm) if nrm is not None and p.shape == (3,) else float("nan")
        except Exception:
            return float("nan")

    try:
        pfg = ds.get("PerFrameFunctionalGroupsSequence")
        if pfg and len(pfg) == n_frames:
            shared_nrm = None
            sfg = ds.get("SharedFunctionalGroupsSequence")
            if sfg and sfg[0].get("PlaneOrientationSequence"):
                shared_nrm = normal_of(sfg[0].PlaneOrientationSequence[0].get("ImageOrientationPatient", []))
            for i, item in enumerate(pfg):
                nrm = shared_nrm
                if item.get("PlaneOrientationSequence"):
                    nrm = normal_of(item.PlaneOrientationSequence[0].get("ImageOrientationPatient", [])) or nrm
                if item.get("PlanePositionSequence"):
                    positions[i] = dot(item.PlanePositionSequence[0].get("ImagePositionPatient", []), nrm)
            return positions
        if n_frames == 1:
            nrm = normal_of(ds.get("ImageOrientationPatient", []))
            pos = ds.get("ImagePositionPatient")
            if nrm is not None and pos is not None:
                positions[0] = dot(pos, nrm)
            elif "SliceLocation" in ds:
                positions[0] = float(ds.SliceLocation)
    except Exception:  # geometry is informative only; never fatal
        logger.debug("could not compute slice positions", exc_info=True)
    return positions


def _decode_file(path: Path, settings: DicomSettings) -> tuple[Dataset, np.ndarray]:
    """Full read + decode + normalise + resize one file; raises _Skip on problems."""
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:
        raise _Skip(UNDECODABLE, f"{type(exc).__name__}: {exc}") from exc
    if not any(kw in ds for kw in _PIXEL_KEYWORDS):
        raise _Skip(NO_PIXEL_DATA)
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if rows <= 0 or cols <= 0:
        raise _Skip(INCONSISTENT_GEOMETRY, f"rows={rows} cols={cols}")
    if rows < settings.min_size or cols < settings.min_size:
        raise _Skip(TOO_SMALL, f"{rows}x{cols}")
    expected = _expected_native_bytes(ds)
    if expected is not None and _pixel_bytes_len(ds) < expected:
        raise _Skip(TRUNCATED_PIXEL_DATA, f"{_pixel_bytes_len(ds)} < {expected} bytes")
    try:
        frames = decode_frames(ds)
    except Exception as exc:
        msg = str(exc)
        if "less than expected" in msg or "too short" in msg.lower():
            raise _Skip(TRUNCATED_PIXEL_DATA, msg) from exc
        raise _Skip(UNDECODABLE, f"{type(exc).__name__}: {msg}") from exc
    if frames.ndim != 3 or frames.shape[1:] != (rows, cols) or frames.shape[0] == 0:
        raise _Skip(INCONSISTENT_GEOMETRY, f"decoded shape {frames.shape}")
    if not np.all(np.isfinite(frames)):
        frames = np.nan_to_num(frames, nan=0.0, posinf=0.0, neginf=0.0)
    normalised = _normalise(frames, _str(ds, "Modality"), settings)
    return ds, _pad_and_resize(normalised, settings.image_size)


# --------------------------------------------------------------------------- scan


def scan_folder(folder: Path, settings: DicomSettings) -> SliceSet:
    """Find, decode and preprocess every usable DICOM image under ``folder``.

    CT is windowed in HU (``settings.ct_window``); every other modality (MR included)
    is normalised per slice with ``settings.mr_percentiles``.  Raises
    :class:`NoUsableDicomError` when nothing usable is found (or the folder is missing).
    """
    folder = Path(folder)
    if not folder.exists():
        raise NoUsableDicomError(f"no usable DICOM image in folder '{folder}': folder does not exist")
    if not folder.is_dir():
        raise NoUsableDicomError(f"no usable DICOM image in folder '{folder}': not a directory")

    series_re = re.compile(settings.series_pattern) if settings.series_pattern else None
    files = list_candidate_files(folder)
    skipped: dict[str, int] = {}
    skipped_files: list[tuple[str, str]] = []
    by_modality: dict[str, int] = {}
    chunks: list[np.ndarray] = []
    meta_lists: dict[str, list[Any]] = {
        k: [] for k in ("modality", "series_description", "study_uid", "series_uid", "position", "file_index")
    }
    usable_files = 0

    for index, path in enumerate(files):
        rel = path.relative_to(folder).as_posix()
        try:
            try:
                header = _read_header(path)
                _check_header(header, settings, series_re)
                ds, images = _decode_file(path, settings)
            except _Skip:
                raise
            except Exception as exc:  # anything unexpected is still only one bad file
                raise _Skip(UNDECODABLE, f"{type(exc).__name__}: {exc}") from exc
        except _Skip as skip:
            skipped[skip.reason] = skipped.get(skip.reason, 0) + 1
            skipped_files.append((rel, skip.reason))
            logger.debug("skip %s: %s %s", rel, skip.reason, skip.detail)
            continue

        n = images.shape[0]
        modality = _str(ds, "Modality").upper() or "OT"
        usable_files += 1
        by_modality[modality] = by_modality.get(modality, 0) + n
        chunks.append(images)
        meta_lists["modality"].extend([modality] * n)
        meta_lists["series_description"].extend([_str(ds, "SeriesDescription")] * n)
        meta_lists["study_uid"].extend([_str(ds, "StudyInstanceUID")] * n)
        meta_lists["series_uid"].extend([_str(ds, "SeriesInstanceUID")] * n)
        meta_lists["position"].extend(_frame_positions(ds, n).tolist())
        meta_lists["file_index"].extend([index] * n)

    total = sum(c.shape[0] for c in chunks)
    report = ScanReport(
        folder_name=folder.name,
        files_seen=len(files),
        usable_files=usable_files,
        slices=total,
        usable_by_modality=by_modality,
        skipped=skipped,
        skipped_files=skipped_files,
    )
    if total == 0:
        counts = _format_counts(skipped) if skipped else "nothing"
        raise NoUsableDicomError(
            f"no usable DICOM image in folder '{folder}': {len(files)} files, skipped: {counts}"
        )
    logger.info("scanned %s: %s", folder.name, report.summary())
    images = np.concatenate(chunks, axis=0).astype(np.float32, copy=False)
    meta = meta_arrays(meta_lists)
    return SliceSet(images=images, meta=meta, report=report)


def meta_arrays(meta_lists: dict[str, list[Any]]) -> dict[str, np.ndarray]:
    """Typed numpy arrays for the per-slice metadata lists (shared with the cache)."""
    out: dict[str, np.ndarray] = {}
    for key, values in meta_lists.items():
        if key == "position":
            out[key] = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        elif key == "file_index":
            out[key] = np.array(values, dtype=np.int64)
        else:
            out[key] = np.array([str(v) for v in values], dtype=str)
    return out
