"""Demo hospitals built only from data that ships in installed packages.

Nothing can be downloaded on the demo/CI machines, so each demo hospital is
assembled from two sources:

1. Multi-contrast MR phantom slices: the 3-D MR Shepp-Logan phantom from
   ``phantominator`` (proton density, T1 and T2 maps) pushed through the
   spin-echo signal equation with each hospital's own scanner settings.  Every
   hospital gets a T1-weighted and a T2-weighted series at the same slice
   positions, i.e. pixel-aligned ground-truth pairs for paired translation.
2. Optionally a few real clinical slices copied from pydicom's test files and
   ``pydicom-data``; each hospital gets a different subset so the federation
   is non-IID in modality and anatomy too, not only in scanner settings.

Layout written by :func:`build_demo_hospitals`::

    out_dir/manifest.json
    out_dir/hospital-1/phantom/T1w/001.dcm ...
    out_dir/hospital-1/phantom/T2w/001.dcm ...
    out_dir/hospital-1/real/001.dcm ...
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from shared_models.phantoms import (  # noqa: F401  (re-exported: the demo's phantoms)
    _Z_RANGE, ScannerProfile, _geometry, _slice_z, _tissue_maps, default_profiles, phantom_pair)

logger = logging.getLogger(__name__)

__all__ = [
    "ScannerProfile",
    "default_profiles",
    "build_demo_hospitals",
    "phantom_pair",
    "MR_IMAGE_STORAGE",
    "CONTRASTS",
    "MANIFEST_NAME",
]

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CONTRASTS: tuple[str, str] = ("T1w", "T2w")
MANIFEST_NAME = "manifest.json"

# The phantom spans [-1, 1] in every axis; map that to a 240 mm head.
_HALF_EXTENT_MM = 120.0
# Stored pixel values use 12 bits; signal 1.0 (fully relaxed M0 = 1) -> 4095.
_MAX_STORED = 4095
_GYROMAGNETIC_MHZ_PER_T = 42.577
# Fixed entropy prefix so UIDs are reproducible for a given seed/hospital.
_UID_NAMESPACE = "fedsynth-demo-v1"
_STUDY_DATE = "20240101"


# Real files per hospital (first that decodes wins within each slot).  Chosen
# so every hospital sees a different modality/anatomy mix (non-IID), and each
# group holds one compressed transfer syntax to exercise the decoders.
_REAL_GROUPS: tuple[tuple[tuple[str, ...], ...], ...] = (
    # CT head: uncompressed small CT + JPEG 2000 lossless CT (CQ500)
    (("CT_small.dcm",), ("693_J2KR.dcm", "693_UNCI.dcm")),
    # MR: small MR + abdominal Siemens MR (pydicom-data)
    (("MR_small.dcm",), ("MR-SIEMENS-DICOM-WithOverlays.dcm", "examples_overlay.dcm")),
    # shoulder MR (JPEG 2000) + pancreas CT (JPEG 2000)
    (("MR2_J2KR.dcm", "MR2_UNCR.dcm"), ("explicit_VR-UN.dcm", "693_UNCI.dcm")),
)
_REAL_MODALITIES = frozenset({"CT", "MR"})


def _uid(*parts: Any) -> str:
    """Deterministic UID so rebuilding with the same seed gives identical files."""
    return generate_uid(entropy_srcs=[_UID_NAMESPACE, *map(str, parts)])


def _to_stored(img: np.ndarray) -> np.ndarray:
    """Float signal -> 12-bit unsigned stored values."""
    return np.clip(np.rint(img * _MAX_STORED), 0, _MAX_STORED).astype(np.uint16)


def _mr_dataset(
    pixels: np.ndarray,
    *,
    profile: ScannerProfile,
    contrast: str,
    slice_index: int,
    seed: int,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
) -> Dataset:
    """A standalone MR Image Storage object for one phantom slice."""
    rows, cols = pixels.shape
    tr = profile.tr_t1w_ms if contrast == "T1w" else profile.tr_t2w_ms
    te = profile.te_t1w_ms if contrast == "T1w" else profile.te_t2w_ms
    fov_mm = 2 * _HALF_EXTENT_MM * profile.fov_scale
    spacing = fov_mm / cols
    z_mm = round(_slice_z(profile, slice_index) * _HALF_EXTENT_MM, 3)
    slice_gap = (_Z_RANGE[1] - _Z_RANGE[0]) * _HALF_EXTENT_MM / max(profile.slices - 1, 1)
    sop_uid = _uid(seed, profile.name, contrast, slice_index)
    series_number = CONTRASTS.index(contrast) + 1

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = _STUDY_DATE
    ds.StudyTime = "090000"
    ds.SeriesTime = f"09{series_number:02d}00"
    ds.ContentTime = ds.SeriesTime
    ds.AccessionNumber = ""
    ds.Modality = "MR"
    ds.Manufacturer = "fedsynth"
    ds.ManufacturerModelName = f"PhantomScanner {profile.field_strength_t:g}T"
    ds.InstitutionName = profile.name
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "PHANTOM HEAD"
    ds.SeriesDescription = f"PHANTOM {contrast} SE"
    ds.PatientName = f"PHANTOM^{profile.name}"
    ds.PatientID = f"PH-{profile.name.upper()}-{seed:04d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "HEAD"
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = f"se2d1_{contrast}"
    ds.SliceThickness = f"{slice_gap:.3f}"
    ds.RepetitionTime = f"{tr:g}"
    ds.EchoTime = f"{te:g}"
    ds.EchoTrainLength = 1
    ds.ImagingFrequency = f"{_GYROMAGNETIC_MHZ_PER_T * profile.field_strength_t:.4f}"
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = f"{profile.field_strength_t:g}"
    ds.SpacingBetweenSlices = f"{slice_gap:.3f}"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = slice_index + 1
    first = -fov_mm / 2 + spacing / 2
    ds.ImagePositionPatient = [f"{first:.4f}", f"{first:.4f}", f"{z_mm:.3f}"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{z_mm:.3f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [f"{spacing:.5f}", f"{spacing:.5f}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 1024
    ds.WindowWidth = 2048
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    return ds


def _write_phantom_series(hospital_dir: Path, profile: ScannerProfile, matrix: int, seed: int, index: int) -> int:
    """Write the paired T1w/T2w series of one hospital; returns slice positions."""
    rng = np.random.default_rng([seed, index, 0x5E])
    study_uid = _uid(seed, profile.name, "study")
    frame_uid = _uid(seed, profile.name, "frame")
    series_uids = {c: _uid(seed, profile.name, "series", c) for c in CONTRASTS}
    dirs = {c: hospital_dir / "phantom" / c for c in CONTRASTS}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for k in range(profile.slices):
        pair = phantom_pair(profile, k, matrix, rng)
        for contrast, img in zip(CONTRASTS, pair):
            ds = _mr_dataset(
                _to_stored(img),
                profile=profile,
                contrast=contrast,
                slice_index=k,
                seed=seed,
                study_uid=study_uid,
                series_uid=series_uids[contrast],
                frame_uid=frame_uid,
            )
            ds.save_as(dirs[contrast] / f"{k + 1:03d}.dcm", enforce_file_format=True)
    return profile.slices


def _usable_real_file(name: str) -> Path | None:
    """Path of a packaged test file if it is a single-frame grey CT/MR that decodes."""
    from pydicom.data import get_testdata_file

    try:
        found = get_testdata_file(name)
    except Exception as exc:  # noqa: BLE001 - data lookup may try the network
        logger.debug("test file %s unavailable: %s", name, exc)
        return None
    if not found:
        return None
    path = Path(str(found))
    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decode failure means skip
        logger.info("skipping %s: does not decode (%s)", name, exc)
        return None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if (
        arr.ndim != 2
        or frames != 1
        or int(ds.get("SamplesPerPixel", 1)) != 1
        or ds.get("Modality") not in _REAL_MODALITIES
    ):
        logger.info("skipping %s: not a single grey CT/MR image", name)
        return None
    return path


def _copy_real_files(hospital_dir: Path, index: int) -> list[str]:
    """Copy this hospital's subset of real clinical slices; returns source names."""
    real_dir = hospital_dir / "real"
    real_dir.mkdir(parents=True, exist_ok=True)
    sources: list[str] = []
    for slot in _REAL_GROUPS[index % len(_REAL_GROUPS)]:
        for name in slot:
            src = _usable_real_file(name)
            if src is None:
                continue
            shutil.copyfile(src, real_dir / f"{len(sources) + 1:03d}.dcm")
            sources.append(name)
            break
        else:
            logger.warning("no usable real file for slot %s", slot)
    return sources


