"""Writing the hospital's state files so that a crash or power loss leaves the old or the new one.

The privacy ledger (``client.privacy``) and the replay record (``client.app``) are small JSON
files that must never be found half-written: a torn ledger would forget privacy spent, a torn
replay record would let an old round through. Each is written to a temporary file in the same
folder, flushed to disk (``fsync``), renamed over the old one (``os.replace``, atomic on POSIX),
and the folder is flushed too, so the rename itself survives a power loss. Files are 0600 and
the folders fedsynth makes for them 0700: they are the hospital's own.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

MAX_STATE_BYTES = 4 << 20  # a ledger or replay record is a few kB; more is not one of ours


def private_dir(path: Path) -> Path:
    """Make ``path`` (and missing parents) 0700; an existing folder keeps its mode."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be
    opened (not POSIX)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_atomic(path: Path, write: Callable[[BinaryIO], object], prefix: str = ".tmp-",
                   suffix: str = "") -> None:
    """Replace ``path`` with what ``write(fileobj)`` writes: a temp file in the same folder,
    fsync, rename. An ``OSError`` (a full disk) leaves the previous file as it was and no temp
    file behind. The folder is not fsynced: a caller writing several files does it once."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_atomic(path: Path, text: str, prefix: str = ".tmp-") -> None:
    """A state file replaced by ``text`` (``replace_atomic`` in a private folder, then the folder
    fsynced)."""
    private_dir(path.parent)
    replace_atomic(path, lambda fh: fh.write(text.encode("utf-8")), prefix)
    fsync_dir(path.parent)


def read_state(path: Path, limit: int = MAX_STATE_BYTES) -> str:
    """A state file's text. ``OSError`` or ``ValueError`` (saying why) for what is not a plain
    file of at most ``limit`` bytes in UTF-8: a FIFO, a device or a huge file put in its place
    must make the caller refuse, not hang or fill the daemon's memory."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a plain file")
        if info.st_size > limit:
            raise ValueError(f"{info.st_size} bytes, more than a state file holds ({limit})")
        with os.fdopen(fd, "rb") as fh:
            fd = -1
            data = fh.read(limit + 1)
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > limit:
        raise ValueError(f"more than {limit} bytes")
    return data.decode("utf-8")
