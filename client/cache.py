"""Local cache of preprocessed slices, so a hospital decodes its DICOM once.

Each entry is two files in ``cache_dir``: ``<key>.npy`` (the images, memory-mapped
on load) and ``<key>.json`` (per-slice metadata + scan report).  The key combines
the settings' fingerprint with a hash of the folder's file listing (relative
path, size, mtime_ns), so any added/removed/touched file or any settings change
gives a new key and a rebuild.

Writes are atomic: each file goes to a temp name in the same directory, is
fsync'ed and then ``os.replace``'d.  The json is written last and is the commit
marker: an ``.npy`` without its ``.json`` (crash mid-write) is never used.  The
cache stays on the hospital's disk; nothing here is sent anywhere.

Besides the scan's per-slice metadata the entry keeps each slice's geometry
(:data:`GEOMETRY_KEYS`), which 3D volumes need (:mod:`client.volumes`): the slice
position along the normal alone cannot give the in-plane pixel size, and the
orientation tells one series from a mixed one and turns sagittal/coronal series into
the axial frame.  The scan does not return it, so :func:`slice_geometry` reads each
used file's header once more when an entry is built (the scanner's own bounded
reader); a cache hit reads nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from client import dicom
from client.statefiles import fsync_dir, replace_atomic  # shared with the state files
from client.dicom import (
    TRANSIENT_SKIP_REASONS,
    DicomSettings,
    ScanReport,
    SeriesSummary,
    SliceSet,
    scan_folder,
    walk_folder,
)

logger = logging.getLogger(__name__)

CACHE_FORMAT = 5  # 3: label attributes in the slice metadata; 4: slice geometry; 5: SOP refs
_META_KEYS = dicom.META_KEYS
# Per-slice geometry kept next to the scan's metadata, NaN where unknown: ``pixel_spacing``
# (N, 2) mm per pixel (row, column) of the CACHED slice (after the aspect-keeping resize to
# ``image_size``), ``orientation`` (N, 6) direction cosines (ImageOrientationPatient).
GEOMETRY_KEYS = ("pixel_spacing", "orientation")
_GEOMETRY_WIDTH = {"pixel_spacing": 2, "orientation": 6}


_ORIGINAL_SCAN = scan_folder


def _scan(folder: Path, settings: DicomSettings) -> SliceSet:
    """Decode via ``scan_folder``; honours a test double patched into either module."""
    fn = globals()["scan_folder"]
    if fn is _ORIGINAL_SCAN:
        fn = dicom.scan_folder
    return fn(folder, settings)


def default_cache_dir() -> Path:
    """Per-user cache location used when the caller passes none."""
    return Path.home() / ".cache" / "fedsynth"


def _listing_hash(folder: Path, cache_dir: Path) -> str:
    """Hash of (relative path, size, mtime_ns) of every candidate file.

    Entries the scan cannot read (special files, links leading outside the folder,
    unlistable subfolders) enter as (relative path, reason).  Files inside ``cache_dir``
    are left out, so a cache kept inside the scanned folder does not invalidate itself
    on every write.
    """
    h = hashlib.sha256()
    try:
        cache_resolved = cache_dir.resolve()
    except OSError:
        cache_resolved = cache_dir
    for rel, path, problem in walk_folder(folder):
        if problem or path is None:
            h.update(json.dumps([rel, problem]).encode("utf-8"))
            h.update(b"\n")
            continue
        path = folder / rel  # the link path for a symlink inside the folder (stat follows it)
        try:
            if path.resolve().is_relative_to(cache_resolved):
                continue
            st = path.stat()
        except OSError:
            continue  # vanished between listing and stat: the scan will see that too
        h.update(json.dumps([rel, st.st_size, st.st_mtime_ns]).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def cache_key(folder: Path, settings: DicomSettings, cache_dir: Path) -> str:
    """Settings fingerprint + folder listing hash, as one short hex string."""
    h = hashlib.sha256()
    h.update(f"format={CACHE_FORMAT}\n".encode())
    h.update(settings.fingerprint().encode())
    h.update(b"\n")
    h.update(_listing_hash(folder, cache_dir).encode())
    return h.hexdigest()[:40]


def _meta_to_json(meta: dict[str, np.ndarray]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for key in _META_KEYS:
        values = meta[key]
        if key == "position":
            out[key] = [None if math.isnan(float(v)) else float(v) for v in values]
        elif key in ("file_index", "frame_number"):
            out[key] = [int(v) for v in values]
        else:
            out[key] = [str(v) for v in values]
    return out


def _report_to_json(report: ScanReport) -> dict[str, Any]:
    return {
        "folder_name": report.folder_name,
        "files_seen": report.files_seen,
        "usable_files": report.usable_files,
        "slices": report.slices,
        "usable_by_modality": dict(report.usable_by_modality),
        "skipped": dict(report.skipped),
        "skipped_files": [[p, r] for p, r in report.skipped_files],
        "usable_by_size": dict(report.usable_by_size),
        "series": [asdict(s) for s in report.series],
        "segmentation_files": list(report.segmentation_files),
    }


def _report_from_json(d: dict[str, Any]) -> ScanReport:
    return ScanReport(
        folder_name=str(d["folder_name"]),
        files_seen=int(d["files_seen"]),
        usable_files=int(d["usable_files"]),
        slices=int(d["slices"]),
        usable_by_modality={str(k): int(v) for k, v in d["usable_by_modality"].items()},
        skipped={str(k): int(v) for k, v in d["skipped"].items()},
        skipped_files=[(str(p), str(r)) for p, r in d["skipped_files"]],
        usable_by_size={str(k): int(v) for k, v in d["usable_by_size"].items()},
        series=[SeriesSummary(**s) for s in d["series"]],
        segmentation_files=[str(p) for p in d.get("segmentation_files", [])],
    )


def slice_geometry(folder: Path, meta: dict[str, np.ndarray], settings: DicomSettings
                   ) -> dict[str, np.ndarray]:
    """:data:`GEOMETRY_KEYS` arrays for the slices of a scan of ``folder`` (its ``meta``).

    Reads the header of each file the slices come from (``file_index`` into
    :func:`client.dicom.list_candidate_files`) with the scanner's bounded reader; a file that
    cannot be read again, or lacks spacing/orientation, leaves its slices NaN (no volume).
    """
    index = np.asarray(meta.get("file_index", np.zeros(0, dtype=np.int64)), dtype=np.int64)
    n = len(index)
    out = {k: np.full((n, w), np.nan, dtype=np.float64) for k, w in _GEOMETRY_WIDTH.items()}
    if n == 0:
        return out
    files = dicom.list_candidate_files(Path(folder))
    order = np.argsort(index, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(index[order]) != 0])
    for group in np.split(order, starts[1:]):
        k = int(index[group[0]])
        if not 0 <= k < len(files):
            continue
        try:
            ds, _ = dicom.read_file(files[k], settings)
            _, orientation, spacing = dicom.frame_geometry(ds, len(group))
            rows, cols = int(ds.Rows), int(ds.Columns)
        except Exception:  # vanished, changed, unreadable: no geometry, never a failed scan
            logger.debug("no geometry for %s", files[k], exc_info=True)
            continue
        if orientation is not None:
            out["orientation"][group] = orientation
        if spacing is not None and rows > 0 and cols > 0:
            h, w = dicom.resized_shape(rows, cols, settings.image_size)
            out["pixel_spacing"][group] = (spacing[0] * rows / h, spacing[1] * cols / w)
    return out


def _floats_to_json(values: np.ndarray) -> list[Any]:
    return [None if not np.isfinite(row).all() else [float(v) for v in row] for row in values]


def _floats_from_json(rows: list[Any], width: int) -> np.ndarray:
    out = np.full((len(rows), width), np.nan, dtype=np.float64)
    for i, row in enumerate(rows):
        if row is not None:
            out[i] = [float(v) for v in row]
    return out


def _write_entry(cache_dir: Path, key: str, slices: SliceSet) -> None:
    npy_path = cache_dir / f"{key}.npy"
    json_path = cache_dir / f"{key}.json"
    images = np.ascontiguousarray(slices.images, dtype=np.float32)
    replace_atomic(npy_path, lambda fh: np.save(fh, images, allow_pickle=False),
                   f".{npy_path.name}.", ".tmp")
    payload = {
        "format": CACHE_FORMAT,
        "key": key,
        "npy_bytes": npy_path.stat().st_size,
        "shape": list(images.shape),
        "meta": _meta_to_json(slices.meta),
        "geometry": {k: _floats_to_json(slices.meta[k]) for k in GEOMETRY_KEYS},
        "report": _report_to_json(slices.report),
    }
    data = json.dumps(payload, allow_nan=False).encode("utf-8")
    replace_atomic(json_path, lambda fh: fh.write(data), f".{json_path.name}.",
                   ".tmp")  # commit marker, last
    fsync_dir(cache_dir)


def _read_entry(cache_dir: Path, key: str) -> SliceSet | None:
    """The committed entry for ``key``, or None if absent/incomplete/corrupt."""
    npy_path = cache_dir / f"{key}.npy"
    json_path = cache_dir / f"{key}.json"
    if not json_path.is_file() or not npy_path.is_file():
        return None
    try:
        payload = json.loads(json_path.read_text(encoding="utf-8"))
        if payload.get("format") != CACHE_FORMAT or payload.get("key") != key:
            return None
        if npy_path.stat().st_size != payload["npy_bytes"]:
            return None
        images = np.load(npy_path, mmap_mode="r", allow_pickle=False)
        if list(images.shape) != payload["shape"] or images.dtype != np.float32:
            return None
        lists = payload["meta"]
        if any(len(lists[k]) != images.shape[0] for k in _META_KEYS):
            return None
        meta = dicom.meta_arrays({k: lists[k] for k in _META_KEYS})
        geometry = payload["geometry"]
        if any(len(geometry[k]) != images.shape[0] for k in GEOMETRY_KEYS):
            return None
        meta.update({k: _floats_from_json(geometry[k], _GEOMETRY_WIDTH[k]) for k in GEOMETRY_KEYS})
        report = _report_from_json(payload["report"])
    except Exception:
        logger.warning("ignoring unreadable cache entry %s", key, exc_info=True)
        return None
    return SliceSet(images=images, meta=meta, report=report)


def load_slices(folder: Path, settings: DicomSettings, cache_dir: Path | None = None) -> SliceSet:
    """Preprocessed slices for ``folder``, from the cache when the files are unchanged.

    A hit decodes no DICOM and returns memory-mapped, read-only images.  A miss
    runs :func:`client.dicom.scan_folder` (which may raise ``NoUsableDicomError``;
    failures are not cached) and stores the result.  Old entries are left in place.
    """
    folder = Path(folder)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not folder.is_dir():
        # Let the scanner produce the canonical error message.
        return _scan(folder, settings)
    key = cache_key(folder, settings, cache_dir)
    cached = _read_entry(cache_dir, key)
    if cached is not None:
        logger.info("cache hit for %s: %s", folder.name, cached.report.summary())
        return cached

    slices = _scan(folder, settings)
    if not all(k in slices.meta for k in GEOMETRY_KEYS):
        slices.meta.update(slice_geometry(folder, slices.meta, settings))
    transient = sorted(set(slices.report.skipped) & TRANSIENT_SKIP_REASONS)
    if transient:
        # Files or folders the scan could not read may be readable next time: do not freeze
        # this partial view into the cache.
        logger.warning("not caching the scan of %s: %s", folder.name,
                       ", ".join(f"{r} {slices.report.skipped[r]}" for r in transient))
        return slices
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _write_entry(cache_dir, key, slices)
    except OSError:
        # A read-only or full disk must not stop training; we just decode again next time.
        logger.warning("could not write slice cache in %s", cache_dir, exc_info=True)
    return slices
