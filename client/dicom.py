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
import io
import os
import stat
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from shared_models.patterns import check_pattern, compile_pattern

logger = logging.getLogger(__name__)

# Bump when the preprocessing changes so cached slices from older code are not reused.
PIPELINE_VERSION = 3  # 3: SOP instance, frame and frame of reference per slice

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
TOO_LARGE = "too-large"  # declared (or encoded) decoded size over DicomSettings.max_decoded_mb
UNREADABLE = "unreadable"  # the file exists but cannot be opened or read (permissions, I/O error)
UNREADABLE_FOLDER = "unreadable-folder"  # a subfolder that cannot be listed: its files are unseen
OUTSIDE_DATA_DIR = "outside-data-dir"  # a symlink resolving outside the data folder: not followed
NOT_A_FILE = "not-a-file"  # FIFO, socket, device, dangling symlink: never opened

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
    TOO_LARGE,
    UNREADABLE,
    UNREADABLE_FOLDER,
    OUTSIDE_DATA_DIR,
    NOT_A_FILE,
)

# Reasons that say the scan could not see everything (not what a file holds): a result with
# one of these is not cached, so fixing permissions takes effect on the next run.
TRANSIENT_SKIP_REASONS = frozenset({UNREADABLE, UNREADABLE_FOLDER})

_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
# Segmentation Storage and RT Structure Set Storage: masks, not images (client.segmentation)
_SEGMENTATION_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.66.4",
                                       "1.2.840.10008.5.1.4.1.1.481.3"})

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
    # Decompression-bomb budget: the most decoded pixel bytes one file may produce (Rows x
    # Columns x Frames x SamplesPerPixel x BitsAllocated / 8), checked before any decode.
    max_decoded_mb: float = 256.0

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.min_size < 1:
            raise ValueError(f"image_size and min_size must be >= 1, got {self.image_size}, {self.min_size}")
        if not self.max_decoded_mb > 0:
            raise ValueError(f"max_decoded_mb must be > 0, got {self.max_decoded_mb}")
        if self.series_pattern:
            check_pattern(self.series_pattern)  # RE2 (linear time), as every label pattern

    @property
    def max_decoded_bytes(self) -> int:
        return int(self.max_decoded_mb * 1024 * 1024)

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
    # DICOM SEG / RTSTRUCT files (relative paths, skipped as non-image objects): the masks the
    # "masked" layout reads (client.segmentation)
    segmentation_files: list[str] = field(default_factory=list)

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


# Text attributes kept per slice (at the hospital only) for a run's class or domain rules, by
# their meta key; ``modality`` and ``series_description`` are kept as well.
LABEL_ATTRIBUTES = {"protocol_name": "ProtocolName", "body_part": "BodyPartExamined",
                    "image_comments": "ImageComments", "sequence_name": "SequenceName"}
META_KEYS = ("modality", "series_description", "study_uid", "series_uid", "position",
             "file_index", *LABEL_ATTRIBUTES, "sop_uid", "frame_number", "frame_of_reference")
# sop_uid / frame_number (1-based within its file) / frame_of_reference: what a segmentation's
# references name (client.segmentation matches masks to slices by them)


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
    # the text attributes a run's class / domain rule may read (shared_models DataConfig)
    labels: dict[str, str] = field(default_factory=dict)
    sop_uid: str = ""
    frame_of_reference: str = ""


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


def walk_folder(folder: Path) -> list[tuple[str, Path | None, str]]:
    """Every entry under ``folder`` the scan must account for, sorted by relative path.

    Returns ``(rel, path, reason)``: ``reason`` is ``""`` for a regular file to read (``path``
    then names it, a symlink already resolved to its target inside the folder), else one of
    :data:`UNREADABLE_FOLDER`, :data:`OUTSIDE_DATA_DIR`, :data:`NOT_A_FILE` (``path`` None).
    Nothing here opens a file: entries are classified by ``lstat`` (FIFOs would block an open).
    Symlinked directories are not followed (avoids loops; a link to a folder inside the data
    folder is scanned under its real path), symlinked files are followed only when they
    resolve inside the data folder.
    """
    folder = Path(folder)
    try:
        root_real = Path(os.path.realpath(folder))
    except OSError:
        root_real = folder
    out: list[tuple[str, Path | None, str]] = []

    def inside(target: str) -> bool:
        t = Path(target)
        return t == root_real or t.is_relative_to(root_real)

    def visit(directory: Path, rel_dir: str) -> None:
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            logger.debug("cannot list %s: %s", directory, exc)
            out.append((rel_dir or ".", None, UNREADABLE_FOLDER))
            return
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            path = Path(entry.path)
            try:
                if entry.is_symlink():
                    real = os.path.realpath(path)
                    if not inside(real):
                        out.append((rel, None, OUTSIDE_DATA_DIR))
                        continue
                    try:
                        st = os.stat(real)
                    except OSError:  # dangling link (or a loop)
                        out.append((rel, None, NOT_A_FILE))
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        continue  # not followed; its contents are listed under their real path
                    if stat.S_ISREG(st.st_mode):
                        out.append((rel, Path(real), ""))
                    else:
                        out.append((rel, None, NOT_A_FILE))
                elif entry.is_dir(follow_symlinks=False):
                    visit(path, rel)
                elif entry.is_file(follow_symlinks=False):
                    out.append((rel, path, ""))
                else:
                    out.append((rel, None, NOT_A_FILE))
            except OSError as exc:  # the entry vanished or cannot be stat'ed
                logger.debug("cannot stat %s: %s", path, exc)
                out.append((rel, None, UNREADABLE))

    visit(folder, "")
    out.sort(key=lambda item: item[0])
    return out


