"""Real files re-encoded by an independent toolkit (DCMTK) decode to the same pixels.

Lossless syntaxes (JPEG-LS, RLE, JPEG lossless SV1 and process 14, explicit/implicit VR,
big endian, deflate) must give bit-identical modality values. Lossy ones are held to
stated tolerances on the decoded values, relative to the source's value range:

- JPEG-LS near-lossless with NEAR=2: every pixel within 2 stored values (the codec's guarantee);
- JPEG baseline (8-bit RGB ultrasound) and extended (12-bit MR), quality 90: mean absolute
  error below 1 % of the value range and PSNR of at least 35 dB.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from client.dicom import DicomSettings, decode_frames, scan_folder
from tools import skip_unless

LOSSLESS = [
    ("dcmcjpls", [], "MR_small.dcm", "1.2.840.10008.1.2.4.80"),
    ("dcmcjpls", [], "emri_small.dcm", "1.2.840.10008.1.2.4.80"),
    ("dcmcrle", [], "CT_small.dcm", "1.2.840.10008.1.2.5"),
    ("dcmcrle", [], "emri_small.dcm", "1.2.840.10008.1.2.5"),
    ("dcmcjpeg", ["+e1"], "CT_small.dcm", "1.2.840.10008.1.2.4.70"),
    ("dcmcjpeg", ["+el"], "MR_small.dcm", "1.2.840.10008.1.2.4.57"),
    ("dcmconv", ["+te"], "MR_small_implicit.dcm", "1.2.840.10008.1.2.1"),
    ("dcmconv", ["+tb"], "MR_small.dcm", "1.2.840.10008.1.2.2"),
    ("dcmconv", ["+ti"], "emri_small.dcm", "1.2.840.10008.1.2"),
    ("dcmconv", ["+td"], "CT_small.dcm", "1.2.840.10008.1.2.1.99"),
]


def _run(tool: str, args: list[str], src: Path, dst: Path) -> None:
    skip_unless(tool, "dcmtk")
    proc = subprocess.run([tool, *args, str(src), str(dst)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{tool} failed: {proc.stderr}"


@pytest.mark.parametrize(("tool", "args", "name", "tsyntax"), LOSSLESS,
                         ids=[f"{t}{''.join(a)}-{n}" for t, a, n, _ in LOSSLESS])
def test_lossless_reencode_gives_identical_pixels(tmp_path: Path, tool: str, args: list[str],
                                                  name: str, tsyntax: str) -> None:
    src = Path(get_testdata_file(name))
    dst = tmp_path / "site" / f"re_{name}"
    dst.parent.mkdir()
    _run(tool, args, src, dst)
    ds = pydicom.dcmread(dst)
    assert ds.file_meta.TransferSyntaxUID == tsyntax  # the tool really changed the encoding
    np.testing.assert_array_equal(decode_frames(ds), decode_frames(pydicom.dcmread(src)))
    # And the scanner counts it as usable, with the same preprocessed slices as the source.
    shutil.copyfile(src, tmp_path / "site" / name)
    result = scan_folder(tmp_path / "site", DicomSettings(image_size=32))
    assert result.report.skipped == {}
    n = result.images.shape[0] // 2
    by_file = {int(i): k for k, i in enumerate(sorted(set(result.meta["file_index"].tolist())))}
    assert len(by_file) == 2
    first = result.images[result.meta["file_index"] == min(by_file)]
    second = result.images[result.meta["file_index"] == max(by_file)]
    assert first.shape[0] == second.shape[0] == n
    np.testing.assert_array_equal(first, second)


def _psnr(a: np.ndarray, b: np.ndarray, value_range: float) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(value_range**2 / mse)


def test_jpeg_ls_near_lossless_within_max_deviation(tmp_path: Path) -> None:
    src = Path(get_testdata_file("emri_small.dcm"))
    dst = tmp_path / "near.dcm"
    _run("dcmcjpls", ["+en", "+md", "2"], src, dst)
    ds = pydicom.dcmread(dst)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.81"
    diff = np.abs(decode_frames(ds) - decode_frames(pydicom.dcmread(src)))
    assert diff.max() <= 2.0
    assert diff.max() > 0  # really lossy, so the bound is what is being tested


@pytest.mark.parametrize(("args", "name"), [(["+eb"], "US1_UNCR.dcm"), (["+ee"], "emri_small.dcm")],
                         ids=["baseline-8bit-rgb", "extended-12bit"])
def test_lossy_jpeg_within_tolerance(tmp_path: Path, args: list[str], name: str) -> None:
    src = get_testdata_file(name)
    if src is None:
        pytest.skip(f"{name} not in the installed test data")
    dst = tmp_path / "lossy.dcm"
    _run("dcmcjpeg", [*args, "+q", "90"], Path(src), dst)
    ds = pydicom.dcmread(dst)
    assert ds.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51")
    ref = decode_frames(pydicom.dcmread(src))
    got = decode_frames(ds)
    assert got.shape == ref.shape
    value_range = float(ref.max() - ref.min())
    mae = float(np.abs(got - ref).mean())
    assert mae < 0.01 * value_range, (mae, value_range)
    assert _psnr(got, ref, value_range) >= 35.0
    assert mae > 0  # lossy for real
