"""The scan: every file of a data folder read once, checked, decoded and preprocessed.

Why the stages are run from here: one loop owns the order (bounded read, header checks,
bomb checks, decode) so that no pixel is decoded for a file a cheaper check rejects, and
so that one bad file is one skip, never an aborted scan.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pydicom.dataset import Dataset

from shared_models.patterns import compile_pattern

from .pixels import decode_dataset, frame_geometry
from .preprocess import preprocess
from .reader import read_file, walk_folder
from .tags import (DICOMDIR_SOP_CLASS, header_int, header_str, is_non_image, is_segmentation,
                   is_synthetic)
from .types import (
    DICOMDIR,
    FILTERED_OUT,
    LABEL_ATTRIBUTES,
    META_KEYS,
    NON_IMAGE_OBJECT,
    NOT_A_FILE,
    SYNTHETIC,
    TOO_SMALL,
    UNDECODABLE,
    DicomSettings,
    FileRecord,
    NoUsableDicomError,
    ScanReport,
    SeriesSummary,
    SliceSet,
    Skip,
    format_counts,
)

logger = logging.getLogger(__name__)


def _check_header(ds: Dataset, settings: DicomSettings, series_re: Any | None) -> None:
    """Apply the cheap skips that need no pixel decode."""
    sop = header_str(ds, "SOPClassUID")
    media_sop = header_str(getattr(ds, "file_meta", Dataset()), "MediaStorageSOPClassUID")
    if DICOMDIR_SOP_CLASS in (sop, media_sop) or "DirectoryRecordSequence" in ds:
        raise Skip(DICOMDIR)
    if is_non_image(ds):
        raise Skip(NON_IMAGE_OBJECT, header_str(ds, "Modality") or sop)
    if is_synthetic(ds):
        raise Skip(SYNTHETIC)
    if settings.modalities:
        wanted = {m.upper() for m in settings.modalities}
        if header_str(ds, "Modality").upper() not in wanted:
            raise Skip(FILTERED_OUT, f"modality {header_str(ds, 'Modality')!r}")
    if settings.body_parts:
        wanted = {b.upper() for b in settings.body_parts}
        if header_str(ds, "BodyPartExamined").upper() not in wanted:
            raise Skip(FILTERED_OUT, f"body part {header_str(ds, 'BodyPartExamined')!r}")
    if series_re is not None and not series_re.search(header_str(ds, "SeriesDescription")):
        raise Skip(FILTERED_OUT, "series description")
    rows, cols = header_int(ds, "Rows"), header_int(ds, "Columns")
    if rows > 0 and cols > 0 and (rows < settings.min_size or cols < settings.min_size):
        raise Skip(TOO_SMALL, f"{rows}x{cols}")


def _check_folder(folder: Path) -> None:
    """A missing folder, or a file given as one, is the caller's error, not a skip."""
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
                ds, raw = read_file(path, settings)
                _check_header(ds, settings, series_re)
                frames = decode_dataset(ds, path, settings, raw)
                positions, orientation, spacing = frame_geometry(ds, frames.shape[0])
            except Skip:
                raise
            except Exception as exc:  # anything unexpected is still only one bad file
                raise Skip(UNDECODABLE, f"{type(exc).__name__}: {exc}") from exc
        except Skip as skip:
            logger.debug("skip %s: %s %s", rel, skip.reason, skip.detail)
            if (segmentations is not None and skip.reason == NON_IMAGE_OBJECT
                    and is_segmentation(ds)):
                segmentations.append(rel)
            yield rel, skip.reason
            continue
        yield FileRecord(
            index=index, rel=rel, modality=header_str(ds, "Modality").upper() or "OT",
            study_uid=header_str(ds, "StudyInstanceUID"),
            series_uid=header_str(ds, "SeriesInstanceUID"),
            series_description=header_str(ds, "SeriesDescription"), frames=frames,
            positions=positions, orientation=orientation, pixel_spacing=spacing,
            labels={key: header_str(ds, keyword) for key, keyword in LABEL_ATTRIBUTES.items()},
            sop_uid=header_str(ds, "SOPInstanceUID"),
            frame_of_reference=header_str(ds, "FrameOfReferenceUID"),
        )


def no_usable_error(folder: Path, files_seen: int, skipped: dict[str, int]) -> NoUsableDicomError:
    """The one-line error for a folder without usable images, with what was found instead."""
    counts = format_counts(skipped) if skipped else "nothing"
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
        n, rows, cols = item.frames.shape[:3]
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
