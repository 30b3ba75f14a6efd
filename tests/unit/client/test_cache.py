"""Tests for client.cache: hits skip decoding, changes rebuild, partial writes are ignored."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

import client.cache as cache
import client.dicom as dicom
from client.dicom import DicomSettings, NoUsableDicomError, SliceSet


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    f = tmp_path / "site"
    (f / "a").mkdir(parents=True)
    shutil.copyfile(get_testdata_file("CT_small.dcm"), f / "a" / "CT_small.dcm")
    shutil.copyfile(get_testdata_file("MR_small.dcm"), f / "a" / "MR_small")
    shutil.copyfile(get_testdata_file("emri_small.dcm"), f / "emri_small.dcm")  # NaN positions
    (f / "readme.txt").write_text("skipped")
    return f


class Counter:
    """Wraps the real scan_folder and counts calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.real = dicom.scan_folder

    def __call__(self, folder: Path, settings: DicomSettings) -> SliceSet:
        self.calls += 1
        return self.real(folder, settings)


def _boom(*_a: object, **_k: object) -> SliceSet:
    raise AssertionError("DICOM decoded on what should be a cache hit")


def _assert_same(a: SliceSet, b: SliceSet) -> None:
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    assert a.images.dtype == b.images.dtype == np.float32
    assert set(a.meta) == set(b.meta)
    for key in a.meta:
        assert a.meta[key].dtype.kind == b.meta[key].dtype.kind, key
        np.testing.assert_array_equal(a.meta[key], b.meta[key])  # NaN == NaN here
    assert a.report == b.report


@pytest.mark.parametrize("patch_target", ["dicom", "cache"])
def test_second_call_is_a_hit(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              patch_target: str) -> None:
    cdir = tmp_path / "cache"
    settings = DicomSettings(image_size=32)
    first = cache.load_slices(folder, settings, cdir)
    assert np.isnan(first.meta["position"]).any() and np.isfinite(first.meta["position"]).any()
    assert first.report.skipped == {"not-dicom": 1}
    assert len(list(cdir.glob("*.npy"))) == 1 and len(list(cdir.glob("*.json"))) == 1

    monkeypatch.setattr(dicom if patch_target == "dicom" else cache, "scan_folder", _boom)
    second = cache.load_slices(folder, settings, cdir)
    _assert_same(first, second)
    assert second.report.skipped_files == [("readme.txt", "not-dicom")]


def test_touch_or_new_file_or_settings_rebuilds(folder: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cdir = tmp_path / "cache"
    counter = Counter()
    monkeypatch.setattr(dicom, "scan_folder", counter)
    s = DicomSettings(image_size=32)

    cache.load_slices(folder, s, cdir)
    cache.load_slices(folder, s, cdir)
    assert counter.calls == 1

    target = folder / "a" / "MR_small"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    cache.load_slices(folder, s, cdir)
    assert counter.calls == 2

    (folder / "readme.txt").write_text("now a longer file, same name")  # size change
    cache.load_slices(folder, s, cdir)
    assert counter.calls == 3

    shutil.copyfile(get_testdata_file("MR_small.dcm"), folder / "new_MR")
    grown = cache.load_slices(folder, s, cdir)
    assert counter.calls == 4 and grown.report.slices == 13

    other = cache.load_slices(folder, DicomSettings(image_size=16), cdir)
    assert counter.calls == 5 and other.images.shape[-1] == 16
    cache.load_slices(folder, DicomSettings(image_size=16), cdir)
    assert counter.calls == 5


def test_npy_without_json_is_not_used(folder: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cdir = tmp_path / "cache"
    cdir.mkdir()
    s = DicomSettings(image_size=32)
    key = cache.cache_key(folder, s, cdir)
    np.save(cdir / f"{key}.npy", np.zeros((2, 1, 32, 32), dtype=np.float32))  # crash leftover
    (cdir / f".{key}.json.abc.tmp").write_text("{half")                      # stray temp file

    counter = Counter()
    monkeypatch.setattr(dicom, "scan_folder", counter)
    result = cache.load_slices(folder, s, cdir)
    assert counter.calls == 1
    assert result.images.shape == (12, 1, 32, 32)
    assert (cdir / f"{key}.json").is_file()

    monkeypatch.setattr(dicom, "scan_folder", _boom)
    again = cache.load_slices(folder, s, cdir)
    _assert_same(result, again)


def test_corrupt_npy_with_json_rebuilds(folder: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cdir = tmp_path / "cache"
    s = DicomSettings(image_size=32)
    good = cache.load_slices(folder, s, cdir)
    key = cache.cache_key(folder, s, cdir)
    npy = cdir / f"{key}.npy"
    npy.write_bytes(npy.read_bytes()[:100])  # truncated behind the marker's back

    counter = Counter()
    monkeypatch.setattr(dicom, "scan_folder", counter)
    rebuilt = cache.load_slices(folder, s, cdir)
    assert counter.calls == 1
    _assert_same(good, rebuilt)


def test_failure_is_not_cached_and_default_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NoUsableDicomError):
        cache.load_slices(empty, DicomSettings())
    with pytest.raises(NoUsableDicomError):
        cache.load_slices(tmp_path / "missing", DicomSettings())
    assert not list((tmp_path / "home").rglob("*.json"))

    shutil.copyfile(get_testdata_file("MR_small.dcm"), empty / "MR_small.dcm")
    cache.load_slices(empty, DicomSettings(image_size=32))
    assert len(list((tmp_path / "home" / ".cache" / "fedsynth").glob("*.json"))) == 1


def test_cache_inside_folder_does_not_invalidate_itself(folder: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cdir = folder / ".fedsynth-cache"
    s = DicomSettings(image_size=32)
    first = cache.load_slices(folder, s, cdir)
    monkeypatch.setattr(dicom, "scan_folder", _boom)
    second = cache.load_slices(folder, s, cdir)
    _assert_same(first, second)


def test_crash_while_writing_leaves_no_usable_entry(folder: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cdir = tmp_path / "cache"
    s = DicomSettings(image_size=32)
    real_save = np.save

    def dying_save(fh, arr, **kw):  # type: ignore[no-untyped-def]
        real_save(fh, arr[:1], **kw)  # some bytes hit the disk, then the disk is "full"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.np, "save", dying_save)
    result = cache.load_slices(folder, s, cdir)  # still returns the decoded slices
    assert result.images.shape == (12, 1, 32, 32)
    assert list(cdir.iterdir()) == []  # temp file removed, no npy, no json marker
    monkeypatch.setattr(cache.np, "save", real_save)

    counter = Counter()
    monkeypatch.setattr(dicom, "scan_folder", counter)
    cache.load_slices(folder, s, cdir)
    cache.load_slices(folder, s, cdir)
    assert counter.calls == 1
