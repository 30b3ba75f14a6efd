"""Tests for client.dicom: discovery, skip reasons, decoding and normalisation.

Fixtures are pydicom's bundled test files copied into tmp_path; no network.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from client.dicom import (
    DicomSettings,
    NoUsableDicomError,
    ScanReport,
    decode_frames,
    list_candidate_files,
    scan_folder,
)


def _copy(name: str, dest: Path, new_name: str | None = None) -> Path:
    src = get_testdata_file(name)
    assert src is not None, f"pydicom test file {name} missing"
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / (new_name or name)
    shutil.copyfile(src, target)
    return target


def _random_bytes(path: Path, n: int = 4096, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())
    return path


def _truncated_ct(path: Path) -> Path:
    """CT_small with the last half of its pixel data cut off (file ends early)."""
    src = Path(get_testdata_file("CT_small.dcm"))
    raw = src.read_bytes()
    n_pixel = len(pydicom.dcmread(src).PixelData)
    path.write_bytes(raw[: len(raw) - n_pixel // 2])
    return path


@pytest.fixture()
def mixed_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "hospital"
    _copy("CT_small.dcm", folder / "ct")                      # CT 128x128
    _copy("MR_small.dcm", folder / "mr", "IM0001")            # MR 64x64, no suffix
    _copy("JPEG2000.dcm", folder / "nm")                      # NM 1024x256, J2K lossy
    _copy("emri_small.dcm", folder / "mr" / "multi")          # MR 10 frames 64x64
    return folder


# --------------------------------------------------------------------------- decoding


def test_decode_ct_gives_hounsfield_units() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    expected = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    frames = decode_frames(ds)
    assert frames.dtype == np.float32
    assert frames.shape == (1, 128, 128)
    np.testing.assert_allclose(frames[0], expected)
    # Rescale intercept -1024 really applied: raw stored values are all >= 0.
    assert ds.pixel_array.min() >= 0 and frames.min() < 0


def test_ct_window_maps_hu_to_minus_one_one(tmp_path: Path) -> None:
    _copy("CT_small.dcm", tmp_path / "f")
    settings = DicomSettings(image_size=128, ct_window=(40.0, 400.0))
    result = scan_folder(tmp_path / "f", settings)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    expected = np.clip((hu - (40.0 - 200.0)) / 400.0 * 2.0 - 1.0, -1.0, 1.0)
    np.testing.assert_allclose(result.images[0, 0], expected, atol=1e-5)
    # A different window gives different output (the setting is really used).
    other = scan_folder(tmp_path / "f", DicomSettings(image_size=128, ct_window=(400.0, 2000.0)))
    assert not np.allclose(other.images, result.images)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    folder1, folder2 = tmp_path / "m1", tmp_path / "m2"
    mono2 = _copy("MR_small.dcm", folder2)
    ds = pydicom.dcmread(mono2)
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    ds.PhotometricInterpretation = "MONOCHROME1"
    folder1.mkdir()
    ds.save_as(folder1 / "MR_small_m1.dcm")

    ref = decode_frames(pydicom.dcmread(mono2))
    inv = decode_frames(pydicom.dcmread(folder1 / "MR_small_m1.dcm"))
    np.testing.assert_allclose(inv, ref.min() + ref.max() - ref)
    # Bright stays bright: the brightest MONOCHROME2 pixel is the darkest after inversion.
    assert inv.flat[np.argmax(ref)] == inv.min()

    # With symmetric percentiles the normalised slices are exact negatives.
    s = DicomSettings(image_size=64)
    a = scan_folder(folder2, s).images
    b = scan_folder(folder1, s).images
    np.testing.assert_allclose(b, -a, atol=1e-5)


def test_real_monochrome1_cr_file_is_inverted() -> None:
    """A genuine MONOCHROME1 CR image from pydicom's test data."""
    base = Path(get_testdata_file("CT_small.dcm")).parent
    candidates = sorted(p for p in base.rglob("6154") if p.is_file())
    if not candidates:
        pytest.skip("MONOCHROME1 CR test file not available")
    ds = pydicom.dcmread(candidates[0])
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    hu = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
    np.testing.assert_allclose(decode_frames(ds)[0], hu.min() + hu.max() - hu, rtol=1e-5)


# --------------------------------------------------------------------------- scanning