def list_candidate_files(folder: Path) -> list[Path]:
    """Every regular file under ``folder`` (see :func:`walk_folder`), sorted by relative path.

    DICOM files often have no suffix, so nothing is filtered by name; DICOMDIRs and
    non-DICOM files are recognised by content later.  A symlinked file inside the folder
    is listed under its link path; symlinks leading outside, special files and unreadable
    subfolders are left out (the scan reports them).
    """
    folder = Path(folder)
    return [folder / rel for rel, _, reason in walk_folder(folder) if not reason]


# --------------------------------------------------------------------------- reading


def _looks_like_dicom(ds: Dataset) -> bool:
    """Random bytes can parse under ``force``; demand real DICOM content."""
    from pydicom.datadict import DicomDictionary

    if "SOPClassUID" in ds or "Rows" in ds or "DirectoryRecordSequence" in ds:
        return True
    known = sum(1 for tag in ds.keys() if tag.group in (0x0008, 0x0010, 0x0020, 0x0028)
                and int(tag) in DicomDictionary)
    return known >= 3


_MIB = 1024 * 1024
_DEFLATED_UID = b"1.2.840.10008.1.2.1.99"


def _file_limit(settings: DicomSettings) -> int:
    """Largest file read into memory: the pixel budget plus room for a large header."""
    budget = settings.max_decoded_bytes
    return budget + budget // 4 + 16 * _MIB


