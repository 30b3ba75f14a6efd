"""DICOM discovery and decoding on the hospital side.

Everything in here runs next to the hospital's images and never leaves it: the
decoded slices feed the local GAN training, and the per-file details (paths,
UIDs, skip reasons, series descriptions) exist only for the hospital's own log
and ``fedsynth data scan``.  Only :meth:`ScanReport.counts` is fit to export
(plain integers under fixed keys).

Pipeline per file (each file is read from disk once):

1. one ``dcmread`` (``force`` only as a fallback for preamble-less DICOM) and the
   cheap header checks: empty file, not DICOM, DICOMDIR, non-image objects (SR,
   RT, SEG, ...), synthetic images fedsynth itself exported, the hospital's
   filters; no pixel is decoded for a skipped file;
2. ``pixel_array``-equivalent decode through pydicom 3's decoders (pylibjpeg and
   openjpeg cover the compressed transfer syntaxes); each frame of a multi-frame
   object is a slice; a missing transfer syntax is inferred from how the file was
   actually encoded;
3. modality units (modality LUT / rescale, per-frame functional groups of
   enhanced objects), MONOCHROME1 inversion, colour to luminance (the Y plane of
   YBR data is taken as is, which skips pydicom's costly YBR->RGB conversion);
4. resize (area when shrinking, bilinear when enlarging; both linear, so they
   commute with step 5's linear map) keeping the aspect ratio;
5. intensity normalisation to [-1, 1]: CT through a fixed HU window, every other
   modality by per-slice percentiles (MR and projection intensities have no
   absolute scale), then centre-pad to square with -1.

A single bad file never aborts a scan: it is skipped with one of a fixed set of
short reasons (:data:`SKIP_REASONS`) and counted in the :class:`ScanReport`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

logger = logging.getLogger(__name__)

# Bump when the preprocessing changes so cached slices from older code are not reused.
PIPELINE_VERSION = 2

# Skip reasons: short fixed strings, used as keys in ScanReport.skipped.
NOT_DICOM = "not-dicom"
EMPTY_FILE = "empty-file"
DICOMDIR = "dicomdir"
NO_PIXEL_DATA = "no-pixel-data"
NON_IMAGE_OBJECT = "non-image-object"
SYNTHETIC = "synthetic"
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
    SYNTHETIC,
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

# Standard modality codes that may appear as keys of ScanReport.counts(); anything
# else a file claims (free text) is counted as "other" so no odd value leaks out.
_COUNTED_MODALITIES = frozenset(
    {"CT", "MR", "CR", "DX", "MG", "US", "NM", "PT", "XA", "RF", "OT", "SC", "IO", "PX", "RG",
     "ES", "XC", "GM", "SM", "OP", "OCT", "BMD", "DG", "TG", "IVUS", "RTIMAGE"}
)

# Private block that fedsynth.export writes; the creator string marks a synthetic image.
SYNTHETIC_PRIVATE_CREATOR = "FEDSYNTH SYNTHETIC"
_SYNTHETIC_PRIVATE_GROUP = 0x0009

# Tag bytes of (7FE0,0010) Pixel Data, little and big endian: lets a file whose pixel
# element pydicom could not parse be told apart from one that never had pixels.
_PIXEL_TAG_BYTES = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")


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

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.min_size < 1:
            raise ValueError(f"image_size and min_size must be >= 1, got {self.image_size}, {self.min_size}")
        if self.series_pattern:
            try:
                re.compile(self.series_pattern)
            except re.error as exc:
                raise ValueError(f"series_pattern {self.series_pattern!r} is not a valid regular "
                                 f"expression: {exc}") from exc

    def fingerprint(self) -> str:
        """Stable hash of every field (plus the pipeline version) for cache keys."""
        payload = {"pipeline_version": PIPELINE_VERSION, **asdict(self)}
        text = json.dumps(payload, sort_keys=True, default=list)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


@dataclass
class SeriesSummary:
    """One usable series, for the hospital's own eyes only (UIDs and descriptions are local)."""

    study_uid: str
    series_uid: str
    modality: str
    description: str
    size: str  # "ROWSxCOLS", or "mixed" when the files of the series differ
    files: int
    slices: int


