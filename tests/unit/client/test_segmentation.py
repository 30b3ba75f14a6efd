"""DICOM SEG and RTSTRUCT masks read back onto the right slices, unmatched ones reported, hostile
segmentations refused within the scanner's limits (client/segmentation.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from client import rtstruct
from client import segmentation as segm
from client.dicom import DicomSettings, scan_folder
from fedsynth.cli import main
from tests.harness import seg_helpers as h

SIZE = 32


def _rows_by_sop(slices) -> dict[str, int]:  # type: ignore[no-untyped-def]
    return {str(u): i for i, u in enumerate(slices.meta["sop_uid"])}


def _load(folder: Path, labels: str, patterns: str = "", size: int = SIZE):
    settings = DicomSettings(image_size=size)
    slices = scan_folder(folder, settings)
    return slices, segm.load_masks(folder, slices, settings,
                                   segm.LabelRule.from_config(labels, patterns))


def test_seg_written_by_highdicom_reads_back_exactly(tmp_path: Path) -> None:
    images = h.ct_series(tmp_path / "d")
    truth = h.lesion_masks(4, 32, 32)
    h.write_seg(images, truth, tmp_path / "d" / "seg.dcm")
    slices, got = _load(tmp_path / "d", "liver,lesion")  # channel order is the run's
    assert slices.report.segmentation_files == ["seg.dcm"]
    assert slices.report.skipped == {"non-image-object": 1}  # never trained on as an image
    rows = _rows_by_sop(slices)
    assert got.labels == ("liver", "lesion")
    for i, ds in enumerate(images):
        r = rows[ds.SOPInstanceUID]
        np.testing.assert_array_equal(got.masks[r, 0], truth[i, ..., 1])
        np.testing.assert_array_equal(got.masks[r, 1], truth[i, ..., 0])
    assert got.covered.all()
    assert got.report.masked_slices == 2 and got.report.slices_by_label == {"liver": 1, "lesion": 2}
    assert got.report.counts()["segmentations_matched"] == 1


def test_seg_label_by_code_and_unwanted_labels(tmp_path: Path) -> None:
    images = h.ct_series(tmp_path / "d")
    truth = h.lesion_masks(4, 32, 32)
    h.write_seg(images, truth, tmp_path / "d" / "seg.dcm")
    # by the segmented property type's code (SCT 108369006 Neoplasm), not its label
    slices, got = _load(tmp_path / "d", "tumour", "SCT:108369006")
    rows = _rows_by_sop(slices)
    np.testing.assert_array_equal(got.masks[rows[images[2].SOPInstanceUID], 0], truth[2, ..., 0])
    _, none = _load(tmp_path / "d", "kidney")
    assert none.report.unmatched == {"no-wanted-label": 1} and none.masks.sum() == 0


def test_rtstruct_rasterised_on_the_image_grid(tmp_path: Path) -> None:
    images = h.ct_series(tmp_path / "d")
    h.write_rtstruct(images, tmp_path / "d" / "rs.dcm")
    slices, got = _load(tmp_path / "d", "lesion", "GTV")
    rows = _rows_by_sop(slices)
    want = h.rtstruct_expected(4, 32, 32)
    for i, ds in enumerate(images):
        np.testing.assert_array_equal(got.masks[rows[ds.SOPInstanceUID], 0], want[i])
    assert got.report.slices_by_label == {"lesion": 2}


def test_rtstruct_without_image_references_matched_by_plane(tmp_path: Path) -> None:
    images = h.ct_series(tmp_path / "d")
    h.write_rtstruct(images, tmp_path / "d" / "rs.dcm", reference=False)
    slices, got = _load(tmp_path / "d", "lesion,body", "GTV;^body")
    rows = _rows_by_sop(slices)
    want = h.rtstruct_expected(4, 32, 32)
    for i, ds in enumerate(images):
        np.testing.assert_array_equal(got.masks[rows[ds.SOPInstanceUID], 0], want[i])
    body = got.masks[rows[images[0].SOPInstanceUID], 1]
    assert body[1:31, 1:31].all() and body.sum() == 30 * 30


def test_masks_follow_the_image_resize(tmp_path: Path) -> None:
    """At image size 16 the mask is the 32-pixel mask shrunk like the image, on the same pixels."""
    images = h.ct_series(tmp_path / "d")
    truth = h.lesion_masks(4, 32, 32)
    h.write_seg(images, truth, tmp_path / "d" / "seg.dcm")
    slices, got = _load(tmp_path / "d", "lesion", size=16)
    rows = _rows_by_sop(slices)
    m = got.masks[rows[images[1].SOPInstanceUID], 0]
    expected = truth[1, ..., 0].reshape(16, 2, 16, 2).mean((1, 3)) >= 0.5
    np.testing.assert_array_equal(m, expected)


def test_unmatched_segmentations_are_reported_not_fatal(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    images = h.ct_series(folder)
    other = h.ct_series(tmp_path / "elsewhere", tag="b")  # images that are not in the folder
    h.write_seg(other, h.lesion_masks(4, 32, 32), folder / "seg_other.dcm")
    h.write_rtstruct(other, folder / "rs_other.dcm")
    h.write_rtstruct(images, folder / "rs_ok.dcm")
    # real files of pydicom's test data: SEGs and an RTSTRUCT of images we do not have;
    # liver_1frame.dcm is liver.dcm cut to one frame that still lists three per-frame groups
    real = {"liver.dcm": "no-matching-image", "rtstruct.dcm": "no-matching-image",
            "liver_1frame.dcm": "malformed"}
    for name in real:
        path = get_testdata_file(name)
        if path:
            shutil.copy(path, folder / f"real_{name}")
    slices, got = _load(folder, "lesion", "GTV|lesion|liver|tumor")
    assert len(slices.images) == 4
    reasons = dict(got.report.unmatched_files)
    assert reasons["seg_other.dcm"] == "no-matching-image"
    assert reasons["rs_other.dcm"] == "no-matching-image"
    assert "rs_ok.dcm" not in reasons and got.report.matched_files == 1
    for name, reason in real.items():
        if (folder / f"real_{name}").exists():
            assert reasons[f"real_{name}"] == reason
    counts = got.report.counts()
    assert all(isinstance(v, int) for v in counts.values())
    assert counts["segmentations_no_matching_image"] >= 2


# ----------------------------------------------------------------------------- hostile


def _hostile(tmp_path: Path, edit) -> tuple:  # type: ignore[no-untyped-def]
    folder = tmp_path / "d"
    images = h.ct_series(folder)
    h.write_seg(images, h.lesion_masks(4, 32, 32), tmp_path / "seg.dcm")
    ds = pydicom.dcmread(tmp_path / "seg.dcm")
    edit(ds, images)
    ds.save_as(folder / "seg.dcm")
    return _load(folder, "lesion")


def test_seg_with_a_huge_frame_count_is_refused_before_decoding(tmp_path: Path) -> None:
    def edit(ds, images):  # type: ignore[no-untyped-def]
        ds.NumberOfFrames = 2_000_000_000
    _, got = _hostile(tmp_path, edit)
    assert got.report.unmatched == {"too-large": 1} and got.masks.sum() == 0


def test_seg_frame_count_disagreeing_with_its_references_is_malformed(tmp_path: Path) -> None:
    def edit(ds, images):  # type: ignore[no-untyped-def]
        ds.NumberOfFrames = int(ds.NumberOfFrames) + 1
    _, got = _hostile(tmp_path, edit)
    assert got.report.unmatched == {"malformed": 1}


def test_seg_with_wrong_references_is_unmatched(tmp_path: Path) -> None:
    def edit(ds, images):  # type: ignore[no-untyped-def]
        for item in ds.PerFrameFunctionalGroupsSequence:
            src = item.DerivationImageSequence[0].SourceImageSequence[0]
            src.ReferencedSOPInstanceUID = "1.2.3.999"
    _, got = _hostile(tmp_path, edit)
    assert got.report.unmatched == {"no-matching-image": 1}


def test_seg_pointing_at_a_slice_of_another_size_is_refused(tmp_path: Path) -> None:
    def edit(ds, images):  # type: ignore[no-untyped-def]
        # a 32x32 SEG claiming frames of a 40x40 image: Rows/Columns of the SEG changed
        ds.Rows = ds.Columns = 31
    _, got = _hostile(tmp_path, edit)
    assert set(got.report.unmatched) <= {"malformed", "grid-mismatch"} and got.report.unmatched


def test_rtstruct_with_garbage_contours_is_malformed(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    images = h.ct_series(folder)
    ds = h.write_rtstruct(images, folder / "rs.dcm")
    ds.ROIContourSequence[0].ContourSequence[0].ContourData = [1.0, 2.0]
    ds.save_as(folder / "rs.dcm")
    _, got = _load(folder, "lesion", "GTV")
    assert got.report.unmatched == {"malformed": 1}


def test_data_scan_cli_counts_masks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "d"
    images = h.ct_series(folder)
    h.write_seg(images, h.lesion_masks(4, 32, 32), folder / "seg.dcm")
    h.write_rtstruct(h.ct_series(tmp_path / "x", tag="b"), folder / "rs_other.dcm")
    assert main(["data", "scan", str(folder), "--json", "--image-size", "32"]) == 0
    report = json.loads(capsys.readouterr().out)
    masks = report["masks"]
    assert masks["counts"]["segmentation_files"] == 2
    assert masks["counts"]["segmentations_matched"] == 1
    assert masks["slices_by_label"] == {"Lesion": 2, "Liver": 1}
    assert masks["unmatched_files"] == [{"file": "rs_other.dcm", "reason": "no-matching-image"}]
    assert main(["data", "scan", str(folder), "--image-size", "32"]) == 0
    text = capsys.readouterr().out
    assert "masked slices" in text and "no-matching-image" in text


@pytest.mark.parametrize("dims", [2, 3])
def test_masked_layout_pairs_images_with_their_masks(tmp_path: Path, dims: int) -> None:
    """The "masked" data layout: image + mask tensors, mask pixels on the image's pixels."""
    from client.cache import load_slices
    from client.datasets import build_tensors
    from shared_models import ModelConfig

    folder = tmp_path / "d"
    images = h.ct_series(folder, n=8)
    truth = np.zeros((8, 32, 32, 2), dtype=bool)
    truth[2:6, 8:20, 10:22, 0] = True  # the lesion, on four slices
    h.write_seg(images, truth, folder / "seg.dcm")
    h.ct_series(folder / "unsegmented", n=8, tag="u")  # a series no segmentation covers
    settings = DicomSettings(image_size=32)
    slices = load_slices(folder, settings, tmp_path / "cache")
    masks = segm.load_masks(folder, slices, settings, segm.LabelRule.from_config("lesion"))
    model = ModelConfig(family="dcgan", image_size=32, spatial_dims=dims)
    train, hold = build_tensors(np.asarray(slices.images), slices.meta, "masked", model, 0,
                                masks=masks)
    if dims == 2:
        assert train["image"].shape == (8, 1, 32, 32) and train["mask"].shape == (8, 1, 32, 32)
        rows = np.flatnonzero(masks.covered)  # the segmented series only, in scan order
        by_sop = {ds.SOPInstanceUID: i for i, ds in enumerate(images)}
        for j, r in enumerate(rows):
            i = by_sop[str(slices.meta["sop_uid"][r])]
            np.testing.assert_array_equal(train["mask"][j, 0].numpy(), truth[i, ..., 0])
            np.testing.assert_array_equal(train["image"][j].numpy(), slices.images[r])
    else:
        assert train["image"].shape == (1, 1, 32, 32, 32)
        assert train["mask"].shape == (1, 1, 32, 32, 32)
        assert 0 < float(train["mask"].mean()) < 0.2
        assert set(train["mask"].unique().tolist()) <= {0.0, 1.0}