def _read_bytes(path: Path, limit: int) -> bytes:
    """The whole file in one read, or a _Skip: never blocks on a FIFO, never follows a link.

    ``path`` is a regular file (or a symlink's resolved target) from :func:`walk_folder`;
    ``O_NOFOLLOW``/``O_NONBLOCK`` and the ``fstat`` re-check cover an entry swapped for a
    symlink or a FIFO between listing and reading.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(
        os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _Skip(UNREADABLE, f"{type(exc).__name__}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Skip(NOT_A_FILE)
        if st.st_size == 0:
            raise _Skip(EMPTY_FILE)
        if st.st_size > limit:
            raise _Skip(TOO_LARGE, f"file of {st.st_size} bytes > {limit}")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise _Skip(UNREADABLE, f"{type(exc).__name__}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if not data:
        raise _Skip(EMPTY_FILE)
    if len(data) > limit:
        raise _Skip(TOO_LARGE, f"file grew past {limit} bytes while read")
    return data


def _check_deflate(data: bytes, budget: int) -> None:
    """A deflated data set is inflated whole by pydicom at read time: bound it first (1 MiB steps)."""
    if _DEFLATED_UID not in data[:65536]:
        return
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = DicomBytesIO(data)
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
    except Exception:
        return  # pydicom fails on it the same way, without inflating
    if str(meta.get("TransferSyntaxUID", "")) != _DEFLATED_UID.decode():
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending, total = data[fp.tell():], 0
    try:
        while pending and not inflater.eof:
            total += len(inflater.decompress(pending, _MIB))
            if total > budget:
                raise _Skip(TOO_LARGE, f"deflated data set inflates past {budget} bytes")
            pending = inflater.unconsumed_tail
    except zlib.error:
        return  # pydicom reports the corrupt stream


def _read_dataset(path: Path, settings: DicomSettings | None = None) -> Dataset:
    """Read the whole file once; ``force`` only for preamble-less (old or headerless) DICOM."""
    return _read_file(path, settings or DicomSettings())[0]


def _read_file(path: Path, settings: DicomSettings) -> tuple[Dataset, bytes]:
    """The dataset and the bytes it was parsed from (one read of the file, bounded in size)."""
    data = _read_bytes(path, _file_limit(settings))
    _check_deflate(data, settings.max_decoded_bytes)
    return _parse(data), data


def _parse(data: bytes) -> Dataset:
    try:
        return pydicom.dcmread(io.BytesIO(data), force=False)
    except InvalidDicomError:
        pass
    except Exception as exc:  # has a preamble but fails: corrupt header or cut-off pixel data
        raise _classify_read_failure(data, exc) from exc
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True, defer_size="1 MB")
        if _looks_like_dicom(ds):
            ds.get("SOPClassUID")  # touch: deferred parse errors surface here
            ds.get("Rows")
            return ds
    except Exception as exc:
        raise _Skip(NOT_DICOM, f"{type(exc).__name__}: {exc}") from exc
    raise _Skip(NOT_DICOM)


def _classify_read_failure(data: bytes, exc: Exception) -> _Skip:
    """A file with a DICOM preamble failed to read: header fine -> pixel data is the problem."""
    detail = f"{type(exc).__name__}: {exc}"
    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    except Exception:
        return _Skip(NOT_DICOM, detail)
    if "Rows" in header and _has_pixel_tag(data):
        return _Skip(TRUNCATED_PIXEL_DATA, detail)
    return _Skip(UNDECODABLE, detail)


def _has_pixel_tag(data: bytes) -> bool:
    """Whether the raw bytes hold a Pixel Data tag (only called for files already in trouble)."""
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


def _check_header(ds: Dataset, settings: DicomSettings, series_re: Any | None) -> None:
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


# --------------------------------------------------------------------------- bomb checks
#
# A few kB of compressed pixel data can declare (or encode) a 16384 x 16384 x N image: the
# decoder would allocate gigabytes before anything could reject it.  Everything below looks
# at the header and at the codestream headers only, before any decoder runs.

_J2K_SYNTAXES = frozenset(pydicom.uid.JPEG2000TransferSyntaxes)
_JPEG_SYNTAXES = frozenset(pydicom.uid.JPEGTransferSyntaxes) | frozenset(
    pydicom.uid.JPEGLSTransferSyntaxes)
_RLE_SYNTAX = pydicom.uid.RLELossless
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
# SOFn markers of ISO 10918 (baseline, extended, progressive, lossless; no DHT/JPG/DAC) and
# SOF55 of JPEG-LS.
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
                          0xCE, 0xCF, 0xF7})


def declared_decoded_bytes(ds: Dataset) -> int:
    """Rows x Columns x Frames x SamplesPerPixel x bytes per sample (BitsAllocated) of ``ds``."""
    rows, cols = max(_int(ds, "Rows"), 0), max(_int(ds, "Columns"), 0)
    frames = max(_int(ds, "NumberOfFrames", 1), 1)
    samples = max(_int(ds, "SamplesPerPixel", 1), 1)
    if "PixelData" in ds:
        bits = max(_int(ds, "BitsAllocated", 16), 1)
    else:
        bits = 32 if "FloatPixelData" in ds else 64
    return rows * cols * frames * samples * ((bits + 7) // 8)


def _fragments(value: bytes) -> Iterator[memoryview]:
    """Fragments of encapsulated pixel data (Basic Offset Table left out), without copying."""
    view = memoryview(value)
    pos, first = 0, True
    while pos + 8 <= len(view):
        tag = bytes(view[pos : pos + 4])
        length = int.from_bytes(view[pos + 4 : pos + 8], "little")
        if tag != b"\xfe\xff\x00\xe0" or length == 0xFFFFFFFF:
            return  # sequence delimiter or garbage: the decoder deals with it
        if not first:
            yield view[pos + 8 : pos + 8 + length]
        first = False
        pos += 8 + length


def _j2k_size(frag: memoryview) -> tuple[int, int, int, int] | None:
    """(width, height, components, bytes per component) from a J2K/JP2 start, else None."""
    head = bytes(frag[:4096])
    if head.startswith(b"\xff\x4f\xff\x51"):
        at = 2
    elif head.startswith(_JP2_SIGNATURE):
        at = head.find(b"\xff\x4f\xff\x51")
        if at < 0:
            return None
        at += 2
    else:
        return None
    siz = head[at : at + 40]  # SIZ marker, Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, ..., Csiz
    if len(siz) < 40:
        return None
    x, y = int.from_bytes(siz[6:10], "big"), int.from_bytes(siz[10:14], "big")
    xo, yo = int.from_bytes(siz[14:18], "big"), int.from_bytes(siz[18:22], "big")
    comps = int.from_bytes(siz[38:40], "big")
    depth = 1
    for c in range(min(comps, 16384)):
        ssiz = head[at + 40 + 3 * c : at + 41 + 3 * c]
        if not ssiz:
            break
        depth = max(depth, (ssiz[0] & 0x7F) + 1)
    return max(x - xo, 0), max(y - yo, 0), max(comps, 1), 1 if depth <= 8 else 2 if depth <= 16 else 4


def _jpeg_size(frag: memoryview) -> tuple[int, int, int, int] | None:
    """(width, height, components, bytes per sample) from the SOF of a JPEG/JPEG-LS start.

    A height of 0 (defined later by a DNL marker) is returned as is (unbounded).
    """
    head = bytes(frag[:65536])
    if not head.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker == 0xDA:  # start of scan without a frame header
            return None
        length = int.from_bytes(head[pos + 2 : pos + 4], "big")
        if marker in _SOF_MARKERS:
            sof = head[pos + 4 : pos + 10]
            if len(sof) < 6:
                return None
            precision = sof[0]
            height, width = int.from_bytes(sof[1:3], "big"), int.from_bytes(sof[3:5], "big")
            return width, height, max(sof[5], 1), 1 if precision <= 8 else 2
        pos += 2 + length
    return None


def _rle_decoded_len(segment: memoryview, stop: int) -> int:
    """Bytes an RLE (PackBits) segment decodes to, counting only up to just past ``stop``."""
    n = pos = 0
    size = len(segment)
    while pos < size:
        h = segment[pos]
        pos += 1
        if h > 128:  # replicate run: one byte, 257 - h times
            n += 257 - h
            pos += 1
        elif h < 128:  # literal run of h + 1 bytes
            n += h + 1
            pos += h + 1
        if n > stop:
            break
    return n


def check_pixel_budget(ds: Dataset, budget: int) -> None:
    """Raise _Skip(too-large) if decoding ``ds`` could allocate more than ``budget`` bytes.

    Checked before any decode: the declared size (Rows x Columns x Frames x Samples x bytes per
    sample) and, for compressed data, what each frame's own codestream header says it decodes
    to (JPEG 2000 SIZ, JPEG/JPEG-LS SOF; decoders allocate that, not the declared size) or, for
    RLE, what its segments could expand to (at most 64 x their bytes, counted exactly only
    when that bound does not fit).  A header that lies within the budget is harmless here (the
    decoder's own size check then rejects the file as undecodable).
    """
    declared = declared_decoded_bytes(ds)
    if declared > budget:
        raise _Skip(TOO_LARGE, f"{declared} decoded bytes declared > budget {budget}")
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None or not tsyntax.is_compressed or "PixelData" not in ds:
        return  # native data: decoded to the declared size, already within the budget
    value = ds.PixelData
    if not isinstance(value, (bytes, bytearray)):
        return
    room = budget - declared  # the output array holds `declared`; a frame decode needs more
    if tsyntax in _J2K_SYNTAXES or tsyntax in _JPEG_SYNTAXES:
        sizer = _j2k_size if tsyntax in _J2K_SYNTAXES else _jpeg_size
        for frag in _fragments(value):
            size = sizer(frag)
            if size is None:
                continue
            width, height, comps, nbytes = size
            frame_bytes = width * height * comps * nbytes
            if height == 0 or frame_bytes > room:
                raise _Skip(TOO_LARGE, f"codestream of {width}x{height}x{comps} decodes past "
                                       f"the budget {budget}")
    elif tsyntax == _RLE_SYNTAX:
        frags = list(_fragments(value))
        if 64 * sum(len(f) for f in frags) <= room:
            return
        for frag in frags:  # big RLE data: bound each segment of each fragment exactly
            header = bytes(frag[:64])
            if len(header) < 64:
                continue
            count = int.from_bytes(header[:4], "little")
            offsets = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "little")
                       for i in range(min(count, 15))] + [len(frag)]
            for start, end in zip(offsets, offsets[1:]):
                segment = frag[start:end] if 0 <= start <= end else frag[0:0]
                if 64 * len(segment) > room and _rle_decoded_len(segment, room) > room:
                    raise _Skip(TOO_LARGE, f"RLE segment decodes past the budget {budget}")


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


def _decode_dataset(ds: Dataset, path: Path, settings: DicomSettings,
                    raw: bytes | None = None) -> np.ndarray:
    """Checks that need pixel data, then decode to modality units; raises _Skip on problems.

    ``raw``: the bytes ``ds`` was parsed from (else ``path`` is read again when needed).
    """
    if not any(kw in ds for kw in _PIXEL_KEYWORDS):
        if len(ds) == 0 or "Rows" in ds:
            # An image header (or an unparseable body) without a readable pixel element:
            # if the tag is in the bytes, the element was cut off.
            if raw is None:
                try:
                    raw = _read_bytes(path, _file_limit(settings))
                except _Skip:
                    raw = b""
            if _has_pixel_tag(raw):
                raise _Skip(TRUNCATED_PIXEL_DATA, "pixel data element present but unreadable")
        raise _Skip(NO_PIXEL_DATA)
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if rows <= 0 or cols <= 0:
        raise _Skip(INCONSISTENT_GEOMETRY, f"rows={rows} cols={cols}")
    if rows < settings.min_size or cols < settings.min_size:
        raise _Skip(TOO_SMALL, f"{rows}x{cols}")
    _ensure_transfer_syntax(ds)
    check_pixel_budget(ds, settings.max_decoded_bytes)
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


def iter_files(folder: Path, settings: DicomSettings, segmentations: list[str] | None = None
               ) -> Iterator[FileRecord | tuple[str, str]]:
    """Read every candidate file once: a :class:`FileRecord` if usable, else ``(rel, reason)``.

    ``segmentations``, when given, collects the relative paths of the DICOM SEG and RTSTRUCT
    files met (skipped as non-image objects; :mod:`client.segmentation` reads their masks).

    Never raises for a bad file; raises :class:`NoUsableDicomError` only when ``folder``
    is missing or not a directory.
    """
    folder = Path(folder)
    _check_folder(folder)
    series_re = (compile_pattern(settings.series_pattern, ignore_case=False)
                 if settings.series_pattern else None)
    index = -1
    for rel, path, problem in walk_folder(folder):
        if problem or path is None:
            logger.debug("skip %s: %s", rel, problem)
            yield rel, problem or NOT_A_FILE
            continue
        index += 1  # position in list_candidate_files(folder)
        ds = Dataset()
        try:
            try:
                ds, raw = _read_file(path, settings)
                _check_header(ds, settings, series_re)
                frames = _decode_dataset(ds, path, settings, raw)
                positions, orientation, spacing = _frame_geometry(ds, frames.shape[0])
            except _Skip:
                raise
            except Exception as exc:  # anything unexpected is still only one bad file
                raise _Skip(UNDECODABLE, f"{type(exc).__name__}: {exc}") from exc
        except _Skip as skip:
            logger.debug("skip %s: %s %s", rel, skip.reason, skip.detail)
            if segmentations is not None and skip.reason == NON_IMAGE_OBJECT and (
                    _str(ds, "SOPClassUID") in _SEGMENTATION_SOP_CLASSES
                    or _str(ds, "Modality").upper() in ("SEG", "RTSTRUCT")):
                segmentations.append(rel)
            yield rel, skip.reason
            continue
        yield FileRecord(
            index=index, rel=rel, modality=_str(ds, "Modality").upper() or "OT",
            study_uid=_str(ds, "StudyInstanceUID"), series_uid=_str(ds, "SeriesInstanceUID"),
            series_description=_str(ds, "SeriesDescription"), frames=frames, positions=positions,
            orientation=orientation, pixel_spacing=spacing,
            labels={key: _str(ds, keyword) for key, keyword in LABEL_ATTRIBUTES.items()},
            sop_uid=_str(ds, "SOPInstanceUID"), frame_of_reference=_str(ds, "FrameOfReferenceUID"),
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
    meta_lists: dict[str, list[Any]] = {k: [] for k in META_KEYS}
    files_seen = usable_files = 0
    segmentation_files: list[str] = []

    for item in iter_files(folder, settings, segmentation_files):
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
        for key in LABEL_ATTRIBUTES:
            meta_lists[key].extend([item.labels.get(key, "")] * n)
        meta_lists["sop_uid"].extend([item.sop_uid] * n)
        meta_lists["frame_number"].extend(range(1, n + 1))
        meta_lists["frame_of_reference"].extend([item.frame_of_reference] * n)

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
        segmentation_files=segmentation_files,
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
        elif key in ("file_index", "frame_number"):
            out[key] = np.array(values, dtype=np.int64)
        else:
            out[key] = np.array([str(v) for v in values], dtype=str)
    return out