@dataclass
class ScanReport:
    """What a scan found.

    ``skipped_files`` and ``series`` hold local paths, UIDs and descriptions and stay in
    the hospital; :meth:`counts` is the only view meant for metrics.
    """

    folder_name: str
    files_seen: int
    usable_files: int
    slices: int
    usable_by_modality: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    usable_by_size: dict[str, int] = field(default_factory=dict)
    series: list[SeriesSummary] = field(default_factory=list)

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

    def counts(self) -> dict[str, int]:
        """Integers under fixed keys only: safe for metrics and messages to the coordinator.

        No path, UID, description or free-text header value can appear, keys included
        (modalities outside the standard codes are counted as ``slices_other``).
        """
        out: dict[str, int] = {
            "files_seen": int(self.files_seen),
            "usable_files": int(self.usable_files),
            "slices": int(self.slices),
            "studies": len({s.study_uid for s in self.series}),
            "series": len(self.series),
        }
        for reason in SKIP_REASONS:
            out[f"skipped_{reason.replace('-', '_')}"] = int(self.skipped.get(reason, 0))
        for modality, n in self.usable_by_modality.items():
            key = f"slices_{modality.lower() if modality in _COUNTED_MODALITIES else 'other'}"
            out[key] = out.get(key, 0) + int(n)
        return out


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


@dataclass
class FileRecord:
    """One usable file after decoding, before 2D resizing (used by :mod:`client.volumes`).

    ``frames`` are float32 ``(n, rows, cols)`` in modality units (HU for CT);
    ``positions`` the location of each frame along the slice normal (mm, NaN unknown);
    ``orientation`` the 6 direction cosines, ``pixel_spacing`` (row, col) in mm.
    """

    index: int
    rel: str
    modality: str
    study_uid: str
    series_uid: str
    series_description: str
    frames: np.ndarray
    positions: np.ndarray
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None


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


# --------------------------------------------------------------------------- reading


def _looks_like_dicom(ds: Dataset) -> bool:
    """Random bytes can parse under ``force``; demand real DICOM content."""
    from pydicom.datadict import DicomDictionary

    if "SOPClassUID" in ds or "Rows" in ds or "DirectoryRecordSequence" in ds:
        return True
    known = sum(1 for tag in ds.keys() if tag.group in (0x0008, 0x0010, 0x0020, 0x0028)
                and int(tag) in DicomDictionary)
    return known >= 3


def _read_dataset(path: Path) -> Dataset:
    """Read the whole file once; ``force`` only for preamble-less (old or headerless) DICOM."""
    if path.stat().st_size == 0:
        raise _Skip(EMPTY_FILE)
    try:
        return pydicom.dcmread(path, force=False)
    except InvalidDicomError:
        pass
    except Exception as exc:  # has a preamble but fails: corrupt header or cut-off pixel data
        raise _classify_read_failure(path, exc) from exc
    try:
        ds = pydicom.dcmread(path, force=True, defer_size="1 MB")
        if _looks_like_dicom(ds):
            ds.get("SOPClassUID")  # touch: deferred parse errors surface here
            ds.get("Rows")
            return ds
    except Exception as exc:
        raise _Skip(NOT_DICOM, f"{type(exc).__name__}: {exc}") from exc
    raise _Skip(NOT_DICOM)


def _classify_read_failure(path: Path, exc: Exception) -> _Skip:
    """A file with a DICOM preamble failed to read: header fine -> pixel data is the problem."""
    detail = f"{type(exc).__name__}: {exc}"
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:
        return _Skip(NOT_DICOM, detail)
    if "Rows" in header and _file_has_pixel_tag(path):
        return _Skip(TRUNCATED_PIXEL_DATA, detail)
    return _Skip(UNDECODABLE, detail)


