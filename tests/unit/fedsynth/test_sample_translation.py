"""``fedsynth sample`` on translation and conditional checkpoints (issue 12, item 4).

* a pix2pix / cyclegan checkpoint without ``--input`` ends in one error line (exit 2);
* with ``--input DICOM_DIR`` the folder's domain-A slices (the run's data rules, from the run
  folder's config.json) are read as a hospital reads them and translated A -> B;
* a DICOM translation passes dciodvfy, is marked synthetic, says which input slice it was made
  from, and carries none of the input file's identifying values anywhere in its bytes;
* a PNG translation shows the input beside its translation;
* cdcgan: ``--class NAME`` or an index draws that class.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from client.dicom import DicomSettings, is_synthetic, scan_folder
from fedsynth.cli import main
from fedsynth.generation import generate, load_generator, translate, translation_inputs
from fedsynth.demo_data import build_demo_hospitals
from fedsynth.export import from_stored
from server.run_folder import RunFolder
from shared_models import DataConfig, ModelConfig, encode, get_family
from tools import skip_unless

IDENTITY = {
    "PatientName": "DOE^JANE^QUINTINA",
    "PatientID": "MRN-99173355",
    "AccessionNumber": "ACC5541207",
    "InstitutionName": "Saint Exemplar Infirmary",
    "StudyDate": "19710203",
    "SeriesDate": "19710204",
    "ContentDate": "19710205",
    "AcquisitionDate": "19710206",
    "PatientBirthDate": "19450607",
    "StudyTime": "071122",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "StudyID": "ST-80417",
}
UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


def _checkpoint(root: Path, family: str, data: dict | None = None, round_: int = 3,
                **model: object) -> Path:
    """A run folder ``root`` with a round checkpoint of ``family`` and (optionally) the run's
    config.json, written the way server/federation.py writes them."""
    cfg = ModelConfig(family=family, image_size=32, width=8, latent_dim=16, **model)
    torch.manual_seed(0)
    nets = get_family(family).build(cfg)
    folder = RunFolder(root)
    if data is not None:
        folder.write_config({"model": asdict(cfg), "data": data, "preset": "fedgan",
                             "run_id": root.name})
    return folder.save_checkpoint(round_, encode(nets), {"round": round_, "family": family,
                                                         "model": asdict(cfg)})


@pytest.fixture(scope="module")
def patient_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phantom T1w/T2w slices re-labelled with a (made-up) patient's identity."""
    root = tmp_path_factory.mktemp("input")
    (folder,) = build_demo_hospitals(root, 1, matrix=32, include_real=False)
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        for keyword, value in IDENTITY.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
    return folder


def _identity_values(folder: Path) -> set[str]:
    values = set(IDENTITY.values())
    for path in folder.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        values.update(str(ds[k].value) for k in UID_KEYWORDS if k in ds)
        values.add(str(ds.file_meta.MediaStorageSOPInstanceUID))
    return values


