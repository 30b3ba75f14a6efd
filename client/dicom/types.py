"""The scan's data types: settings, skip reasons, reports and per-file records.

Why a module of its own: every stage (reader, bomb checks, decoder, scan) and the cache
speak in these types, and none of them may import the scan to get them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np

from shared_models.patterns import check_pattern

from .tags import COUNTED_MODALITIES

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
GREY_IN_COLOUR_RUN = "grey-image"  # a one-sample (grey) image met by a colour run (channels = 3)

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
    # 1: grey slices (colour images as their luminance); 3: colour slices, RGB in [-1, 1] per
    # channel (client/dicom/pixels.py decode_rgb), grey images skipped. In the fingerprint, so a
    # grey cache entry is never served to a colour run.
    channels: int = 1

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.min_size < 1:
            raise ValueError(f"image_size and min_size must be >= 1, got {self.image_size}, {self.min_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
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
            line += f"; skipped {total_skipped}: {format_counts(self.skipped)}"
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
            key = f"slices_{modality.lower() if modality in COUNTED_MODALITIES else 'other'}"
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


class Skip(Exception):
    """A file is skipped for ``reason`` (one of :data:`SKIP_REASONS`); ``detail``: local log only."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def format_counts(counts: dict[str, int]) -> str:
    """``"reason n, ..."``, most frequent first (log lines and error messages)."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

