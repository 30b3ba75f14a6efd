"""The scanner over every file of pydicom's test data and of pydicom-data.

Oracle: bare pydicom (``dcmread(force=True).pixel_array``). Every file it decodes that is
an image (not a SEG mask or an RT dose grid) must be usable; every other file must be
skipped with one of the fixed reasons; nothing may raise. One scan, shared by the tests
(about 10-20 s on 2 cores at image_size 32).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from bench.decode import corpus_files
from client.dicom import SKIP_REASONS, DicomSettings, SliceSet, decode_frames, scan_folder

pytestmark = pytest.mark.slow  # ~250 real files, some 512x512 multi-frame: 20-70 s on 2 shared cores

_NON_IMAGE = {"SEG", "RTDOSE", "RTSTRUCT", "RTPLAN", "SR", "PR", "KO"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], SliceSet]:
    folder = tmp_path_factory.mktemp("corpus")
    names: dict[str, Path] = {}
    for i, f in enumerate(corpus_files()):
        name = f"{i:03d}_{f.name}"
        shutil.copyfile(f, folder / name)  # a link out of the data folder is not followed
        names[name] = f
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = scan_folder(folder, DicomSettings(image_size=32, min_size=1))
    return folder, names, result


def _oracle(path: Path) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, force=True)
            ds.pixel_array
        except Exception:
            return False
    return str(ds.get("Modality", "")).upper() not in _NON_IMAGE


def test_every_file_accounted_for(corpus: tuple[Path, dict[str, Path], SliceSet]) -> None:
    _, names, result = corpus
    rep = result.report
    assert len(names) > 200  # both packages really found
    assert any("data_store" in str(p) for p in names.values())  # pydicom-data included
    assert rep.files_seen == len(names)
    assert rep.usable_files + len(rep.skipped_files) == rep.files_seen
    assert {r for _, r in rep.skipped_files} <= set(SKIP_REASONS)
    assert sum(rep.skipped.values()) == len(rep.skipped_files)
    assert result.images.shape == (rep.slices, 1, 32, 32)
    assert np.isfinite(result.images).all()
    assert result.images.min() >= -1.0 and result.images.max() <= 1.0


def test_decodable_images_are_usable(corpus: tuple[Path, dict[str, Path], SliceSet]) -> None:
    _, names, result = corpus
    skipped = dict(result.report.skipped_files)
    usable = {n for n in names if n not in skipped}
    decodable = {n for n, p in names.items() if _oracle(p)}
    missed = {n: skipped[n] for n in decodable - usable}
    assert not missed, f"decodable images skipped: {missed}"
    # Files we decode although bare pydicom cannot: only those lacking a transfer syntax,
    # which the scanner infers from how the file was actually encoded.
    for name in usable - decodable:
        ds = pydicom.dcmread(names[name], force=True, stop_before_pixels=True)
        assert "TransferSyntaxUID" not in getattr(ds, "file_meta", {}), name


def test_known_bad_files_have_the_right_reason(corpus: tuple[Path, dict[str, Path], SliceSet]) -> None:
    _, names, result = corpus
    by_base: dict[str, set[str]] = {}
    for rel, reason in result.report.skipped_files:
        by_base.setdefault(rel.split("_", 1)[1], set()).add(reason)
    expected = {
        "MR_truncated.dcm": "truncated-pixel-data",
        "emri_small_jpeg_2k_lossless_too_short.dcm": "truncated-pixel-data",
        "JPEG-lossy.dcm": "undecodable",
        "DICOMDIR": "dicomdir",
        "test-SR.dcm": "non-image-object",
        "rtplan.dcm": "non-image-object",
        "rtdose.dcm": "non-image-object",
        "liver.dcm": "non-image-object",  # a SEG object
        "README.txt": "not-dicom",
        "zipMR.gz": "not-dicom",
    }
    for base, reason in expected.items():
        assert by_base.get(base) == {reason}, (base, by_base.get(base))


def test_every_mr_small_variant_decodes_to_the_same_pixels() -> None:
    base = Path(pydicom.data.get_testdata_file("MR_small.dcm"))
    ref = decode_frames(pydicom.dcmread(base))
    variants = sorted(p for p in base.parent.glob("MR_small_*.dcm") if p.name != "MR_truncated.dcm")
    names = {p.name for p in variants}
    assert {"MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
            "MR_small_bigendian.dcm", "MR_small_implicit.dcm"} <= names
    for path in variants:
        np.testing.assert_array_equal(decode_frames(pydicom.dcmread(path)), ref, err_msg=path.name)
    # The multi-frame sibling set in pydicom-data, lossless variants only.
    emri = Path(pydicom.data.get_testdata_file("emri_small.dcm"))
    emri_ref = decode_frames(pydicom.dcmread(emri))
    assert emri_ref.shape[0] == 10
    for name in ("emri_small_RLE.dcm", "emri_small_big_endian.dcm", "emri_small_jpeg_2k_lossless.dcm",
                 "emri_small_jpeg_ls_lossless.dcm"):
        np.testing.assert_array_equal(decode_frames(pydicom.dcmread(emri.parent / name)), emri_ref,
                                      err_msg=name)
