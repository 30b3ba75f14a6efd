"""What the scanner does with files it cannot or must not read (issue 11, finding 10).

- an unreadable file is ``unreadable`` (not ``not-dicom``);
- an unreadable subfolder is counted (``unreadable-folder``), not silently left out;
- a symlink resolving outside the data folder is not followed (``outside-data-dir``); links
  inside are fine;
- FIFOs, sockets (and devices, dangling links) are ``not-a-file`` and never opened (opening a
  FIFO blocks).

Permissions are tested for real: as root (who reads anything) the scan runs in a forked child
that dropped to ``nobody``, so the test folders live in a world-readable temp folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from client import cache, dicom
from client.dicom import (
    NOT_A_FILE,
    OUTSIDE_DATA_DIR,
    UNREADABLE,
    UNREADABLE_FOLDER,
    DicomSettings,
    ScanReport,
    SliceSet,
    list_candidate_files,
    scan_folder,
)

REPO = Path(__file__).resolve().parents[3]

def _warm_up() -> None:
    """Import everything a scan uses (pixel decoders are imported on first use) while this
    process can still read the virtualenv: the unprivileged child below may not."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(get_testdata_file("CT_small.dcm"), Path(tmp) / "ct.dcm")
        scan_folder(tmp, DicomSettings(image_size=32))