@pytest.mark.parametrize("family", ["pix2pix", "cyclegan"])
def test_translation_without_input_is_one_error_line(tmp_path: Path, family: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path / "run", family)
    assert main(["sample", str(ckpt), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert family in err[0] and "--input" in err[0] and "T1w -> T2w" in err[0]
    assert "Traceback" not in err[0] and not (tmp_path / "o").exists()
    # --class means nothing to a translation model
    assert main(["sample", str(ckpt), "--out", str(tmp_path / "o"), "--class", "T1w"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_translation_reads_domain_a_as_the_hospital_does(tmp_path: Path, patient_dir: Path) -> None:
    ckpt = _checkpoint(tmp_path / "run", "cyclegan", data=asdict(DataConfig()))
    family, nets, meta = load_generator(ckpt)
    cfg, data = meta["_config"], meta["_data"]
    x, notes, total = translation_inputs(patient_dir, cfg, data, 4)
    slices = scan_folder(patient_dir, DicomSettings(image_size=32))
    t1 = np.flatnonzero(np.char.find(slices.meta["series_description"], "T1w") >= 0)
    assert total == len(t1) > 4 and x.shape == (4, 1, 32, 32)
    # evenly spaced through the T1w slices, first and last included, as the scan gives them
    assert notes[0].startswith(f"input slice 1 of {total}") and f"slice {total} of" in notes[-1]
    np.testing.assert_array_equal(x[0], slices.images[t1[0]].reshape(1, 32, 32))
    assert all("modality MR" in n for n in notes)
    out = translate(family, nets, x)
    expected = nets["g_ab"].eval()(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(out, np.clip(expected, -1, 1), atol=1e-5)


@pytest.mark.parametrize("family", ["pix2pix", "cyclegan"])
def test_dicom_translation_names_its_input_but_not_the_patient(
        tmp_path: Path, patient_dir: Path, family: str, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path / "run", family,
                       data={"domain-a": "T2w", "domain-b": "T1w"})  # dashes, as in a launch file
    out = tmp_path / "dcm"
    assert main(["sample", str(ckpt), "--input", str(patient_dir), "--n", "3",
                 "--format", "dicom", "--out", str(out)]) == 0
    assert "translations of 3 of" in capsys.readouterr().out
    files = sorted(out.glob("*.dcm"))
    assert [f.name for f in files] == [f"translation-{i:04d}.dcm" for i in (1, 2, 3)]

    secret = _identity_values(patient_dir)
    assert len(secret) > 40  # every input file's UIDs, not only the chosen slices'
    for path in files:
        raw = path.read_bytes()
        for value in secret:
            assert value.encode() not in raw, (path.name, value)
        assert b"DOE" not in raw and b"Exemplar" not in raw and b"1971" not in raw
        ds = pydicom.dcmread(path)
        assert is_synthetic(ds) and ds.PatientName == "SYNTHETIC^FEDSYNTH"
        assert "SourceImageSequence" not in ds and "ReferencedImageSequence" not in ds
        assert ds.Modality == "OT" and ds.ConversionType == "SYN"
        assert "T2w -> T1w" in ds.SeriesDescription
        assert f"translated from T2w by fedsynth {family} (input slice" in ds.DerivationDescription
        assert "modality MR" in ds.DerivationDescription and "round 3" in ds.DerivationDescription
        assert "input slice" in ds.ImageComments
        assert np.isfinite(from_stored(ds.pixel_array)).all()
    # one synthetic study/series, fresh UIDs
    sets = [pydicom.dcmread(f) for f in files]
    assert len({d.SeriesInstanceUID for d in sets}) == 1 and len({d.SOPInstanceUID for d in sets}) == 3
    # a hospital scanning the outputs never trains on them
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed / "exports")
    shutil.copyfile(next(patient_dir.rglob("*.dcm")), mixed / "real.dcm")
    assert scan_folder(mixed, DicomSettings(image_size=32)).report.skipped == {"synthetic": 3}

    skip_unless("dciodvfy", "dicom3tools")
    proc = subprocess.run(["dciodvfy", str(files[0])], capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert proc.returncode == 0 and not errors and "SCImage" in output, output


def test_png_translation_shows_input_beside_translation(tmp_path: Path, patient_dir: Path) -> None:
    from PIL import Image

    ckpt = _checkpoint(tmp_path / "run", "pix2pix")  # no config.json: DataConfig defaults
    assert main(["sample", str(ckpt), "--input", str(patient_dir), "--n", "2",
                 "--out", str(tmp_path / "png")]) == 0
    pngs = sorted((tmp_path / "png").glob("translation-*.png"))
    assert len(pngs) == 2
    family, nets, meta = load_generator(ckpt)
    x, _, _ = translation_inputs(patient_dir, meta["_config"], meta["_data"], 2)
    y = translate(family, nets, x)
    pixels = np.asarray(Image.open(pngs[0]))
    assert pixels.shape == (2 + 32 + 2, 2 + 2 * (32 + 2))
    to8 = lambda a: np.clip((a + 1) * 127.5, 0, 255).round().astype(np.uint8)  # noqa: E731
    np.testing.assert_array_equal(pixels[2:34, 2:34], to8(x[0, 0]))
    np.testing.assert_array_equal(pixels[2:34, 36:68], to8(y[0, 0]))


def test_input_errors_are_one_line(tmp_path: Path, patient_dir: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path / "run", "cyclegan", data={"domain_a": "FLAIR", "domain_b": "T1w"})
    out = str(tmp_path / "o")
    assert main(["sample", str(ckpt), "--input", str(patient_dir), "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no slice of domain A (FLAIR" in err[0]
    # the folder's own name for domain A fixes it
    assert main(["sample", str(ckpt), "--input", str(patient_dir), "--out", out, "--n", "2",
                 "--input-pattern", "T2w"]) == 0
    assert len(list(Path(out).glob("*.png"))) == 2
    capsys.readouterr()
    assert main(["sample", str(ckpt), "--input", str(tmp_path / "missing"), "--out", out]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    # --input on a generation checkpoint
    gen = _checkpoint(tmp_path / "gen", "dcgan")
    assert main(["sample", str(gen), "--input", str(patient_dir), "--out", out]) == 2
    assert "--input is for translation" in capsys.readouterr().err


def test_cdcgan_class_by_name_or_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path / "run", "cdcgan", data={"classes": "T1w,T2w,FLAIR"},
                       num_classes=3)
    family, nets, meta = load_generator(ckpt)
    cfg = meta["_config"]
    wanted = generate(family, nets, cfg, 3, 0, label=2)
    for name in ("FLAIR", "flair", "2"):
        out = tmp_path / f"dcm-{name}"
        assert main(["sample", str(ckpt), "--n", "3", "--class", name, "--format", "dicom",
                     "--out", str(out)]) == 0
        assert "class FLAIR" in capsys.readouterr().out
        for i, path in enumerate(sorted(out.glob("*.dcm"))):
            ds = pydicom.dcmread(path)
            assert "class FLAIR (label 2)" in ds.DerivationDescription
            np.testing.assert_allclose(from_stored(ds.pixel_array), wanted[i, 0], atol=1 / 2000)
    # default: the classes in turn
    cycled = generate(family, nets, cfg, 3, 0)
    assert not np.allclose(cycled[0], wanted[0])
    assert main(["sample", str(ckpt), "--n", "3", "--format", "dicom",
                 "--out", str(tmp_path / "cycle")]) == 0
    notes = [pydicom.dcmread(p).DerivationDescription
             for p in sorted((tmp_path / "cycle").glob("*.dcm"))]
    assert ["class T1w" in notes[0], "class T2w" in notes[1], "class FLAIR" in notes[2]] == [True] * 3
    capsys.readouterr()
    assert main(["sample", str(ckpt), "--class", "T3w", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "0=T1w, 1=T2w, 2=FLAIR" in err[0]
    assert main(["sample", str(ckpt), "--class", "3", "--out", str(tmp_path / "x")]) == 2
    capsys.readouterr()
    dcgan = _checkpoint(tmp_path / "plain", "dcgan")
    assert main(["sample", str(dcgan), "--class", "T1w", "--out", str(tmp_path / "x")]) == 2
    assert "conditional" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_sample_help_documents_class_and_input(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--class NAME", "--input DICOM_DIR", "--norm-stats", "cdcgan", "cyclegan"):
        assert flag in text
