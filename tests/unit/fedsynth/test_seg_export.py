"""Labelled synthetic DICOM out (fedsynth/seg_export.py): each synthetic image with a DICOM SEG of
its mask, referencing it, both marked synthetic, both valid per dciodvfy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from client.dicom import DicomSettings, NoUsableDicomError, is_synthetic, scan_folder
from fedsynth.export import PATIENT_NAME, Provenance, write_dicom
from fedsynth.seg_export import write_segs

PROV = Provenance(family="maskgan", round=3, model={"image_size": 32}, checkpoint="round-003.npz")


def _pair(tmp_path: Path) -> tuple[list[Path], list[Path], np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (3, 1, 32, 32)).astype(np.float32)
    masks = np.zeros((3, 2, 32, 32), dtype=np.uint8)
    masks[0, 0, 4:10, 5:12] = 1
    masks[1, 1, 20:30, 2:9] = 1
    masks[2, 0, 10:20, 10:20] = masks[2, 1, 12:18, 12:18] = 1  # overlapping labels
    paths = write_dicom(images, tmp_path, PROV)
    return paths, write_segs(paths, masks, ("lesion", "liver"), PROV), masks


def test_each_seg_references_its_image_and_reads_back_to_its_mask(tmp_path: Path) -> None:
    import highdicom as hd

    images, segs, masks = _pair(tmp_path)
    assert [s.name for s in segs] == [f"synthetic-{i:04d}-seg.dcm" for i in (1, 2, 3)]
    for img_path, seg_path, mask in zip(images, segs, masks):
        img, seg_ds = pydicom.dcmread(img_path), pydicom.dcmread(seg_path)
        seg = hd.seg.Segmentation.from_dataset(seg_ds)
        assert [u[2] for u in seg.get_source_image_uids()] == [img.SOPInstanceUID]
        assert seg_ds.StudyInstanceUID == img.StudyInstanceUID
        assert seg_ds.PatientID == img.PatientID and str(seg_ds.PatientName) == PATIENT_NAME
        got = seg.get_pixels_by_source_instance([img.SOPInstanceUID], segment_numbers=[1, 2],
                                                skip_overlap_checks=True)
        np.testing.assert_array_equal(np.moveaxis(got[0], -1, 0), mask)
        assert [seg.get_segment_description(n).segment_label for n in (1, 2)] == [
            "lesion", "liver"]
        assert is_synthetic(seg_ds) and is_synthetic(img)
        assert seg_ds.SeriesDescription.startswith("SYNTHETIC - fedsynth")
        assert "SYNTHETIC" in seg_ds.ContentDescription


def test_a_hospital_never_trains_on_the_export(tmp_path: Path) -> None:
    _pair(tmp_path)
    with pytest.raises(NoUsableDicomError, match="synthetic 3"):
        scan_folder(tmp_path, DicomSettings(image_size=32))


def test_volumes_are_refused_with_a_reason(tmp_path: Path) -> None:
    paths = write_dicom(np.zeros((1, 1, 4, 16, 16), np.float32), tmp_path, PROV)
    with pytest.raises(ValueError, match="2D only"):
        write_segs(paths, np.zeros((1, 1, 4, 16, 16), np.uint8), ("lesion",), PROV)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) not on PATH")
def test_image_and_seg_pass_dciodvfy(tmp_path: Path) -> None:
    images, segs, _ = _pair(tmp_path)
    for path, iod in ((images[0], "SCImage"), (segs[0], "Segmentation")):
        proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        output = proc.stdout + proc.stderr
        errors = [line for line in output.splitlines() if line.startswith("Error")]
        assert proc.returncode == 0 and not errors, output
        assert iod in output
