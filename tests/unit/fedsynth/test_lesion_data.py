"""The labelled lesion data set: classes read by the run's label rule, masks that are the inserted
lesions, DICOM SEG files that reference their images and pass dciodvfy, skipped by the scanner."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

pytest.importorskip("phantominator")
hd = pytest.importorskip("highdicom")

from client.datasets import local_data  # noqa: E402
from client.dicom import NON_IMAGE_OBJECT, DicomSettings, scan_folder  # noqa: E402
from client.settings import HospitalSettings  # noqa: E402
from fedsynth.cli import main  # noqa: E402
from fedsynth.lesion_data import (  # noqa: E402
    CLASSES, LESION_SITES, RUN_DATA_SETTINGS, lesion_slice)
from shared_models.phantoms import default_profiles  # noqa: E402
from shared_models import DataConfig, ModelConfig  # noqa: E402


@pytest.fixture(scope="module")
def lesions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lesions")
    assert main(["data", "make-lesions", str(root / "data"), "--matrix", "32",
                 "--scale", "0.25"]) == 0
    return root / "data"


def test_label_rule_reads_the_classes(lesions: Path, tmp_path: Path) -> None:
    manifest = json.loads((lesions / "manifest.json").read_text())
    data = DataConfig(**RUN_DATA_SETTINGS)
    model = ModelConfig(family="cdcgan", image_size=32, num_classes=3)
    for h in manifest["hospitals"]:
        hospital = HospitalSettings(data_dir=lesions / h["path"], cache_dir=tmp_path / h["name"],
                                    holdout_every=4)
        loaded = local_data(hospital, model, data)
        held = loaded.holdout["label"]
        if held is loaded.train["label"]:  # too few slices to hold any out: evaluated on train
            held = held[:0]
        labels = torch.cat([loaded.train["label"], held]).tolist()
        # every slice labelled (SEG files are no slices), and the class counts are the manifest's
        assert len(labels) == len(h["files"])
        assert {c: labels.count(i) for i, c in enumerate(CLASSES)} == h["class_counts"]
        # the scan order is the file order: slice k has the class of file k
        scan = scan_folder(lesions / h["path"], DicomSettings(image_size=32))
        order = np.argsort(scan.meta["file_index"], kind="stable")
        comments = scan.meta["image_comments"][order]
        assert [str(c).rsplit(": ", 1)[-1] for c in comments] == [f["class"] for f in h["files"]]
    counts = [sum(h["class_counts"].values()) for h in manifest["hospitals"]]
    small = [h for h in manifest["hospitals"] if h["small"]]
    assert len(small) == 1 and sum(small[0]["class_counts"].values()) == min(counts)
    mixes = {tuple(np.array(list(h["class_counts"].values())) / sum(h["class_counts"].values()))
             for h in manifest["hospitals"]}
    assert len(mixes) >= 3  # class imbalance differs between sites
    assert {h["modality"] for h in manifest["hospitals"]} == {"MR", "CT"}


def test_scanner_skips_and_counts_the_seg_objects(lesions: Path) -> None:
    h = json.loads((lesions / "manifest.json").read_text())["hospitals"][0]
    scan = scan_folder(lesions / h["path"], DicomSettings(image_size=32))
    assert scan.report.usable_files == len(h["files"])
    assert scan.report.skipped.get(NON_IMAGE_OBJECT) == len(h["files"])  # one SEG per image
    assert all(rel.endswith("-seg.dcm") for rel, reason in scan.report.skipped_files
               if reason == NON_IMAGE_OBJECT)


def test_seg_masks_are_the_inserted_lesions_on_their_images(lesions: Path) -> None:
    manifest = json.loads((lesions / "manifest.json").read_text())
    for h in manifest["hospitals"]:
        for f in h["files"][:4]:
            image = pydicom.dcmread(lesions / h["path"] / f["file"])
            seg = hd.seg.segread(lesions / h["path"] / f["seg"])
            ref = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
            assert ref.ReferencedSOPInstanceUID == image.SOPInstanceUID
            assert seg.SegmentSequence[0].SegmentLabel == f["class"]
            mask = seg.get_pixels_by_source_instance(
                [image.SOPInstanceUID])[0, :, :, 0]
            assert mask.shape == image.pixel_array.shape and int(mask.sum()) == f["lesion_pixels"]
            assert image.ImageComments.endswith(f["class"])


@pytest.mark.parametrize("site_index", [0, 2])  # an MR and the CT site
def test_mask_is_exactly_where_the_image_changed(site_index: int) -> None:
    site = LESION_SITES[site_index]
    profile = default_profiles(3, 0)[site.archetype]
    rng = np.random.default_rng(3)
    sizes = {}
    for cls in CLASSES * 3:
        sl = lesion_slice(site, profile, cls, 64, rng, real_pool=None)
        changed = sl.image != sl.background
        assert not changed[~sl.mask].any()  # nothing outside the mask moved
        assert changed[sl.mask].mean() > 0.9  # and the lesion fills its mask
        inside = float(sl.image[sl.mask].mean())
        tissue = float(np.median(sl.background[sl.mask]))
        if cls == "cyst":  # dark, homogeneous
            assert inside < tissue
        if cls == "haemangioma":  # bright
            assert inside > tissue
        sizes.setdefault(cls, []).append(int(sl.mask.sum()))
    assert np.mean(sizes["cyst"]) < np.mean(sizes["haemangioma"])


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy (Debian dicom3tools) not on PATH")
def test_seg_and_image_pass_dciodvfy(lesions: Path) -> None:
    hospitals = json.loads((lesions / "manifest.json").read_text())["hospitals"]
    mr, ct = hospitals[0], hospitals[2]
    for h, rel, iod in ((ct, ct["files"][0]["seg"], "Segmentation"),
                        (mr, mr["files"][0]["seg"], "Segmentation"),
                        (ct, ct["files"][0]["file"], "CTImage"),
                        (mr, mr["files"][0]["file"], "MRImage")):
        proc = subprocess.run(["dciodvfy", str(lesions / h["path"] / rel)], capture_output=True,
                              text=True, timeout=60)
        output = proc.stdout + proc.stderr
        errors = [line for line in output.splitlines() if line.startswith("Error")]
        assert not errors, output
        assert iod in output, output


def test_make_lesions_agrees_with_the_run_defaults_and_the_launch_loader(tmp_path: Path) -> None:
    """Issue 24 item 5, through the CLI: the run's default mask-labels finds every SEG that
    make-lesions writes, and the label rule it prints is a launch file's [run] table."""
    from tests.harness.deploy_helpers import run

    from fedsynth.launch_file import load_launch_file
    from server.run_config import from_flat

    made = run(["data", "make-lesions", str(tmp_path / "data"), "--matrix", "32",
                "--scale", "0.05"], tmp_path)
    assert made.returncode == 0, made.stderr
    snippet = made.stdout[made.stdout.index("[run]\n"):]
    launch = tmp_path / "run.toml"
    launch.write_text('[coordinator]\naddress = "127.0.0.1:9"\ninsecure = true\n\n' + snippet
                      + 'family = "cdcgan"\n')
    cfg = from_flat(load_launch_file(launch).run)
    assert cfg.data.class_names == CLASSES and cfg.model.num_classes == 3
    site = tmp_path / "data" / "hospital-1"
    n = len(list(site.rglob("*-seg.dcm")))
    for labels in (DataConfig().mask_labels, ",".join(CLASSES)):  # the default, one per class
        scan = run(["data", "scan", str(site), "--mask-labels", labels], tmp_path)
        assert scan.returncode == 0, scan.stderr
        assert f"masks: {n} masked slices from {n} of {n} segmentation files" in scan.stdout
        assert "no-wanted-label" not in scan.stdout
