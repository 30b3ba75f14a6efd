"""``fedsynth data scan`` and ``fedsynth sample`` end to end through the real CLI entry point."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from fedsynth.cli import main
from fedsynth.generation import load_generator


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    folder = tmp_path / "site"
    (folder / "ct").mkdir(parents=True)
    (folder / "mr").mkdir()
    shutil.copyfile(get_testdata_file("CT_small.dcm"), folder / "ct" / "a.dcm")
    shutil.copyfile(get_testdata_file("MR_small.dcm"), folder / "mr" / "b.dcm")
    shutil.copyfile(get_testdata_file("emri_small.dcm"), folder / "mr" / "c.dcm")
    shutil.copyfile(get_testdata_file("test-SR.dcm"), folder / "report.dcm")
    (folder / "notes.txt").write_text("hello")
    return folder


def test_scan_json_groups_and_reasons(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "scan", str(site), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["usable_files"] == 3 and out["slices"] == 12
    assert out["usable_by_modality"] == {"CT": 1, "MR": 11}
    assert out["usable_by_size"] == {"128x128": 1, "64x64": 11}
    assert out["skipped"] == {"non-image-object": 1, "not-dicom": 1}
    assert {(f["file"], f["reason"]) for f in out["skipped_files"]} == {
        ("report.dcm", "non-image-object"), ("notes.txt", "not-dicom")}
    ct_study = pydicom.dcmread(site / "ct" / "a.dcm", stop_before_pixels=True).StudyInstanceUID
    study_uids = {s["study_uid"] for s in out["studies"]}
    assert ct_study in study_uids
    n_series = sum(len(s["series"]) for s in out["studies"])
    assert out["counts"]["series"] == n_series == 3
    assert out["counts"]["skipped_not_dicom"] == 1


def test_scan_text_output(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "scan", str(site), "--modality", "MR"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("site: 11 slices from 2 files (MR 11); skipped 3:")
    assert "filtered-out" in text and "notes.txt" in text and "64x64" in text


def test_scan_nothing_usable_exits_2_with_one_line(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(b"")
    (folder / "b.txt").write_text("x")
    assert main(["data", "scan", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "no usable DICOM image" in err[0] and "empty-file 1" in err[0] and "not-dicom 1" in err[0]
    assert main(["data", "scan", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _checkpoint(tmp_path: Path, round_: int = 4) -> Path:
    from server.run_folder import RunFolder
    from shared_models import ModelConfig, encode, get_family

    cfg = ModelConfig(image_size=32, latent_dim=16, width=8)
    nets = get_family("dcgan").build(cfg)
    from dataclasses import asdict

    return RunFolder(tmp_path / "run").save_checkpoint(
        round_, encode(nets), {"round": round_, "family": "dcgan", "model": asdict(cfg)})


def test_sample_png_and_dicom(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path)
    assert main(["sample", str(ckpt), "--n", "3", "--out", str(tmp_path / "png")]) == 0
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert len(pngs) == 3
    from PIL import Image

    assert Image.open(pngs[0]).size == (32, 32)

    assert main(["sample", str(ckpt), "--n", "2", "--out", str(tmp_path / "dcm"),
                 "--format", "dicom"]) == 0
    files = sorted((tmp_path / "dcm").glob("*.dcm"))
    assert len(files) == 2
    ds = pydicom.dcmread(files[0])
    assert ds.SeriesDescription.startswith("SYNTHETIC - fedsynth dcgan round 4")
    assert (ds.Rows, ds.Columns) == (32, 32)
    # The DICOM pixels are the generator's output (up to 12-bit quantisation).
    family, nets, meta = load_generator(ckpt)
    from fedsynth.generation import generate

    expected = generate(family, nets, meta["_config"], 2, 0)
    from fedsynth.export import from_stored

    np.testing.assert_allclose(from_stored(ds.pixel_array), expected[0, 0], atol=1 / 2000)


def test_sample_bad_checkpoint_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip at all")
    assert main(["sample", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.npz" in err[0] and "not a fedsynth checkpoint" in err[0]

    assert main(["sample", str(tmp_path / "none.npz"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err

    # A real checkpoint whose meta names another model size: shapes do not fit.
    ckpt = _checkpoint(tmp_path)
    from server.run_folder import RunFolder, load_checkpoint

    arrays, meta = load_checkpoint(ckpt)
    meta["model"]["width"] = 16
    wrong = RunFolder(tmp_path / "run2").save_checkpoint(1, arrays, meta)
    assert main(["sample", str(wrong), "--out", str(tmp_path / "o")]) == 2
    assert "does not fit its model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