def _scan_as_unprivileged(folder: Path) -> dict:
    """Scan ``folder`` in a forked child that permissions apply to (``nobody`` when root).

    The child drops to ``nobody`` after fork, with every module already imported, so it needs no
    access to the checkout or the virtualenv (a CI clone may live in a folder only root can
    enter); it reports the scan and every path it opened through a pipe.
    """
    import builtins
    import pwd

    _warm_up()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, scan, report, exit without cleanup handlers
        code = 0
        try:
            os.close(read_fd)
            if os.geteuid() == 0:
                nobody = pwd.getpwnam("nobody")
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
            opened: list[str] = []
            os_open, b_open = os.open, builtins.open

            def tracked_os_open(path, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
                opened.append(os.fspath(path))
                return os_open(path, *a, **k)

            def tracked_open(path, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
                if isinstance(path, (str, bytes, os.PathLike)):
                    opened.append(os.fsdecode(os.fspath(path)))
                return b_open(path, *a, **k)

            os.open, builtins.open = tracked_os_open, tracked_open
            try:
                res = scan_folder(str(folder), DicomSettings(image_size=32))
            finally:
                os.open, builtins.open = os_open, b_open
            r = res.report
            out = json.dumps({"skipped": dict(r.skipped_files), "usable": r.usable_files,
                              "seen": r.files_seen, "counts": r.counts(), "opened": opened})
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            out, code = json.dumps({"error": f"{type(exc).__name__}: {exc}"}), 1
        with os.fdopen(write_fd, "w") as fh:
            fh.write(out)
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as fh:
        text = fh.read()
    _, status = os.waitpid(pid, 0)
    result = json.loads(text)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, result
    return result


@pytest.fixture()
def world(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A folder every user may read (pytest's tmp_path is root-only)."""
    root = Path(tempfile.mkdtemp(prefix="fedsynth-safety-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    for p in root.rglob("*"):  # give back what the tests locked away, then remove
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(root, ignore_errors=True)


def _site(root: Path) -> Path:
    site = root / "site"
    (site / "ct").mkdir(parents=True)
    (site / "mr").mkdir()
    shutil.copyfile(get_testdata_file("CT_small.dcm"), site / "ct" / "a.dcm")
    shutil.copyfile(get_testdata_file("MR_small.dcm"), site / "mr" / "b.dcm")
    for p in [site, site / "ct", site / "mr"]:
        p.chmod(0o755)
    for p in site.rglob("*.dcm"):
        p.chmod(0o644)
    return site


def test_unreadable_file_is_reported_unreadable(world: Path) -> None:
    site = _site(world)
    locked = site / "mr" / "locked.dcm"
    shutil.copyfile(get_testdata_file("MR_small.dcm"), locked)
    locked.chmod(0o000)
    out = _scan_as_unprivileged(site)
    assert out["skipped"] == {"mr/locked.dcm": UNREADABLE}
    assert out["usable"] == 2
    assert out["counts"]["skipped_unreadable"] == 1 and out["counts"]["skipped_not_dicom"] == 0


def test_unreadable_subfolder_is_counted(world: Path) -> None:
    site = _site(world)
    hidden = site / "hidden"
    hidden.mkdir()
    shutil.copyfile(get_testdata_file("CT_small.dcm"), hidden / "c.dcm")
    hidden.chmod(0o000)
    out = _scan_as_unprivileged(site)
    assert out["skipped"] == {"hidden": UNREADABLE_FOLDER}
    assert out["usable"] == 2
    assert out["counts"]["skipped_unreadable_folder"] == 1


def test_read_error_is_unreadable_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file on which reading raises (an I/O error, a revoked permission) is 'unreadable'."""
    site = _site(tmp_path)
    bad = site / "ct" / "a.dcm"
    real_open = os.open

    def failing_open(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if Path(path) == bad:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)
    rep = scan_folder(site, DicomSettings(image_size=32)).report
    assert dict(rep.skipped_files) == {"ct/a.dcm": UNREADABLE}


def test_symlinks_outside_not_followed_inside_fine(tmp_path: Path) -> None:
    site = _site(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copyfile(get_testdata_file("CT_small.dcm"), outside / "secret.dcm")
    (outside / "dir").mkdir()
    shutil.copyfile(get_testdata_file("CT_small.dcm"), outside / "dir" / "x.dcm")
    os.symlink(outside / "secret.dcm", site / "escape.dcm")
    os.symlink("../../elsewhere/secret.dcm", site / "mr" / "relative_escape.dcm")
    os.symlink(outside / "dir", site / "escape_dir")
    os.symlink("/etc/passwd", site / "passwd")
    os.symlink("ct/a.dcm", site / "alias.dcm")  # inside the folder: fine
    os.symlink(site / "mr", site / "mr_again")  # a folder inside: not walked twice
    rep = scan_folder(site, DicomSettings(image_size=32)).report
    assert dict(rep.skipped_files) == {
        "escape.dcm": OUTSIDE_DATA_DIR, "mr/relative_escape.dcm": OUTSIDE_DATA_DIR,
        "escape_dir": OUTSIDE_DATA_DIR, "passwd": OUTSIDE_DATA_DIR,
    }
    assert rep.usable_files == 3  # ct/a.dcm, mr/b.dcm and alias.dcm
    assert rep.counts()["skipped_outside_data_dir"] == 4
    assert [p.name for p in list_candidate_files(site)] == ["alias.dcm", "a.dcm", "b.dcm"]

    # the data folder itself reached through a symlink: links inside it are still inside
    via = tmp_path / "via"
    os.symlink(site, via)
    rep2 = scan_folder(via, DicomSettings(image_size=32)).report
    assert dict(rep2.skipped_files) == dict(rep.skipped_files) and rep2.usable_files == 3


def test_fifo_socket_dangling_link_not_a_file_never_opened(world: Path) -> None:
    site = _site(world)
    os.mkfifo(site / "pipe")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(site / "mr" / "sock"))
    os.symlink(site / "gone.dcm", site / "dangling.dcm")
    try:
        # A child process: if the FIFO were opened the scan would block until the timeout.
        out = _scan_as_unprivileged(site)
    finally:
        sock.close()
    assert out["skipped"] == {"pipe": NOT_A_FILE, "mr/sock": NOT_A_FILE,
                              "dangling.dcm": NOT_A_FILE}
    assert out["counts"]["skipped_not_a_file"] == 3 and out["usable"] == 2
    assert out["seen"] == 5
    opened = {Path(p).name for p in out["opened"]}
    assert not opened & {"pipe", "sock", "dangling.dcm", "gone.dcm"}
    assert {"a.dcm", "b.dcm"} <= opened


def test_device_is_not_a_file(tmp_path: Path) -> None:
    site = _site(tmp_path)
    try:
        os.mknod(site / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError):
        pytest.skip("cannot create a device node here")
    rep = scan_folder(site, DicomSettings(image_size=32)).report
    assert dict(rep.skipped_files) == {"null": NOT_A_FILE}


def test_scan_with_unreadable_entries_is_not_cached(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixing a permission must take effect: a partial scan is not frozen into the cache."""
    site = _site(tmp_path)
    calls: list[int] = []

    def fake_scan(folder: Path, settings: DicomSettings) -> SliceSet:
        calls.append(1)
        report = ScanReport(folder_name="site", files_seen=3, usable_files=2, slices=2,
                            skipped={UNREADABLE_FOLDER: 1},
                            skipped_files=[("hidden", UNREADABLE_FOLDER)])
        meta = dicom.meta_arrays({k: [] for k in ("modality", "series_description", "study_uid",
                                                  "series_uid", "position", "file_index")})
        return SliceSet(images=np.zeros((0, 1, 32, 32), np.float32), meta=meta, report=report)

    monkeypatch.setattr(cache, "scan_folder", fake_scan)
    cache_dir = tmp_path / "cache"
    cache.load_slices(site, DicomSettings(image_size=32), cache_dir)
    cache.load_slices(site, DicomSettings(image_size=32), cache_dir)
    assert len(calls) == 2
    assert not list(cache_dir.glob("*.json")) if cache_dir.exists() else True


def test_cache_key_sees_special_entries(tmp_path: Path) -> None:
    site = _site(tmp_path)
    settings = DicomSettings(image_size=32)
    before = cache.cache_key(site, settings, tmp_path / "cache")
    os.mkfifo(site / "pipe")
    assert cache.cache_key(site, settings, tmp_path / "cache") != before
