"""Colour modalities (issue 22 item 5): channels = 3 from the DICOM reader to the export.

Colour DICOM comes from pydicom's own colour test files (tests/harness/colour_helpers.py), read
locally.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from client.cache import cache_key, load_slices
from client.dicom import DicomSettings, scan_folder
from client.dicom.pixels import decode_rgb
from tests.harness.colour_helpers import SAME_BARS, colour_folder, pydicom_file
from fedsynth.export import Provenance, from_stored_rgb, write_dicom
from shared_models import ModelConfig, TrainConfig, get_family
from shared_models.augment import diff_augment, parse_policy
from shared_models.capabilities import COLOUR, check_model, supporting
from tools import needs

PROV = Provenance(family="dcgan", round=1, model={"channels": 3})


def _dciodvfy_errors(path: Path) -> tuple[int, list[str], str]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    return proc.returncode, [x for x in out.splitlines() if x.startswith("Error")], out


def test_rgb_and_ybr_decode_to_the_same_rgb() -> None:
    """RGB, YBR_FULL, YBR_FULL_422 and JPEG (YBR_FULL) of the same bars: one RGB in [-1, 1]."""
    ref = decode_rgb(pydicom.dcmread(pydicom_file("SC_rgb.dcm")))
    assert ref.shape == (1, 100, 100, 3) and ref.min() == -1.0 and ref.max() == 1.0
    assert np.allclose(ref[0, 5, 5], [1, -1, -1])  # the first bar is pure red
    for name in SAME_BARS[1:]:
        if pydicom_file(name) is None:
            continue
        other = decode_rgb(pydicom.dcmread(pydicom_file(name)))
        # YBR -> RGB rounding (8-bit) and the JPEG's loss: a few grey levels of 255
        assert np.abs(other - ref).max() <= 6 / 127.5 and np.abs(other - ref).mean() < 0.01, name
    if pydicom_file("US1_J2KR.dcm") and pydicom_file("US1_UNCR.dcm"):  # lossless J2K (YBR_RCT) vs RGB
        j2k = decode_rgb(pydicom.dcmread(pydicom_file("US1_J2KR.dcm")))
        np.testing.assert_allclose(j2k, decode_rgb(pydicom.dcmread(pydicom_file("US1_UNCR.dcm"))))
    if pydicom_file("OBXXXX1A.dcm"):  # palette colour through its LUT
        pal = decode_rgb(pydicom.dcmread(pydicom_file("OBXXXX1A.dcm")))
        assert pal.shape[-1] == 3 and -1 <= pal.min() and pal.max() <= 1


def test_scan_counts_colour_as_usable_only_for_colour_runs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in SAME_BARS[:3]:
        shutil.copyfile(pydicom_file(name), data / name)
    shutil.copyfile(pydicom_file("MR_small.dcm"), data / "grey.dcm")
    colour = scan_folder(data, DicomSettings(image_size=32, channels=3))
    assert colour.images.shape == (3, 3, 32, 32) and colour.report.slices == 3
    assert colour.report.skipped == {"grey-image": 1}
    # the same bars whatever the encoding
    assert np.abs(colour.images - colour.images[:1]).max() <= 6 / 127.5
    grey = scan_folder(data, DicomSettings(image_size=32))  # today's behaviour: luminance
    assert grey.images.shape == (4, 1, 32, 32) and grey.report.skipped == {}
    # the cache keys on channels: a grey entry is never served to a colour run
    cache = tmp_path / "cache"
    assert cache_key(data, DicomSettings(image_size=32), cache) != cache_key(
        data, DicomSettings(image_size=32, channels=3), cache)
    assert load_slices(data, DicomSettings(image_size=32), cache).images.shape[1] == 1
    assert load_slices(data, DicomSettings(image_size=32, channels=3), cache).images.shape[1] == 3


def test_colour_families_build_and_others_are_refused() -> None:
    assert set(supporting(COLOUR)) >= {"dcgan", "cdcgan", "pix2pix", "maskgan"}
    x = torch.zeros(2, 3, 16, 16)
    for name in ("dcgan", "cdcgan", "pix2pix", "maskgan"):
        cfg = ModelConfig(family=name, image_size=16, width=4, channels=3,
                          num_classes=2 if name == "cdcgan" else 1 if name == "maskgan" else 0)
        family = get_family(name)
        check_model(family, cfg)
        nets = family.build(cfg)
        g = nets["generator"].eval()
        if name == "dcgan":
            assert g(torch.zeros(2, cfg.latent_dim)).shape == x.shape
        elif name == "pix2pix":
            assert g(x).shape == x.shape
        elif name == "maskgan":
            assert g(torch.zeros(2, 2, 16, 16)).shape == x.shape
    for name in ("wgan-gp", "cyclegan", "aae"):
        with pytest.raises(ValueError, match="channels = 3 .colour. is for .*dcgan"):
            check_model(get_family(name), ModelConfig(family=name, channels=3))
    with pytest.raises(ValueError, match="2D"):
        ModelConfig(channels=3, spatial_dims=3)
    from server.run_config import FederationConfig

    with pytest.raises(ValueError, match="not family 'wgan-gp'"):
        FederationConfig(model=ModelConfig(family="wgan-gp", channels=3))


def test_colour_augment_ops() -> None:
    assert parse_policy("translation,color", channels=3) == (
        "translation", "brightness", "saturation", "contrast")
    with pytest.raises(ValueError, match="saturation"):
        parse_policy("saturation")  # grey
    with pytest.raises(ValueError, match="saturation"):
        check_model(get_family("dcgan"), ModelConfig(), TrainConfig(augment="color"))
    check_model(get_family("dcgan"), ModelConfig(channels=3), TrainConfig(augment="color"))
    torch.manual_seed(0)
    grey = torch.rand(4, 1, 8, 8).expand(4, 3, 8, 8).contiguous()  # R = G = B
    assert torch.allclose(diff_augment(grey, ("saturation",)), grey, atol=1e-6)
    x = torch.rand(4, 6, 8, 8, requires_grad=True)  # a pix2pix pair: two RGB images
    y = diff_augment(x, ("saturation",))
    y.sum().backward()
    assert x.grad is not None and y.shape == x.shape
    a, b = y.detach().view(4, 2, 3, 8, 8).unbind(1)  # each image keeps its own pixel means
    xa, xb = x.detach().view(4, 2, 3, 8, 8).unbind(1)
    assert torch.allclose(a.mean(1), xa.mean(1), atol=1e-6)
    assert torch.allclose(b.mean(1), xb.mean(1), atol=1e-6)


@needs("dciodvfy", "dicom3tools")
def test_colour_secondary_capture_passes_dciodvfy(tmp_path: Path) -> None:
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    paths = write_dicom(images, tmp_path, PROV)
    ds = pydicom.dcmread(paths[0])
    assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration) == (
        "RGB", 3, 0)
    np.testing.assert_allclose(from_stored_rgb(ds.pixel_array), images[0], atol=1 / 127)
    # the reader's colour space is the export's: a colour scan reads it back (synthetic: skipped)
    np.testing.assert_allclose(decode_rgb(ds)[0].transpose(2, 0, 1), images[0], atol=1 / 127)
    rc, errors, out = _dciodvfy_errors(paths[0])
    assert rc == 0 and not errors and "SCImage" in out, out


@pytest.mark.slow
@needs("dciodvfy", "dicom3tools")
def test_a_tiny_colour_round_trains_and_exports_colour_sc(tmp_path: Path) -> None:
    from fedsynth.cli import main
    from fedsynth.inprocess import run_inprocess
    from server.federation import FederationConfig

    hospitals = [{"data-dir": str(colour_folder(tmp_path / "data" / f"h{i}", 6, seed=i)),
                  "cache-dir": str(tmp_path / "cache" / f"h{i}"), "device": "cpu",
                  "holdout-every": 3} for i in range(2)]
    cfg = FederationConfig(model=ModelConfig(family="dcgan", image_size=16, width=4, channels=3),
                           train=TrainConfig(local_steps=2, batch_size=2,
                                             augment="translation,color"),
                           run_dir=str(tmp_path / "runs"), run_id="colour", num_samples=2,
                           rounds=1)
    folder, _ = run_inprocess(cfg, hospitals)
    (row,) = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert (row["replied"], row["failed"], row["rejected"]) == (2, 0, 0)
    assert row["train"]["num-examples"] > 0 and len(row["evaluated"]) == 2
    from PIL import Image

    assert Image.open(folder / "samples" / "round-001.png").mode == "RGB"
    out = tmp_path / "export"
    assert main(["sample", str(folder / "checkpoints" / "round-001.npz"), "--n", "2",
                 "--out", str(out), "--format", "dicom"]) == 0
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 2
    ds = pydicom.dcmread(files[0])
    assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration) == (
        "RGB", 3, 0)
    rc, errors, text = _dciodvfy_errors(files[0])
    assert rc == 0 and not errors and "SCImage" in text, text