def build_demo_hospitals(
    out_dir: Path,
    n_hospitals: int = 3,
    *,
    seed: int = 0,
    matrix: int = 64,
    include_real: bool = True,
) -> list[Path]:
    """Write ``out_dir/hospital-N`` folders plus ``manifest.json``; returns the folders.

    Existing hospital folders of the same names are replaced, so reruns with
    the same arguments give byte-identical files.
    """
    if matrix < 16:
        raise ValueError("matrix must be >= 16")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    profiles = default_profiles(n_hospitals, seed)
    paths: list[Path] = []
    entries: list[dict[str, Any]] = []
    for i, profile in enumerate(profiles):
        hdir = out_dir / profile.name
        if hdir.exists():
            shutil.rmtree(hdir)
        hdir.mkdir(parents=True)
        n_slices = _write_phantom_series(hdir, profile, matrix, seed, i)
        real = _copy_real_files(hdir, i) if include_real else []
        logger.info(
            "%s: %.2f T, %d phantom slices x %d contrasts, %d real files",
            profile.name, profile.field_strength_t, n_slices, len(CONTRASTS), len(real),
        )
        paths.append(hdir)
        entries.append(
            {
                "name": profile.name,
                "path": profile.name,
                "profile": dataclasses.asdict(profile),
                "contrasts": list(CONTRASTS),
                "phantom_slices": n_slices,
                "phantom_files": n_slices * len(CONTRASTS),
                "real_files": len(real),
                "real_sources": real,
            }
        )
    manifest = {
        "generator": "fedsynth.demo_data",
        "version": 1,
        "seed": seed,
        "matrix": matrix,
        "include_real": include_real,
        "hospitals": entries,
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return paths


# ---------------------------------------------------------------------------- MR and CT sites

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_CT_SITES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("mr-only", ("MR",)), ("ct-only", ("CT",)), ("mr-and-ct", ("MR", "CT")))