@pytest.mark.parametrize("size", [32, 64])
def test_mixed_folder_shape_range_dtype(mixed_folder: Path, size: int) -> None:
    result = scan_folder(mixed_folder, DicomSettings(image_size=size))
    n = 1 + 1 + 1 + 10
    assert result.images.shape == (n, 1, size, size)
    assert result.images.dtype == np.float32
    assert np.isfinite(result.images).all()
    assert result.images.min() >= -1.0 and result.images.max() <= 1.0
    # Each slice uses (most of) the range: normalisation really happened.
    assert (result.images.reshape(n, -1).max(axis=1) > 0.5).all()
    assert (result.images.reshape(n, -1).min(axis=1) < -0.5).all()

    rep = result.report
    assert rep.files_seen == 4 and rep.usable_files == 4 and rep.slices == n
    assert rep.usable_by_modality == {"CT": 1, "MR": 11, "NM": 1}
    assert rep.skipped == {} and rep.skipped_files == []
    assert rep.folder_name == "hospital"

    for key in ("modality", "series_description", "study_uid", "series_uid", "position", "file_index"):
        assert len(result.meta[key]) == n, key
    assert sorted(set(result.meta["modality"].tolist())) == ["CT", "MR", "NM"]
    files = list_candidate_files(mixed_folder)
    ct_rows = np.flatnonzero(result.meta["modality"] == "CT")
    assert files[int(result.meta["file_index"][ct_rows[0]])].name == "CT_small.dcm"
    assert np.isfinite(result.meta["position"][ct_rows[0]])
    assert result.meta["position"].dtype == np.float64
    assert result.meta["study_uid"][ct_rows[0]] == pydicom.dcmread(files[0]).StudyInstanceUID

    # The 10 frames of the multi-frame MR are distinct slices.
    emri_index = [f.name for f in files].index("emri_small.dcm")
    multi = result.images[result.meta["file_index"] == emri_index]
    assert multi.shape[0] == 10
    assert not np.allclose(multi[0], multi[5])


def test_non_square_image_is_centre_padded(tmp_path: Path) -> None:
    _copy("JPEG2000.dcm", tmp_path / "nm")  # 1024 rows x 256 cols
    img = scan_folder(tmp_path / "nm", DicomSettings(image_size=64)).images[0, 0]
    # Width 256 of 1024 -> 16 of 64 columns carry the image, centred; the rest is -1.
    assert np.all(img[:, :20] == -1.0) and np.all(img[:, -20:] == -1.0)
    assert img[:, 26:38].max() > -1.0


def test_color_image_becomes_single_channel(tmp_path: Path) -> None:
    _copy("SC_rgb.dcm", tmp_path / "c")
    _copy("SC_rgb_jpeg_dcmtk.dcm", tmp_path / "c")  # YBR_FULL JPEG
    result = scan_folder(tmp_path / "c", DicomSettings(image_size=32))
    assert result.images.shape == (2, 1, 32, 32)
    # Same picture, two encodings: luminance must agree closely (lossy JPEG).
    assert np.abs(result.images[0] - result.images[1]).mean() < 0.1


def test_list_candidate_files_recursive_sorted(mixed_folder: Path) -> None:
    (mixed_folder / "zz" / "deep").mkdir(parents=True)
    (mixed_folder / "zz" / "deep" / "noext").write_bytes(b"x")
    files = list_candidate_files(mixed_folder)
    rel = [f.relative_to(mixed_folder).as_posix() for f in files]
    assert rel == sorted(rel)
    assert "zz/deep/noext" in rel and "mr/IM0001" in rel
    assert len(rel) == 5


def test_folder_without_dicom_raises_with_counts(tmp_path: Path) -> None:
    folder = tmp_path / "nothing_here"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image\n")
    _random_bytes(folder / "x.dcm")
    with pytest.raises(NoUsableDicomError) as info:
        scan_folder(folder, DicomSettings())
    msg = str(info.value)
    assert str(folder) in msg
    assert "2 files" in msg
    assert "not-dicom 2" in msg
    assert isinstance(info.value, ValueError)


def test_missing_folder_raises_same_error(tmp_path: Path) -> None:
    with pytest.raises(NoUsableDicomError, match="does not exist"):
        scan_folder(tmp_path / "nope", DicomSettings())
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(NoUsableDicomError, match="not a directory"):
        scan_folder(a_file, DicomSettings())


def test_empty_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(NoUsableDicomError, match="0 files"):
        scan_folder(tmp_path, DicomSettings())