def _file_has_pixel_tag(path: Path, limit: int = 256 * 1024 * 1024) -> bool:
    """Whether the raw bytes hold a Pixel Data tag (only called for files already in trouble)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit)
    except OSError:
        return False
    return any(tag in data for tag in _PIXEL_TAG_BYTES)


def _str(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword, "")
    except Exception:
        return ""
    return "" if value is None else str(value).strip()


def _int(ds: Dataset, keyword: str, default: int = 0) -> int:
    try:
        value = ds.get(keyword, None)
        return default if value in (None, "") else int(value)
    except Exception:
        return default


def _is_non_image(ds: Dataset) -> bool:
    modality = _str(ds, "Modality").upper()
    if modality in _NON_IMAGE_MODALITIES:
        return True
    sop = _str(ds, "SOPClassUID")
    if sop and sop not in _IMAGE_SOP_EXCEPTIONS and sop.startswith(_NON_IMAGE_SOP_PREFIXES):
        return True
    return False


def is_synthetic(ds: Dataset) -> bool:
    """True for images fedsynth (or anyone honest) flagged as synthetic: never train on them."""
    if _str(ds, "SyntheticData").upper() == "YES":
        return True
    try:
        block = ds.private_block(_SYNTHETIC_PRIVATE_GROUP, SYNTHETIC_PRIVATE_CREATOR)
        return block is not None
    except (KeyError, ValueError):
        return False
    except Exception:
        return False


def _check_header(ds: Dataset, settings: DicomSettings, series_re: re.Pattern[str] | None) -> None:
    """Apply the cheap skips that need no pixel decode."""
    sop = _str(ds, "SOPClassUID")
    media_sop = _str(getattr(ds, "file_meta", Dataset()), "MediaStorageSOPClassUID")
    if _DICOMDIR_SOP_CLASS in (sop, media_sop) or "DirectoryRecordSequence" in ds:
        raise _Skip(DICOMDIR)
    if _is_non_image(ds):
        raise _Skip(NON_IMAGE_OBJECT, _str(ds, "Modality") or sop)
    if is_synthetic(ds):
        raise _Skip(SYNTHETIC)
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


# --------------------------------------------------------------------------- pixel stage


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Files without file meta (or without its TransferSyntaxUID) get the syntax they were read in.

    pydicom needs it to decode; only native (uncompressed) encodings can lack it, and
    ``original_encoding`` records which one the parser actually met.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    if implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


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
    slopes = np.array([p[0] for p in pairs], dtype=np.float32)
    intercepts = np.array([p[1] for p in pairs], dtype=np.float32)
    return slopes, intercepts


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601


def _to_luminance(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma from RGB in the last axis."""
    return rgb.astype(np.float32, copy=False) @ _LUMA


def _raw_pixels(ds: Dataset) -> tuple[np.ndarray, str]:
    """Decoded stored values and the photometric interpretation they come out in.

    ``as_rgb=False``: YBR data stays YBR, so its Y plane can serve as luminance without
    pydicom's (slow) conversion to RGB and back.
    """
    from pydicom.pixels import get_decoder

    tsyntax = ds.file_meta.TransferSyntaxUID
    decoder = get_decoder(tsyntax)
    arr, meta = decoder.as_array(ds, as_rgb=False)
    return arr, str(meta.get("photometric_interpretation", _str(ds, "PhotometricInterpretation")))


