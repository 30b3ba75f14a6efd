"""Tests for fedsynth.demo_data: demo hospitals built from packaged data only."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

pytest.importorskip("phantominator")

from fedsynth import demo_data  # noqa: E402
from fedsynth.demo_data import (  # noqa: E402
    CONTRASTS,
    MR_IMAGE_STORAGE,
    ScannerProfile,
    build_demo_hospitals,
    default_profiles,
    phantom_pair,
)
from tools import needs

N_HOSPITALS = 3


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """One seed-0 build shared by the read-only tests (keeps the suite fast)."""
    out = tmp_path_factory.mktemp("demo")
    return out, build_demo_hospitals(out, N_HOSPITALS, seed=0, matrix=64)


def _series(hdir: Path, contrast: str) -> list[pydicom.Dataset]:
    files = sorted((hdir / "phantom" / contrast).glob("*.dcm"))
    return sorted((pydicom.dcmread(f) for f in files), key=lambda d: int(d.InstanceNumber))


def _pixel_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(f.relative_to(root)): pydicom.dcmread(f).pixel_array.tobytes()
        for f in sorted(root.rglob("phantom/*/*.dcm"))
    }


def test_folders_and_file_counts(built: tuple[Path, list[Path]]) -> None:
    out, paths = built
    profiles = default_profiles(N_HOSPITALS, seed=0)
    assert [p.name for p in paths] == [f"hospital-{i}" for i in range(1, N_HOSPITALS + 1)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [h["name"] for h in manifest["hospitals"]] == [p.name for p in paths]
    for hdir, prof, entry in zip(paths, profiles, manifest["hospitals"]):
        assert hdir.is_dir() and hdir.parent == out
        assert 12 <= prof.slices <= 20
        for c in CONTRASTS:
            assert len(list((hdir / "phantom" / c).glob("*.dcm"))) == prof.slices
        n_real = len(list((hdir / "real").glob("*.dcm")))
        assert n_real >= 1
        assert entry["phantom_slices"] == prof.slices
        assert entry["phantom_files"] == 2 * prof.slices
        assert entry["real_files"] == n_real == len(entry["real_sources"])
        assert entry["profile"] == dataclasses.asdict(prof)
        assert len(list(hdir.rglob("*.dcm"))) == 2 * prof.slices + n_real
    text = (out / "manifest.json").read_text()
    assert str(out) not in text and '"/' not in text  # no absolute paths


def test_every_file_reads_and_decodes(built: tuple[Path, list[Path]]) -> None:
    _, paths = built
    for hdir in paths:
        for f in sorted(hdir.rglob("*.dcm")):
            ds = pydicom.dcmread(f)
            arr = ds.pixel_array
            assert arr.ndim == 2 and arr.size > 0, f
            if "phantom" in f.parts:
                assert ds.SOPClassUID == MR_IMAGE_STORAGE
                assert ds.file_meta.MediaStorageSOPClassUID == MR_IMAGE_STORAGE
                assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
                assert ds.Modality == "MR" and ds.BodyPartExamined == "HEAD"
                assert str(ds.PatientName) == f"PHANTOM^{hdir.name}"
                assert ds.PhotometricInterpretation == "MONOCHROME2"
                assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 12, 0)
                assert arr.dtype == np.uint16 and arr.shape == (64, 64) and arr.max() <= 4095
                assert arr.max() > 500  # a real image, not an empty frame
            else:
                assert ds.Modality in {"CT", "MR"}
                assert int(ds.get("NumberOfFrames", 1) or 1) == 1


def test_real_subsets_are_non_iid_copies(built: tuple[Path, list[Path]]) -> None:
    out, paths = built
    manifest = json.loads((out / "manifest.json").read_text())
    seen: list[set[str]] = []
    for hdir, entry in zip(paths, manifest["hospitals"]):
        files = sorted((hdir / "real").glob("*.dcm"))
        uids = {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
        seen.append(uids)
        for f, name in zip(files, entry["real_sources"]):
            src = pydicom.data.get_testdata_file(name)
            assert f.read_bytes() == Path(src).read_bytes()  # copied, not re-encoded
    for i in range(len(seen)):
        for j in range(i + 1, len(seen)):
            assert seen[i].isdisjoint(seen[j])


def test_t1w_t2w_share_study_and_geometry(built: tuple[Path, list[Path]]) -> None:
    _, paths = built
    for hdir in paths:
        t1, t2 = _series(hdir, "T1w"), _series(hdir, "T2w")
        assert len(t1) == len(t2)
        assert {d.StudyInstanceUID for d in t1 + t2} == {t1[0].StudyInstanceUID}
        assert {d.FrameOfReferenceUID for d in t1 + t2} == {t1[0].FrameOfReferenceUID}
        assert len({d.SeriesInstanceUID for d in t1}) == 1
        assert t1[0].SeriesInstanceUID != t2[0].SeriesInstanceUID
        assert t1[0].SeriesDescription == "PHANTOM T1w SE"
        assert t2[0].SeriesDescription == "PHANTOM T2w SE"
        assert t1[0].SequenceName != t2[0].SequenceName
        assert float(t1[0].RepetitionTime) < float(t2[0].RepetitionTime)
        assert float(t1[0].EchoTime) < float(t2[0].EchoTime)
        assert t1[0].MagneticFieldStrength == t2[0].MagneticFieldStrength
        assert len({d.SOPInstanceUID for d in t1 + t2}) == 2 * len(t1)
        for a, b in zip(t1, t2):
            assert list(a.ImagePositionPatient) == list(b.ImagePositionPatient)
            assert a.SliceLocation == b.SliceLocation
            assert a.PixelSpacing == b.PixelSpacing
        locations = [float(d.SliceLocation) for d in t1]
        assert locations == sorted(locations) and len(set(locations)) == len(locations)


def test_written_pairs_differ_in_contrast(built: tuple[Path, list[Path]]) -> None:
    """Inside the head the two contrasts are nearly uncorrelated (CSF flips)."""
    _, paths = built
    for hdir in paths:
        t1, t2 = _series(hdir, "T1w"), _series(hdir, "T2w")
        mid = len(t1) // 2
        a = t1[mid].pixel_array.astype(float)
        b = t2[mid].pixel_array.astype(float)
        head = (a > 400) | (b > 400)
        assert head.sum() > 200
        assert np.corrcoef(a[head], b[head])[0, 1] < 0.5
        assert not np.array_equal(a, b)


def _clean(profile: ScannerProfile) -> ScannerProfile:
    return dataclasses.replace(profile, noise_sigma=0.0, rotation_deg=0.0, fov_scale=1.0)


@pytest.mark.parametrize("index", range(4))
def test_csf_bright_in_t2w_dark_in_t1w(index: int) -> None:
    """Tissue ordering flips between contrasts at every field strength."""
    prof = _clean(default_profiles(4)[index])
    zs = [demo_data._slice_z(prof, k) for k in range(prof.slices)]
    k = int(np.argmin(np.abs(np.array(zs) + 0.25)))  # slice through the ventricles
    t1w, t2w = phantom_pair(prof, k, 64, np.random.default_rng(0))
    m0, _, t2 = demo_data._tissue_maps(64, round(zs[k], 6), prof.field_strength_t)
    csf = (t2 > 1.0) & (m0 > 0.9)
    wm = np.isclose(t2, 0.08) & np.isclose(m0, 0.617)
    assert csf.sum() > 5 and wm.sum() > 5
    assert t1w[csf].mean() < t1w[wm].mean()
    assert t2w[csf].mean() > 1.5 * t2w[wm].mean()


def test_field_strength_changes_t1() -> None:
    prof = default_profiles(1)[0]
    low = dataclasses.replace(prof, field_strength_t=0.55)
    high = dataclasses.replace(prof, field_strength_t=7.0)
    z = round(demo_data._slice_z(prof, prof.slices // 2), 6)
    _, t1_low, _ = demo_data._tissue_maps(64, z, low.field_strength_t)
    _, t1_high, _ = demo_data._tissue_maps(64, z, high.field_strength_t)
    brain = (t1_low > 0) & (t1_low < 2.0)  # non-CSF tissue
    assert np.all(t1_high[brain] > t1_low[brain])


def test_profiles_distinct_and_histograms_differ(built: tuple[Path, list[Path]]) -> None:
    profiles = default_profiles(6, seed=0)
    assert len(set(profiles)) == 6
    assert len({p.name for p in profiles}) == 6
    assert len({p.field_strength_t for p in profiles[:4]}) == 4
    for p in profiles:
        assert 0.8 <= p.fov_scale <= 1.2 and 12 <= p.slices <= 20
    _, paths = built
    hists, means = [], []
    for hdir in paths:
        pix = np.concatenate([d.pixel_array.ravel() for d in _series(hdir, "T1w")])
        h, _ = np.histogram(pix, bins=64, range=(0, 4096))
        hists.append(h / h.sum())
        means.append(pix.mean())
    for i in range(len(paths)):
        for j in range(i + 1, len(paths)):
            assert np.abs(hists[i] - hists[j]).sum() > 0.1
            assert abs(means[i] - means[j]) > 10


def test_same_seed_identical_different_seed_differs(
    built: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    out0, _ = built
    again = tmp_path / "again"
    build_demo_hospitals(again, N_HOSPITALS, seed=0, matrix=64, include_real=False)
    assert _pixel_bytes(again) == _pixel_bytes(out0)
    f = Path("hospital-1/phantom/T1w/001.dcm")
    assert (again / f).read_bytes() == (out0 / f).read_bytes()  # UIDs reproducible too

    other = tmp_path / "other"
    build_demo_hospitals(other, N_HOSPITALS, seed=1, matrix=64, include_real=False)
    a = pydicom.dcmread(out0 / f)
    b = pydicom.dcmread(other / f)
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert not np.array_equal(a.pixel_array, b.pixel_array)


def test_phantom_pair_noise_follows_rng() -> None:
    prof = default_profiles(1)[0]
    a1, a2 = phantom_pair(prof, 3, 64, np.random.default_rng(7))
    b1, b2 = phantom_pair(prof, 3, 64, np.random.default_rng(7))
    c1, _ = phantom_pair(prof, 3, 64, np.random.default_rng(8))
    assert a1.dtype == np.float32 and a1.shape == (64, 64)
    assert np.array_equal(a1, b1) and np.array_equal(a2, b2)
    assert not np.array_equal(a1, c1)
    diff_std = float(np.std(a1 - c1))  # only noise differs: ~sqrt(2) * sigma
    assert 0.5 * prof.noise_sigma < diff_std < 3 * prof.noise_sigma
    with pytest.raises(IndexError):
        phantom_pair(prof, prof.slices, 64, np.random.default_rng(0))


def test_rebuild_overwrites_and_include_real_false(tmp_path: Path) -> None:
    build_demo_hospitals(tmp_path, 2, seed=3, matrix=32)
    stale = tmp_path / "hospital-1" / "phantom" / "T1w" / "999.dcm"
    stale.write_bytes(b"junk")
    paths = build_demo_hospitals(tmp_path, 2, seed=3, matrix=32, include_real=False)
    assert not stale.exists()
    assert all(not any((p / "real").glob("*.dcm")) for p in paths)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [h["real_files"] for h in manifest["hospitals"]] == [0, 0]
    assert pydicom.dcmread(next((paths[0] / "phantom" / "T2w").glob("*.dcm"))).Rows == 32


def test_build_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    build_demo_hospitals(tmp_path, 3, seed=5, matrix=64)
    assert time.perf_counter() - start < 15.0


@needs("dciodvfy", "dicom3tools")
def test_dciodvfy_reports_no_errors(built: tuple[Path, list[Path]]) -> None:
    _, paths = built
    f = sorted((paths[0] / "phantom" / "T1w").glob("*.dcm"))[0]
    res = subprocess.run(
        [shutil.which("dciodvfy") or "dciodvfy", str(f)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    errors = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]
    assert not errors, "\n".join(errors)
