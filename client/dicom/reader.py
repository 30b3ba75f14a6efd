"""Walking the data folder and reading each file once, bounded in size.

Why this is careful: the folder is the hospital's, not ours.  A FIFO would block an open, a
symlink could lead out of the folder, a 50 GB file or a deflate bomb would fill memory;
every file is read whole exactly once (the scan decodes from those bytes) and a bad one
becomes a :class:`Skip` with a fixed reason, never an exception out of the scan.
"""

from __future__ import annotations

import io
import logging
import os
import stat
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from .budget import MIB, check_deflate
from .tags import PIXEL_TAG_BYTES
from .types import (
    EMPTY_FILE,
    NOT_A_FILE,
    NOT_DICOM,
    OUTSIDE_DATA_DIR,
    TOO_LARGE,
    TRUNCATED_PIXEL_DATA,
    UNDECODABLE,
    UNREADABLE,
    UNREADABLE_FOLDER,
    DicomSettings,
    Skip,
)

logger = logging.getLogger(__name__)


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


def _looks_like_dicom(ds: Dataset) -> bool:
    """Random bytes can parse under ``force``; demand real DICOM content."""
    from pydicom.datadict import DicomDictionary

    if "SOPClassUID" in ds or "Rows" in ds or "DirectoryRecordSequence" in ds:
        return True
    known = sum(1 for tag in ds.keys() if tag.group in (0x0008, 0x0010, 0x0020, 0x0028)
                and int(tag) in DicomDictionary)
    return known >= 3


def file_limit(settings: DicomSettings) -> int:
    """Largest file read into memory: the pixel budget plus room for a large header."""
    budget = settings.max_decoded_bytes
    return budget + budget // 4 + 16 * MIB


def read_bytes(path: Path, limit: int) -> bytes:
    """The whole file in one read, or a Skip: never blocks on a FIFO, never follows a link.

    ``path`` is a regular file (or a symlink's resolved target) from :func:`walk_folder`;
    ``O_NOFOLLOW``/``O_NONBLOCK`` and the ``fstat`` re-check cover an entry swapped for a
    symlink or a FIFO between listing and reading.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(
        os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise Skip(UNREADABLE, f"{type(exc).__name__}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Skip(NOT_A_FILE)
        if st.st_size == 0:
            raise Skip(EMPTY_FILE)
        if st.st_size > limit:
            raise Skip(TOO_LARGE, f"file of {st.st_size} bytes > {limit}")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise Skip(UNREADABLE, f"{type(exc).__name__}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if not data:
        raise Skip(EMPTY_FILE)
    if len(data) > limit:
        raise Skip(TOO_LARGE, f"file grew past {limit} bytes while read")
    return data


def read_file(path: Path, settings: DicomSettings) -> tuple[Dataset, bytes]:
    """The dataset and the bytes it was parsed from (one read of the file, bounded in size)."""
    data = read_bytes(path, file_limit(settings))
    check_deflate(data, settings.max_decoded_bytes)
    return _parse(data), data


def _parse(data: bytes) -> Dataset:
    """``dcmread`` of the bytes; ``force`` only as a fallback for preamble-less DICOM."""
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
        raise Skip(NOT_DICOM, f"{type(exc).__name__}: {exc}") from exc
    raise Skip(NOT_DICOM)


def _classify_read_failure(data: bytes, exc: Exception) -> Skip:
    """A file with a DICOM preamble failed to read: header fine -> pixel data is the problem."""
    detail = f"{type(exc).__name__}: {exc}"
    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    except Exception:
        return Skip(NOT_DICOM, detail)
    if "Rows" in header and has_pixel_tag(data):
        return Skip(TRUNCATED_PIXEL_DATA, detail)
    return Skip(UNDECODABLE, detail)


def has_pixel_tag(data: bytes) -> bool:
    """Whether the raw bytes hold a Pixel Data tag (only called for files already in trouble)."""
    return any(tag in data for tag in PIXEL_TAG_BYTES)
