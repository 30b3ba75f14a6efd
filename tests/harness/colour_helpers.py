"""Colour DICOM for the tests, made from pydicom's own colour test files (never downloaded).

``SC_rgb.dcm`` (RGB), ``SC_ybr_full_uncompressed.dcm`` (YBR_FULL) and
``SC_ybr_full_422_uncompressed.dcm`` (YBR_FULL_422) hold the same 100 x 100 colour bars;
``US1_UNCR.dcm`` / ``US1_J2KR.dcm`` the same ultrasound frame, uncompressed RGB and lossless
JPEG 2000 (YBR_RCT). A hospital folder is made of RGB variants of them (flipped, rolled, each
with its own UIDs), so that a run has a few different colour slices to train on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

SAME_BARS = ("SC_rgb.dcm", "SC_ybr_full_uncompressed.dcm", "SC_ybr_full_422_uncompressed.dcm",
             "SC_rgb_jpeg_dcmtk.dcm")


def pydicom_file(name: str) -> str | None:
    """The path of a pydicom test file if this installation has it locally, else None."""
    return get_testdata_file(name, download=False)


def colour_folder(folder: Path, n: int = 6, seed: int = 0) -> Path:
    """``n`` RGB Secondary Capture files in ``folder``: variants of SC_rgb.dcm's colour bars."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = pydicom.dcmread(pydicom_file("SC_rgb.dcm"))
    pixels = base.pixel_array  # (100, 100, 3) uint8
    for i in range(n):
        ds = base.copy()
        img = np.roll(pixels, int(rng.integers(0, 100)), axis=int(i % 2))
        if i % 3 == 1:
            img = img[:, ::-1]
        noise = rng.integers(-8, 9, img.shape)
        img = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        ds.PixelData = np.ascontiguousarray(img).tobytes()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = generate_uid()
        ds.StudyInstanceUID = generate_uid()
        ds.save_as(folder / f"colour-{i:02d}.dcm", enforce_file_format=True)
    return folder