def test_bad_files_are_skipped_with_reasons(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    _copy("CT_small.dcm", folder)
    _random_bytes(folder / "random.dcm")
    (folder / "empty.dcm").write_bytes(b"")
    _truncated_ct(folder / "truncated.dcm")
    _copy("test-SR.dcm", folder)                                      # structured report
    _copy("rtplan.dcm", folder)                                       # RT plan
    shutil.copyfile(get_testdata_file("DICOMDIR"), folder / "DICOMDIR")
    zero = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    zero.Rows = 0
    zero.save_as(folder / "zero_rows.dcm")

    result = scan_folder(folder, DicomSettings(image_size=32))
    rep = result.report
    assert result.images.shape == (1, 1, 32, 32)
    assert rep.files_seen == 8 and rep.usable_files == 1 and rep.slices == 1
    assert rep.skipped == {
        "not-dicom": 1,
        "empty-file": 1,
        "truncated-pixel-data": 1,
        "non-image-object": 2,
        "dicomdir": 1,
        "inconsistent-geometry": 1,
    }
    reasons = dict(rep.skipped_files)
    assert reasons["random.dcm"] == "not-dicom"
    assert reasons["empty.dcm"] == "empty-file"
    assert reasons["truncated.dcm"] == "truncated-pixel-data"
    assert reasons["test-SR.dcm"] == "non-image-object"
    assert reasons["DICOMDIR"] == "dicomdir"
    assert reasons["zero_rows.dcm"] == "inconsistent-geometry"
    summary = rep.summary()
    assert summary.startswith("1 slices from 1 files (CT 1); skipped 7:")
    assert "not-dicom 1" in summary and "non-image-object 2" in summary


def test_undecodable_file_is_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    _copy("MR_small.dcm", folder)
    _copy("JPEG-lossy.dcm", folder)  # known-broken JPEG stream in pydicom's test data
    result = scan_folder(folder, DicomSettings(image_size=32))
    assert result.report.slices == 1
    assert dict(result.report.skipped_files)["JPEG-lossy.dcm"] == "undecodable"


def test_filters_and_min_size(mixed_folder: Path) -> None:
    only_ct = scan_folder(mixed_folder, DicomSettings(image_size=32, modalities=("CT",)))
    assert only_ct.report.usable_by_modality == {"CT": 1}
    assert only_ct.report.skipped == {"filtered-out": 3}

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    body = str(ds.get("BodyPartExamined", "")) or None
    no_body = scan_folder(mixed_folder, DicomSettings(image_size=32, modalities=("MR", "NM")))
    assert no_body.report.skipped == {"filtered-out": 1}
    if body is None:
        with pytest.raises(NoUsableDicomError, match="filtered-out 4"):
            scan_folder(mixed_folder, DicomSettings(body_parts=("KNEE",)))

    by_series = scan_folder(mixed_folder, DicomSettings(image_size=32, series_pattern=r"^$|.*"))
    assert by_series.report.slices == 13
    with pytest.raises(NoUsableDicomError, match="filtered-out 4"):
        scan_folder(mixed_folder, DicomSettings(series_pattern=r"^NO SUCH SERIES$"))

    big_only = scan_folder(mixed_folder, DicomSettings(image_size=32, min_size=100))
    assert big_only.report.usable_by_modality == {"CT": 1, "NM": 1}
    assert big_only.report.skipped == {"too-small": 2}


def test_summary_format() -> None:
    rep = ScanReport(
        folder_name="x",
        files_seen=43,
        usable_files=40,
        slices=120,
        usable_by_modality={"MR": 100, "CT": 20},
        skipped={"not-dicom": 2, "no-pixel-data": 1},
        skipped_files=[],
    )
    assert rep.summary() == (
        "120 slices from 40 files (CT 20, MR 100); skipped 3: not-dicom 2, no-pixel-data 1"
    )


def test_fingerprint_stable_and_sensitive() -> None:
    a = DicomSettings()
    assert a.fingerprint() == DicomSettings().fingerprint()
    assert a.fingerprint() != DicomSettings(image_size=32).fingerprint()
    assert a.fingerprint() != DicomSettings(ct_window=(50.0, 400.0)).fingerprint()
    assert a.fingerprint() != DicomSettings(modalities=("MR",)).fingerprint()


# --------------------------------------------------------------------------- 3D volumes


@pytest.fixture(scope="module")
def phantom_hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedsynth.demo_data import build_demo_hospitals

    return build_demo_hospitals(tmp_path_factory.mktemp("demo"), 1, include_real=False)[0]


def test_volumes_from_phantom_series(phantom_hospital: Path) -> None:
    from client.volumes import VolumeSettings, load_volumes

    vs = load_volumes(phantom_hospital, VolumeSettings(spacing=(4.0, 4.0, 4.0), shape=(32, 64, 64)))
    assert vs.volumes.shape == (2, 1, 32, 64, 64) and vs.volumes.dtype == np.float32
    assert vs.volumes.min() >= -1.0 and vs.volumes.max() <= 1.0
    assert vs.modalities == ["MR", "MR"] and vs.skipped_series == []
    t1, t2 = vs.volumes[:, 0]
    assert not np.allclose(t1, t2)  # two contrasts, two volumes
    # ~115 mm of slices at 4 mm fill ~29 of 32 planes: the padding planes are background.
    assert np.all(t1[0] == -1.0) and t1[16].max() > 0.0


def test_volume_slices_sorted_by_position(phantom_hospital: Path, tmp_path: Path) -> None:
    from client.dicom import normalise
    from client.volumes import VolumeSettings, load_volumes

    series = phantom_hospital / "phantom" / "T1w"
    files = sorted(series.glob("*.dcm"))
    # Shuffle the names so that file order says nothing about slice order.
    shuffled = tmp_path / "t1"
    shuffled.mkdir()
    perm = np.random.default_rng(1).permutation(len(files))
    for i, f in zip(perm, files):
        shutil.copyfile(f, shuffled / f"x{i:03d}.dcm")
    dss = [pydicom.dcmread(f) for f in files]
    ref = np.stack([decode_frames(d)[0] for d in sorted(dss, key=lambda d: float(d.ImagePositionPatient[2]))])
    dz = float(dss[1].ImagePositionPatient[2]) - float(dss[0].ImagePositionPatient[2])
    dy, dx = (float(v) for v in dss[0].PixelSpacing)
    native = VolumeSettings(spacing=(abs(dz), dy, dx), shape=ref.shape)
    vol = load_volumes(shuffled, native).volumes[0, 0]
    expected = normalise(ref[None], "MR", DicomSettings())[0]
    np.testing.assert_allclose(vol, expected, atol=1e-3)


def test_series_with_a_missing_slice_is_skipped(phantom_hospital: Path, tmp_path: Path) -> None:
    from client.volumes import load_volumes

    folder = tmp_path / "gap"
    shutil.copytree(phantom_hospital / "phantom", folder)
    middle = sorted((folder / "T2w").glob("*.dcm"))[5]
    middle.unlink()
    vs = load_volumes(folder)
    assert vs.volumes.shape[0] == 1
    assert [reason for _, reason in vs.skipped_series] == ["inconsistent-geometry"]
    with pytest.raises(NoUsableDicomError):
        load_volumes(folder / "T2w")


def test_report_counts_are_integers_only(mixed_folder: Path) -> None:
    rep = scan_folder(mixed_folder, DicomSettings(image_size=32)).report
    counts = rep.counts()
    assert all(isinstance(v, int) for v in counts.values())
    assert counts["slices"] == 13 and counts["series"] == len(rep.series) and counts["studies"] >= 1
    assert counts["slices_mr"] == 11 and counts["slices_ct"] == 1
    assert counts["skipped_not_dicom"] == 0
    # No UID, description or path can hide in a key.
    text = " ".join(counts)
    for s in rep.series:
        assert s.series_uid not in text and s.study_uid not in text
    odd = ScanReport("x", 1, 1, 3, usable_by_modality={"MY HOSPITAL XR": 3})
    assert odd.counts()["slices_other"] == 3


def test_headerless_and_missing_transfer_syntax_files(tmp_path: Path) -> None:
    """Old preamble-less DICOM and files without a transfer syntax still decode."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    folder = tmp_path / "old"
    folder.mkdir()
    ds.save_as(folder / "no_meta.dcm", implicit_vr=True, little_endian=True, enforce_file_format=False)
    result = scan_folder(folder, DicomSettings(image_size=64))
    ref = scan_folder(_copy("MR_small.dcm", tmp_path / "ref").parent, DicomSettings(image_size=64))
    np.testing.assert_array_equal(result.images, ref.images)


def test_pixel_data_shorter_than_header_claims(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # a well-formed file, too few pixel bytes
    folder = tmp_path / "short"
    folder.mkdir()
    ds.save_as(folder / "short.dcm")
    _copy("CT_small.dcm", folder)
    rep = scan_folder(folder, DicomSettings(image_size=32)).report
    assert dict(rep.skipped_files) == {"short.dcm": "truncated-pixel-data"}