def decode_frames(ds: Dataset) -> np.ndarray:
    """Decode all frames of ``ds`` to float32 ``(frames, rows, cols)`` in modality units.

    - Grayscale: the modality LUT / rescale slope+intercept is applied (for enhanced
      multi-frame, the PixelValueTransformationSequence of the per-frame or shared
      functional groups, else identity), so CT comes out in Hounsfield units.
    - MONOCHROME1 (low value = bright): inverted as ``min + max - v`` over the whole
      object, so that afterwards bright means high signal and the value range is kept.
    - Colour: the Y plane of YBR data, BT.601 luminance of RGB, PALETTE COLOR through
      its colour LUT; no modality LUT.

    Raises whatever the decoder raises (the scanner maps that to "undecodable").
    """
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    _ensure_transfer_syntax(ds)
    arr, photometric = _raw_pixels(ds)
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    n_frames = max(_int(ds, "NumberOfFrames", 1), 1)
    samples = max(_int(ds, "SamplesPerPixel", 1), 1)
    photometric = photometric.upper()

    if photometric == "PALETTE COLOR" and samples == 1:
        return _to_luminance(apply_color_lut(arr, ds)).reshape(n_frames, rows, cols)
    if samples == 3:
        arr = arr.reshape(n_frames, rows, cols, 3)
        if photometric.startswith("YBR"):
            return arr[..., 0].astype(np.float32)
        return _to_luminance(arr)

    arr = arr.reshape(n_frames, rows, cols)
    if "ModalityLUTSequence" in ds:
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    elif "RescaleSlope" in ds or "RescaleIntercept" in ds:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        values = arr.astype(np.float32)
        if slope != 1.0:
            values *= np.float32(slope)
        if intercept != 0.0:
            values += np.float32(intercept)
    else:
        fg = _rescale_from_functional_groups(ds, n_frames)
        values = arr.astype(np.float32)
        if fg is not None:
            values = values * fg[0][:, None, None] + fg[1][:, None, None]
    values = values.reshape(n_frames, rows, cols)
    if photometric == "MONOCHROME1":
        values = values.min() + values.max() - values
    return values.astype(np.float32, copy=False)


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


def _resize_keep_aspect(frames: np.ndarray, size: int) -> np.ndarray:
    """Scale so the longer side is ``size`` (area when shrinking, bilinear when enlarging)."""
    n, h, w = frames.shape
    side = max(h, w)
    if side == size:
        return frames
    out_h, out_w = max(1, round(h * size / side)), max(1, round(w * size / side))
    tensor = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32)).unsqueeze(1)
    if side > size:
        tensor = F.interpolate(tensor, size=(out_h, out_w), mode="area")
    else:
        tensor = F.interpolate(tensor, size=(out_h, out_w), mode="bilinear", align_corners=False)
    return tensor[:, 0].numpy()


def _pad_square(frames: np.ndarray, size: int) -> np.ndarray:
    """Centre-pad ``(n, h, w)`` (h, w <= size) to ``(n, 1, size, size)`` with -1 (background)."""
    n, h, w = frames.shape
    out = np.full((n, 1, size, size), -1.0, dtype=np.float32)
    top, left = (size - h) // 2, (size - w) // 2
    out[:, 0, top : top + h, left : left + w] = frames
    return out


def preprocess(frames: np.ndarray, modality: str, settings: DicomSettings) -> np.ndarray:
    """Modality units ``(n, rows, cols)`` -> ``(n, 1, size, size)`` float32 in [-1, 1].

    Resizing first is exact for the CT window (both linear) and makes the MR
    percentiles cheap on large images.
    """
    small = _resize_keep_aspect(frames, settings.image_size)
    return _pad_square(normalise(small, modality, settings), settings.image_size)


