"""Synthetic DICOM export: valid per dciodvfy, labelled synthetic, nothing copied from a patient."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from client.dicom import DicomSettings, is_synthetic, scan_folder
from fedsynth.export import PATIENT_NAME, Provenance, from_stored, to_stored, write_dicom, write_png
from tools import needs

PROV = Provenance(family="dcgan", round=7, model={"image_size": 32, "latent_dim": 16},
                  checkpoint="round-007.npz")


def _images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def test_2d_export_is_labelled_and_round_trips(tmp_path: Path) -> None:
    images = _images((3, 1, 32, 32))
    paths = write_dicom(images, tmp_path / "out", PROV)
    assert [p.name for p in paths] == ["synthetic-0001.dcm", "synthetic-0002.dcm", "synthetic-0003.dcm"]
    sets = [pydicom.dcmread(p) for p in paths]
    ds = sets[0]
    assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert ds.SeriesDescription == "SYNTHETIC - fedsynth dcgan round 7"
    assert ds.PatientName == PATIENT_NAME and ds.PatientID.startswith("SYNTH-")
    assert ds.ConversionType == "SYN" and ds.BurnedInAnnotation == "NO"
    assert "round 7" in ds.DerivationDescription and "dcgan" in ds.ImageComments
    block = ds.private_block(0x0009, "FEDSYNTH SYNTHETIC")
    assert block[0x01].value == "dcgan" and int(block[0x02].value) == 7
    assert '"latent_dim": 16' in block[0x03].value and block[0x04].value == "round-007.npz"
    assert is_synthetic(ds)
    # Fresh, distinct instance UIDs; one study and series per export.
    assert len({d.SOPInstanceUID for d in sets}) == 3
    assert len({d.SeriesInstanceUID for d in sets}) == 1
    for d, img in zip(sets, images):
        np.testing.assert_allclose(from_stored(d.pixel_array), img[0], atol=1 / 2000)
    # A second export never reuses identity or UIDs.
    other = pydicom.dcmread(write_dicom(images[:1], tmp_path / "again", PROV)[0])
    assert other.PatientID != ds.PatientID and other.StudyInstanceUID != ds.StudyInstanceUID


def test_export_carries_no_patient_data(tmp_path: Path) -> None:
    real = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(write_dicom(_images((1, 1, 32, 32)), tmp_path, PROV)[0])
    written = {str(e.value) for e in ds.iterall() if e.VR in ("PN", "LO", "SH", "UI", "DA", "LT")}
    for kw in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "InstitutionName"):
        assert str(real.get(kw, "?!")) not in written


def test_3d_export_is_multiframe(tmp_path: Path) -> None:
    vol = _images((2, 1, 8, 16, 16))
    paths = write_dicom(vol, tmp_path, PROV)
    ds = pydicom.dcmread(paths[1])
    assert ds.SOPClassUID == pydicom.uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    assert int(ds.NumberOfFrames) == 8
    np.testing.assert_allclose(from_stored(ds.pixel_array), vol[1, 0], atol=1 / 2000)


def test_scanner_never_trains_on_exports(tmp_path: Path) -> None:
    shutil.copyfile(get_testdata_file("MR_small.dcm"), tmp_path / "real.dcm")
    write_dicom(_images((2, 1, 64, 64)), tmp_path / "exports", PROV)
    result = scan_folder(tmp_path, DicomSettings(image_size=32))
    assert result.report.slices == 1
    assert result.report.skipped == {"synthetic": 2}


def test_bad_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected"):
        write_dicom(np.zeros((2, 32, 32)), tmp_path, PROV)
    with pytest.raises(ValueError, match="NaN"):
        write_dicom(np.full((1, 1, 16, 16), np.nan), tmp_path, PROV)


def test_png_export(tmp_path: Path) -> None:
    from PIL import Image

    paths = write_png(np.stack([np.full((1, 8, 8), -1.0), np.full((1, 8, 8), 1.0)]), tmp_path)
    assert np.asarray(Image.open(paths[0])).max() == 0
    assert np.asarray(Image.open(paths[1])).min() == 255
    assert to_stored(np.array([-2.0, -1.0, 0.0, 1.0, 5.0])).tolist() == [0, 0, 2048, 4095, 4095]


@needs("dciodvfy", "dicom3tools")
@pytest.mark.parametrize("shape", [(1, 1, 32, 32), (1, 1, 4, 16, 16)], ids=["sc-2d", "multiframe-3d"])
def test_dciodvfy_reports_no_errors(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = write_dicom(_images(shape), tmp_path, PROV)[0]
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert proc.returncode == 0 and not errors, output
    # It did validate the right IOD (not silently nothing).
    assert ("SCImage" in output) if len(shape) == 4 else ("MultiframeGrayscaleWordSCImage" in output)