def phantom_ct(profile: ScannerProfile, slice_index: int, matrix: int,
               rng: np.random.Generator) -> np.ndarray:
    """A CT-like slice in Hounsfield units of the same phantom anatomy as ``phantom_pair``.

    Air -1000 HU; soft tissue 20..80 HU from the phantom's T1 (grey/white matter, CSF lower);
    the skull ellipse (the phantom's outermost, highest-M0 ring) 700 HU; Gaussian noise of 8 HU.
    A stand-in with the right units and contrast order, not a simulated scanner.
    """
    z = _slice_z(profile, slice_index)
    m0, t1, _t2 = _tissue_maps(int(matrix), round(z, 6), float(profile.field_strength_t))
    hu = np.full(m0.shape, -1000.0)
    tissue = m0 > 0
    t1n = np.clip(t1 / max(float(t1[tissue].max()) if tissue.any() else 1.0, 1e-6), 0, 1)
    hu[tissue] = 80.0 - 70.0 * t1n[tissue]
    hu[m0 >= 0.95 * float(m0.max())] = 700.0 if tissue.any() else -1000.0
    hu = _geometry(hu + 1000.0, profile.fov_scale, profile.rotation_deg) - 1000.0
    return (hu + rng.normal(0.0, 8.0, hu.shape)).astype(np.float32)


def as_ct(ds: Dataset, series_description: str) -> None:
    """Turn a phantom MR slice's header (``_mr_dataset``) into a CT one: CT Image Storage, no MR
    attributes, stored values in HU + 1024 (rescale intercept -1024), a soft-tissue window."""
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.Modality = "CT"
    ds.SeriesDescription = series_description
    ds.ManufacturerModelName = "PhantomCT"
    for keyword in ("ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType",
                    "SequenceName", "RepetitionTime", "EchoTime", "EchoTrainLength",
                    "ImagingFrequency", "ImagedNucleus", "MagneticFieldStrength",
                    "WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.KVP = "120"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400


def _write_ct_series(hospital_dir: Path, profile: ScannerProfile, matrix: int, seed: int,
                     index: int) -> int:
    """A CT series of the phantom (same study, geometry and positions as its MR series)."""
    rng = np.random.default_rng([seed, index, 0xC7])
    study_uid = _uid(seed, profile.name, "study")
    frame_uid = _uid(seed, profile.name, "frame")
    series_uid = _uid(seed, profile.name, "series", "CT")
    folder = hospital_dir / "phantom" / "CT"
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(profile.slices):
        hu = phantom_ct(profile, k, matrix, rng)
        ds = _mr_dataset(np.zeros(hu.shape, np.uint16), profile=profile, contrast="T1w",
                         slice_index=k, seed=seed, study_uid=study_uid, series_uid=series_uid,
                         frame_uid=frame_uid)
        sop_uid = _uid(seed, profile.name, "CT", k)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = sop_uid
        as_ct(ds, "PHANTOM CT")
        ds.SeriesNumber = 3
        stored = np.clip(np.rint(hu + 1024.0), 0, 4095).astype(np.uint16)
        ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
        ds.save_as(folder / f"{k + 1:03d}.dcm", enforce_file_format=True)
    return profile.slices


def build_mr_ct_hospitals(out_dir: Path, *, seed: int = 0, matrix: int = 32,
                          include_real: bool = True) -> list[Path]:
    """Three hospitals for MR -> CT translation: one with only MR, one with only CT, one with
    both (``MR_CT_SITES``): phantom MR (T1w, T2w) and CT series of the same anatomy, plus the
    real CT/MR test slices of pydicom and pydicom-data of that modality."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (profile, (name, modalities)) in enumerate(zip(default_profiles(3, seed),
                                                          MR_CT_SITES)):
        hdir = out_dir / name
        if hdir.exists():
            shutil.rmtree(hdir)
        hdir.mkdir(parents=True)
        if "MR" in modalities:
            _write_phantom_series(hdir, profile, matrix, seed, i)
        if "CT" in modalities:
            _write_ct_series(hdir, profile, matrix, seed, i)
        if include_real:
            for src in _copy_real_files(hdir, i):
                logger.debug("%s: real %s", name, src)
            for f in sorted((hdir / "real").glob("*.dcm")):
                if str(pydicom.dcmread(f, stop_before_pixels=True).get("Modality")) \
                        not in modalities:
                    f.unlink()
        paths.append(hdir)
    return paths