def _frame_geometry(ds: Dataset, n_frames: int) -> tuple[np.ndarray, tuple[float, ...] | None,
                                                         tuple[float, float] | None]:
    """Per-frame location along the plane normal (NaN where unknown), orientation, pixel spacing."""
    positions = np.full(n_frames, np.nan, dtype=np.float64)
    orientation: tuple[float, ...] | None = None
    spacing: tuple[float, float] | None = None

    def floats(values: Any, n: int) -> tuple[float, ...] | None:
        try:
            out = tuple(float(v) for v in values)
        except Exception:
            return None
        return out if len(out) == n and all(np.isfinite(out)) else None

    def normal_of(o: tuple[float, ...] | None) -> np.ndarray | None:
        if o is None:
            return None
        nrm = np.cross(np.asarray(o[:3]), np.asarray(o[3:]))
        return nrm if np.linalg.norm(nrm) > 0 else None

    def dot(pos: Any, nrm: np.ndarray | None) -> float:
        p = floats(pos, 3) if pos is not None else None
        return float(np.asarray(p) @ nrm) if nrm is not None and p is not None else float("nan")

    try:
        pfg = ds.get("PerFrameFunctionalGroupsSequence")
        if pfg and len(pfg) == n_frames:
            sfg = ds.get("SharedFunctionalGroupsSequence")
            shared = sfg[0] if sfg else Dataset()
            if shared.get("PlaneOrientationSequence"):
                orientation = floats(shared.PlaneOrientationSequence[0].get("ImageOrientationPatient", []), 6)
            if shared.get("PixelMeasuresSequence"):
                spacing = floats(shared.PixelMeasuresSequence[0].get("PixelSpacing", []), 2)  # type: ignore[assignment]
            for i, item in enumerate(pfg):
                if item.get("PlaneOrientationSequence"):
                    orientation = floats(
                        item.PlaneOrientationSequence[0].get("ImageOrientationPatient", []), 6) or orientation
                if spacing is None and item.get("PixelMeasuresSequence"):
                    spacing = floats(item.PixelMeasuresSequence[0].get("PixelSpacing", []), 2)  # type: ignore[assignment]
                if item.get("PlanePositionSequence"):
                    positions[i] = dot(item.PlanePositionSequence[0].get("ImagePositionPatient"),
                                       normal_of(orientation))
            return positions, orientation, spacing
        orientation = floats(ds.get("ImageOrientationPatient", []), 6)
        spacing = floats(ds.get("PixelSpacing", []), 2)  # type: ignore[assignment]
        if n_frames == 1:
            nrm = normal_of(orientation)
            pos = ds.get("ImagePositionPatient")
            if nrm is not None and pos is not None:
                positions[0] = dot(pos, nrm)
            elif "SliceLocation" in ds:
                positions[0] = float(ds.SliceLocation)
    except Exception:  # geometry is informative only; never fatal
        logger.debug("could not compute slice geometry", exc_info=True)
    return positions, orientation, spacing


def _decode_dataset(ds: Dataset, path: Path, settings: DicomSettings) -> np.ndarray:
    """Checks that need pixel data, then decode to modality units; raises _Skip on problems."""
    if not any(kw in ds for kw in _PIXEL_KEYWORDS):
        if len(ds) == 0 or "Rows" in ds:
            # An image header (or an unparseable body) without a readable pixel element:
            # if the tag is in the bytes, the element was cut off.
            if _file_has_pixel_tag(path):
                raise _Skip(TRUNCATED_PIXEL_DATA, "pixel data element present but unreadable")
        raise _Skip(NO_PIXEL_DATA)
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if rows <= 0 or cols <= 0:
        raise _Skip(INCONSISTENT_GEOMETRY, f"rows={rows} cols={cols}")
    if rows < settings.min_size or cols < settings.min_size:
        raise _Skip(TOO_SMALL, f"{rows}x{cols}")
    _ensure_transfer_syntax(ds)
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
    return frames


# --------------------------------------------------------------------------- scan


def _check_folder(folder: Path) -> None:
    if not folder.exists():
        raise NoUsableDicomError(f"no usable DICOM image in folder '{folder}': folder does not exist")
    if not folder.is_dir():
        raise NoUsableDicomError(f"no usable DICOM image in folder '{folder}': not a directory")


def iter_files(folder: Path, settings: DicomSettings) -> Iterator[FileRecord | tuple[str, str]]:
    """Read every candidate file once: a :class:`FileRecord` if usable, else ``(rel, reason)``.

    Never raises for a bad file; raises :class:`NoUsableDicomError` only when ``folder``
    is missing or not a directory.
    """
    folder = Path(folder)
    _check_folder(folder)
    series_re = re.compile(settings.series_pattern) if settings.series_pattern else None
    for index, path in enumerate(list_candidate_files(folder)):
        rel = path.relative_to(folder).as_posix()
        try:
            try:
                ds = _read_dataset(path)
                _check_header(ds, settings, series_re)
                frames = _decode_dataset(ds, path, settings)
                positions, orientation, spacing = _frame_geometry(ds, frames.shape[0])
            except _Skip:
                raise
            except Exception as exc:  # anything unexpected is still only one bad file
                raise _Skip(UNDECODABLE, f"{type(exc).__name__}: {exc}") from exc
        except _Skip as skip:
            logger.debug("skip %s: %s %s", rel, skip.reason, skip.detail)
            yield rel, skip.reason
            continue
        yield FileRecord(
            index=index, rel=rel, modality=_str(ds, "Modality").upper() or "OT",
            study_uid=_str(ds, "StudyInstanceUID"), series_uid=_str(ds, "SeriesInstanceUID"),
            series_description=_str(ds, "SeriesDescription"), frames=frames, positions=positions,
            orientation=orientation, pixel_spacing=spacing,
        )