def test_a_one_segment_seg_keeps_its_segment_in_the_shared_groups(tmp_path: Path) -> None:
    """highdicom writes a one-segment SEG's SegmentIdentificationSequence into the shared
    functional groups: still read, frame by frame."""
    from fedsynth.mask_demo import write_seg

    images = h.ct_series(tmp_path / "d")
    truth = h.lesion_masks(4, 32, 32)[..., :1]
    write_seg(images, truth, tmp_path / "d" / "seg.dcm", ("lesion",))
    ds = pydicom.dcmread(tmp_path / "d" / "seg.dcm")
    assert "SegmentIdentificationSequence" in ds.SharedFunctionalGroupsSequence[0]
    slices, got = _load(tmp_path / "d", "lesion")
    rows = _rows_by_sop(slices)
    for i, ds in enumerate(images):
        np.testing.assert_array_equal(got.masks[rows[ds.SOPInstanceUID], 0], truth[i, ..., 0])


def test_rtstruct_with_too_many_contours_is_refused_within_the_budget(tmp_path: Path) -> None:
    """Rasterising is bounded by the decode budget: 200 contours on 32x32 slices are 204800
    pixels, over a 0.1 MB budget (104857 bytes), so the structure set is too large."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    folder = tmp_path / "d"
    images = h.ct_series(folder)
    ds = h.write_rtstruct(images, folder / "rs.dcm")
    c0 = ds.ROIContourSequence[0].ContourSequence[0]
    many = Sequence()
    for _ in range(200):
        c = Dataset()
        c.ContourGeometricType, c.NumberOfContourPoints = "CLOSED_PLANAR", c0.NumberOfContourPoints
        c.ContourData, c.ContourImageSequence = c0.ContourData, c0.ContourImageSequence
        many.append(c)
    ds.ROIContourSequence[0].ContourSequence = many
    ds.save_as(folder / "rs.dcm")
    settings = DicomSettings(image_size=SIZE, max_decoded_mb=0.1)
    slices = scan_folder(folder, settings)
    got = segm.load_masks(folder, slices, settings, segm.LabelRule.from_config("lesion", "GTV"))
    assert got.report.unmatched == {"too-large": 1} and got.masks.sum() == 0
    _, fine = _load(folder, "lesion", "GTV")  # the default budget: read
    assert fine.report.matched_files == 1


@pytest.mark.parametrize("attack", ["one-huge-contour", "many-unmatched-contours"])
def test_hostile_rtstruct_cannot_hold_the_cpu(tmp_path: Path, attack: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Filling costs vertices x bounding box; matching an unreferenced contour costs a plane test
    per slice. A contour of 30,000 points (a 10,000-point one took 1 s on 256x256), or a
    structure set of contours that match no slice, is refused as too-large within seconds."""
    import time

    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    folder = tmp_path / "d"
    images = h.ct_series(folder)
    ds = h.write_rtstruct(images, folder / "rs.dcm")
    c0 = ds.ROIContourSequence[0].ContourSequence[0]
    if attack == "one-huge-contour":
        pts = np.asarray(c0.ContourData, dtype=float).reshape(-1, 3)
        ring = np.repeat(pts, 30_000 // len(pts) + 1, axis=0)[:30_000]
        c0.ContourData, c0.NumberOfContourPoints = [f"{v:.3f}" for v in ring.ravel()], len(ring)
    else:  # far off every slice's plane, no image reference: each is tested against every slice
        monkeypatch.setattr(rtstruct, "MAX_PLANE_TESTS", 200)  # the mechanism, at a test's size
        many = Sequence()
        for k in range(rtstruct.MAX_PLANE_TESTS // len(images) + 10):
            c = Dataset()
            c.ContourGeometricType, c.NumberOfContourPoints = "CLOSED_PLANAR", 3
            c.ContourData = [0.0, 0.0, 5000.0 + k, 1.0, 0.0, 5000.0 + k, 0.0, 1.0, 5000.0 + k]
            many.append(c)
        ds.ROIContourSequence[0].ContourSequence = many
    ds.save_as(folder / "rs.dcm")
    t0 = time.monotonic()
    _, got = _load(folder, "lesion", "GTV")
    assert got.report.unmatched == {"too-large": 1} and got.masks.sum() == 0
    assert time.monotonic() - t0 < 60