def no_usable_error(folder: Path, files_seen: int, skipped: dict[str, int]) -> NoUsableDicomError:
    """The one-line error for a folder without usable images, with what was found instead."""
    counts = _format_counts(skipped) if skipped else "nothing"
    return NoUsableDicomError(
        f"no usable DICOM image in folder '{folder}': {files_seen} files, skipped: {counts}"
    )


def scan_folder(folder: Path, settings: DicomSettings) -> SliceSet:
    """Find, decode and preprocess every usable DICOM image under ``folder``.

    CT is windowed in HU (``settings.ct_window``); every other modality (MR included)
    is normalised per slice with ``settings.mr_percentiles``.  Raises
    :class:`NoUsableDicomError` when nothing usable is found (or the folder is missing).
    """
    folder = Path(folder)
    skipped: dict[str, int] = {}
    skipped_files: list[tuple[str, str]] = []
    by_modality: dict[str, int] = {}
    by_size: dict[str, int] = {}
    series: dict[tuple[str, str], SeriesSummary] = {}
    chunks: list[np.ndarray] = []
    meta_lists: dict[str, list[Any]] = {
        k: [] for k in ("modality", "series_description", "study_uid", "series_uid", "position", "file_index")
    }
    files_seen = usable_files = 0

    for item in iter_files(folder, settings):
        files_seen += 1
        if isinstance(item, tuple):
            rel, reason = item
            skipped[reason] = skipped.get(reason, 0) + 1
            skipped_files.append((rel, reason))
            continue
        n, rows, cols = item.frames.shape
        images = preprocess(item.frames, item.modality, settings)
        usable_files += 1
        by_modality[item.modality] = by_modality.get(item.modality, 0) + n
        size = f"{rows}x{cols}"
        by_size[size] = by_size.get(size, 0) + n
        key = (item.study_uid, item.series_uid)
        if key not in series:
            series[key] = SeriesSummary(item.study_uid, item.series_uid, item.modality,
                                        item.series_description, size, 0, 0)
        entry = series[key]
        entry.files += 1
        entry.slices += n
        if entry.size != size:
            entry.size = "mixed"
        chunks.append(images)
        meta_lists["modality"].extend([item.modality] * n)
        meta_lists["series_description"].extend([item.series_description] * n)
        meta_lists["study_uid"].extend([item.study_uid] * n)
        meta_lists["series_uid"].extend([item.series_uid] * n)
        meta_lists["position"].extend(item.positions.tolist())
        meta_lists["file_index"].extend([item.index] * n)

    total = sum(c.shape[0] for c in chunks)
    report = ScanReport(
        folder_name=folder.name,
        files_seen=files_seen,
        usable_files=usable_files,
        slices=total,
        usable_by_modality=by_modality,
        skipped=skipped,
        skipped_files=skipped_files,
        usable_by_size=by_size,
        series=sorted(series.values(), key=lambda s: (s.study_uid, s.series_uid)),
    )
    if total == 0:
        raise no_usable_error(folder, files_seen, skipped)
    logger.info("scanned %s: %s", folder.name, report.summary())
    images = np.concatenate(chunks, axis=0).astype(np.float32, copy=False)
    return SliceSet(images=images, meta=meta_arrays(meta_lists), report=report)


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
