"""A labelled lesion data set hospitals could have, built only from data that ships in packages.

Three lesion classes are inserted into MR and CT slices, in the spirit of Frid-Adar et al. (2018)'s
liver lesions (cyst, metastasis, haemangioma), which differ in shape, size, contrast and texture:

============  =====================================  ===========  ===================================
class         shape                                  radius/matrix contrast / texture
============  =====================================  ===========  ===================================
cyst          round, sharp edge                      8-11 %       dark (T1 hypo-intense; CT
                                                                  hypo-dense, -35 HU), homogeneous
metastasis    irregular (radius with harmonics 2-5)  11-15 %      ring-enhancing: bright rim, dark
                                                                  necrotic centre, mottled texture
haemangioma   lobulated (3-5 overlapping discs)      15-20 %      bright, with brighter nodules at
                                                                  the periphery (peripheral nodular
                                                                  enhancement)
============  =====================================  ===========  ===================================

Backgrounds: the phantom head (``shared_models.phantoms``: Shepp-Logan MR through each hospital's
spin-echo settings, or its CT stand-in ``fedsynth.demo_data.phantom_ct``) at a random slice
position, and -- for a quarter of the slices -- the real CT/MR slices of pydicom and
``pydicom-data`` (resized, randomly flipped). A lesion sits inside tissue; its intensity is the local
tissue level times (MR) or plus (CT, in HU) the class's pattern, scaled by the hospital's contrast
(field strength), with the hospital's noise inside it as outside.

Hospitals (``LESION_SITES``): ``hospital-1`` 1.5 T MR, ``hospital-2`` 3 T MR, ``hospital-3`` CT, and
``hospital-4``, a small 0.55 T low-field MR site with few labelled slices; each has its own class
mix (class imbalance) and the scanner profile of ``shared_models.phantoms.default_profiles`` (noise,
field strength and TR/TE, field of view, rotation).

Each slice is written as one DICOM image whose ``ImageComments`` says ``lesion class: <name>``
(the run's label rule, ``run_snippet()``: ``[run] classes = "cyst,metastasis,haemangioma"``,
``class-attribute = "image_comments"``), and its lesion mask as a DICOM SEG (highdicom) that
references the image, beside it (``NNN.dcm`` and ``NNN-seg.dcm``). The segment's label is the class
and its description ``lesion: <class>``, so the run's default ``mask-labels = "lesion"`` takes every
mask as one lesion channel and ``mask-labels = "cyst,metastasis,haemangioma"`` one per class. fedsynth's scanner skips the
SEG objects as non-image objects and counts them. ``manifest.json`` lists every file's class.
Reachable as ``fedsynth data make-lesions OUT_DIR``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom
from scipy import ndimage

from fedsynth.demo_data import _mr_dataset, _uid, _usable_real_file, as_ct
from shared_models.phantoms import (
    _Z_RANGE, ScannerProfile, _geometry, _rician, _spin_echo, _tissue_maps, default_profiles)

log = logging.getLogger(__name__)

__all__ = ["CLASSES", "LESION_SITES", "LesionSite", "LesionSlice", "build_lesion_hospitals",
           "lesion_slice", "insert_lesion", "real_pool", "RUN_DATA_SETTINGS", "CLASS_ATTRIBUTE"]

CLASSES: tuple[str, str, str] = ("cyst", "metastasis", "haemangioma")
CLASS_ATTRIBUTE = "image_comments"  # the client.dicom meta key of ImageComments
RUN_DATA_SETTINGS = {"classes": ",".join(CLASSES), "class_attribute": CLASS_ATTRIBUTE}
SEGMENT_DESCRIPTION = "lesion: {cls}"  # what the default mask-labels ("lesion") finds
COMMENT_PREFIX = "lesion class: "
MANIFEST_NAME = "manifest.json"
SEG_SUFFIX = "-seg.dcm"

# Radius of each class, as a fraction of the matrix (min, max).
_RADIUS = {"cyst": (0.08, 0.11), "metastasis": (0.11, 0.15), "haemangioma": (0.15, 0.20)}
# Intensity change per class in units of the local tissue level (MR) or of 45 HU (CT).
_CT_UNIT_HU = 45.0
_REAL_MR = (("MR_small.dcm",), ("MR2_UNCR.dcm", "MR2_J2KR.dcm"),
            ("MR-SIEMENS-DICOM-WithOverlays.dcm",))
_REAL_CT = (("CT_small.dcm",), ("693_UNCI.dcm", "693_J2KR.dcm"), ("explicit_VR-UN.dcm",))


@dataclass(frozen=True)
class LesionSite:
    """One hospital of the lesion data set: modality, archetype, slice count, class mix."""

    name: str
    modality: str  # "MR" or "CT"
    archetype: int  # index into default_profiles (0: 1.5 T, 1: 3 T, 2: 0.55 T)
    slices: int
    class_weights: tuple[float, float, float]
    contrast: float  # lesion contrast factor (field strength for MR)
    small: bool = False


LESION_SITES: tuple[LesionSite, ...] = (
    LesionSite("hospital-1", "MR", 0, 120, (0.50, 0.30, 0.20), 1.00),
    LesionSite("hospital-2", "MR", 1, 120, (0.20, 0.45, 0.35), 1.15),
    LesionSite("hospital-3", "CT", 0, 120, (0.35, 0.20, 0.45), 1.00),
    LesionSite("hospital-4", "MR", 2, 16, (0.50, 0.30, 0.20), 0.80, small=True),
)


@dataclass
class LesionSlice:
    """One labelled slice: the background before insertion, the image, the lesion mask."""

    cls: str
    background: np.ndarray  # float32, MR signal (1.0 = fully relaxed M0) or CT HU
    image: np.ndarray
    mask: np.ndarray  # bool
    source: str  # "phantom" or the real file's name


# ----------------------------------------------------------------------------- lesions


def _lesion_shape(kind: str, size: int, rng: np.random.Generator, tissue: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(mask, normalised radius rr (0 centre .. 1 edge), cy, cx) of one lesion inside ``tissue``."""
    lo, hi = _RADIUS[kind]
    radius = max(1.5, float(rng.uniform(lo, hi)) * size)
    inner = ndimage.binary_erosion(tissue, iterations=max(1, int(math.ceil(radius * 1.2))))
    candidates = np.argwhere(inner if inner.any() else tissue)
    if len(candidates) == 0:
        candidates = np.argwhere(np.ones_like(tissue))
    cy, cx = candidates[rng.integers(len(candidates))].astype(float)
    yy, xx = np.mgrid[:size, :size].astype(float)
    dy, dx = yy - cy, xx - cx
    dist, theta = np.hypot(dy, dx), np.arctan2(dy, dx)
    if kind == "cyst":
        rr = dist / radius
    elif kind == "metastasis":
        edge = np.ones_like(theta)
        for k in range(2, 6):
            edge += 0.3 / k * rng.uniform(0.5, 1.0) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        rr = dist / (radius * edge)
    else:  # haemangioma: union of overlapping lobes
        rr = dist / radius
        for _ in range(int(rng.integers(3, 6))):
            ang, off = rng.uniform(0, 2 * np.pi), rng.uniform(0.4, 0.8) * radius
            lr = rng.uniform(0.45, 0.7) * radius
            ly, lx = cy + off * math.sin(ang), cx + off * math.cos(ang)
            rr = np.minimum(rr, np.hypot(yy - ly, xx - lx) / lr)
    mask = rr <= 1.0
    if mask.sum() < 3:  # a tiny matrix: at least the centre pixel and its neighbours
        mask = dist <= 1.5
        rr = np.where(mask, dist / 1.5, rr)
    return mask, rr, cy, cx


def insert_lesion(image: np.ndarray, tissue: np.ndarray, kind: str, rng: np.random.Generator, *,
                  modality: str, contrast: float, noise_sigma: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(image with one lesion of class ``kind``, its bool mask); nothing outside the mask changes."""
    if kind not in CLASSES:
        raise ValueError(f"unknown lesion class {kind!r}: one of {CLASSES}")
    size = image.shape[0]
    mask, rr, _, _ = _lesion_shape(kind, size, rng, tissue)
    level = float(np.median(image[tissue])) if tissue.any() else float(np.median(image))
    unit = _CT_UNIT_HU if modality == "CT" else max(level, 1e-3)
    delta = np.zeros_like(image, dtype=np.float64)
    if kind == "cyst":
        delta[:] = -0.75
    elif kind == "metastasis":
        rim = np.clip((rr - 0.55) / 0.3, 0, 1)
        texture = ndimage.gaussian_filter(rng.normal(0, 1, image.shape), 1.0)
        delta = -0.35 + 1.25 * rim + 0.25 * texture / max(float(texture.std()), 1e-6)
    else:
        delta[:] = 0.5
        nodules = np.zeros(image.shape)
        edge = np.argwhere(mask & (rr > 0.7))
        for idx in rng.choice(len(edge), size=min(len(edge), int(rng.integers(4, 8))),
                              replace=False) if len(edge) else []:
            nodules[tuple(edge[idx])] = 1.0
        nodules = ndimage.gaussian_filter(nodules, 0.8)
        delta = delta + 0.9 * nodules / max(float(nodules.max()), 1e-6)
    # lesion intensity: tissue level (not the local anatomy: the lesion replaces it) + pattern
    target = level + contrast * unit * delta
    if kind == "cyst":
        soft = mask.astype(np.float64)  # sharp edge
    else:
        soft = np.clip(ndimage.gaussian_filter(mask.astype(np.float64), 0.6), 0, 1) * mask
    noise = rng.normal(0.0, noise_sigma, image.shape)
    out = image * (1 - soft) + soft * (target + noise)
    if modality == "MR":
        out = np.maximum(out, 0.0)
    out = np.where(mask, out, image)  # nothing outside the mask changes
    return out.astype(np.float32), mask


# ----------------------------------------------------------------------------- backgrounds


def _phantom_background(site: LesionSite, profile: ScannerProfile, matrix: int,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """(image, tissue mask, noise sigma) of the phantom head at a random slice position."""
    z = round(float(rng.choice(np.linspace(*_Z_RANGE, 24))), 6)
    m0, t1, t2 = _tissue_maps(int(matrix), z, float(profile.field_strength_t))
    skull = m0 >= 0.95 * float(m0.max()) if (m0 > 0).any() else np.zeros_like(m0, bool)
    brain = _geometry(((m0 > 0) & ~skull).astype(np.float64), profile.fov_scale,
                      profile.rotation_deg) > 0.5
    brain = ndimage.binary_erosion(brain, iterations=1)
    if site.modality == "CT":
        # fedsynth.demo_data.phantom_ct's HU mapping, at this slice position
        tissue = m0 > 0
        t1n = np.clip(t1 / max(float(t1[tissue].max()) if tissue.any() else 1.0, 1e-6), 0, 1)
        hu = np.full(m0.shape, -1000.0)
        hu[tissue] = 80.0 - 70.0 * t1n[tissue]
        hu[skull] = 700.0
        hu = _geometry(hu + 1000.0, profile.fov_scale, profile.rotation_deg) - 1000.0
        sigma = 8.0
        return (hu + rng.normal(0.0, sigma, hu.shape)).astype(np.float32), brain, sigma
    clean = _geometry(_spin_echo(m0, t1, t2, profile.tr_t1w_ms, profile.te_t1w_ms),
                      profile.fov_scale, profile.rotation_deg)
    img = _rician(clean, profile.noise_sigma, rng).astype(np.float32)
    return img, brain, float(profile.noise_sigma)


def _real_pixels(name_slot: Sequence[str]) -> tuple[np.ndarray, str] | None:
    """Modality-unit pixels (HU for CT) of the first usable packaged file of a slot."""
    for name in name_slot:
        path = _usable_real_file(name)
        if path is None:
            continue
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array.astype(np.float64)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        arr = arr * slope + float(ds.get("RescaleIntercept", 0) or 0)
        return arr, name
    return None


def real_pool(modality: str) -> list[tuple[np.ndarray, str]]:
    """The packaged real slices of ``modality`` ("MR" or "CT") that ``lesion_slice`` may take as
    backgrounds: (modality-unit pixels, file name), one per usable slot."""
    slots = _REAL_CT if modality == "CT" else _REAL_MR
    return [p for p in (_real_pixels(s) for s in slots) if p is not None]


def _real_background(site: LesionSite, profile: ScannerProfile, matrix: int,
                     rng: np.random.Generator, pool: list[tuple[np.ndarray, str]]
                     ) -> tuple[np.ndarray, np.ndarray, float, str]:
    """(image, tissue mask, noise sigma, source) from a packaged real slice, resized, flipped."""
    arr, name = pool[int(rng.integers(len(pool)))]
    img = ndimage.zoom(arr, (matrix / arr.shape[0], matrix / arr.shape[1]), order=1)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    if site.modality == "CT":
        tissue = (img > -100) & (img < 150)
        sigma = 8.0
        img = img + rng.normal(0, sigma, img.shape)
    else:
        scale = max(float(np.percentile(img, 99.5)), 1e-6)
        img = np.clip(img / scale, 0, 1.2) * 0.6  # the phantom's signal range
        smooth = ndimage.gaussian_filter(img, 1.0)
        tissue = smooth > 0.25 * float(np.percentile(smooth, 99))
        sigma = float(profile.noise_sigma)
        img = _rician(img, sigma, rng)
    tissue = ndimage.binary_erosion(tissue, iterations=1)
    return np.ascontiguousarray(img, dtype=np.float32), tissue, sigma, name


def lesion_slice(site: LesionSite, profile: ScannerProfile, cls: str, matrix: int,
                 rng: np.random.Generator, real_pool: list[tuple[np.ndarray, str]] | None = None,
                 real_fraction: float = 0.25) -> LesionSlice:
    """One labelled slice of ``site``: a background (phantom, or a real slice from ``real_pool``
    with probability ``real_fraction``) and one lesion of class ``cls`` inserted into its tissue."""
    if real_pool and rng.random() < real_fraction:
        bg, tissue, sigma, source = _real_background(site, profile, matrix, rng, real_pool)
    else:
        bg, tissue, sigma = _phantom_background(site, profile, matrix, rng)
        source = "phantom"
    image, mask = insert_lesion(bg, tissue, cls, rng, modality=site.modality,
                                contrast=site.contrast, noise_sigma=sigma)
    return LesionSlice(cls=cls, background=bg, image=image, mask=mask, source=source)


def class_counts(site: LesionSite, slices: int | None = None) -> list[int]:
    """Slices per class: the site's mix, at least 2 of each class (train and held out)."""
    n = site.slices if slices is None else slices
    w = np.asarray(site.class_weights) / sum(site.class_weights)
    counts = np.maximum(2, np.floor(w * n)).astype(int)
    while counts.sum() < n:
        counts[int(np.argmax(w * n - counts))] += 1
    return counts.tolist()


# ----------------------------------------------------------------------------- DICOM


def _image_dataset(sl: LesionSlice, site: LesionSite, profile: ScannerProfile, index: int,
                   seed: int, study_uid: str, series_uid: str, frame_uid: str) -> pydicom.Dataset:
    if site.modality == "CT":
        stored = np.clip(np.rint(sl.image + 1024.0), 0, 4095).astype(np.uint16)
    else:
        stored = np.clip(np.rint(sl.image * 4095), 0, 4095).astype(np.uint16)
    ds = _mr_dataset(stored, profile=profile, contrast="T1w", slice_index=0, seed=seed,
                     study_uid=study_uid, series_uid=series_uid, frame_uid=frame_uid)
    sop_uid = _uid(seed, site.name, "lesion", index)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = index + 1
    z = f"{2.0 * index:.3f}"
    ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], z]
    ds.SliceLocation = z
    ds.StudyDescription = "LESION PHANTOM"
    ds.ImageComments = COMMENT_PREFIX + sl.cls
    ds.DerivationDescription = f"lesion inserted into {sl.source}"
    if site.modality == "CT":
        as_ct(ds, "LESION CT")
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.AcquisitionNumber = 1
    else:
        ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
        ds.SeriesDescription = "LESION T1w SE"
    ds.BodyPartExamined = "HEAD"
    return ds


def _segment_code(cls: str):  # noqa: ANN202 - pydicom Code
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    return {"cyst": codes.SCT.Cyst,
            "metastasis": Code("14799000", "SCT", "Neoplasm, metastatic"),
            "haemangioma": codes.SCT.Hemangioma}[cls]


def seg_dataset(image: pydicom.Dataset, mask: np.ndarray, cls: str, seed: int, site: str,
                index: int) -> pydicom.Dataset:
    """A DICOM SEG (binary, one segment labelled with the class) of ``mask`` on ``image``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name="fedsynth lesion insertion", version="1",
        family=codes.cid7162.ArtificialIntelligence)
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=cls,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=_segment_code(cls),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    description.SegmentDescription = SEGMENT_DESCRIPTION.format(cls=cls)
    return hd.seg.Segmentation(
        source_images=[image], pixel_array=mask[None].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=_uid(seed, site, "seg-series"), series_number=100,
        sop_instance_uid=_uid(seed, site, "seg", index), instance_number=index + 1,
        manufacturer="fedsynth", manufacturer_model_name="fedsynth.lesion_data",
        software_versions="1", device_serial_number="0", series_description="LESION MASKS",
        content_label="LESION", omit_empty_frames=False)


def build_lesion_hospitals(out_dir: Path, *, seed: int = 0, matrix: int = 64,
                           sites: Sequence[LesionSite] = LESION_SITES, scale: float = 1.0,
                           include_real: bool = True, write_seg: bool = True) -> list[Path]:
    """Write ``out_dir/<site>/lesions/NNN.dcm`` (+ ``NNN-seg.dcm``) and ``manifest.json``.

    ``scale`` multiplies every site's slice count (at least 2 per class); ``include_real`` mixes in
    the packaged real slices. The same arguments give identical files.
    """
    if matrix < 16:
        raise ValueError("matrix must be >= 16")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    profiles = default_profiles(3, seed)
    pools = {m: real_pool(m) if include_real else [] for m in ("MR", "CT")}
    entries, paths = [], []
    for i, site in enumerate(sites):
        profile = ScannerProfile(**{**asdict(profiles[site.archetype % len(profiles)]),
                                    "name": site.name})
        rng = np.random.default_rng([seed, i, 0x1E5])
        counts = class_counts(site, max(6, int(round(site.slices * scale))))
        labels = [c for c, n in zip(CLASSES, counts) for _ in range(n)]
        labels = [labels[j] for j in rng.permutation(len(labels))]
        hdir = out_dir / site.name
        if hdir.exists():
            shutil.rmtree(hdir)
        folder = hdir / "lesions"
        folder.mkdir(parents=True)
        study_uid, frame_uid = _uid(seed, site.name, "study"), _uid(seed, site.name, "frame")
        series_uid = _uid(seed, site.name, "lesion-series")
        files = []
        for k, cls in enumerate(labels):
            sl = lesion_slice(site, profile, cls, matrix, rng, pools[site.modality])
            ds = _image_dataset(sl, site, profile, k, seed, study_uid, series_uid, frame_uid)
            name = f"{k + 1:03d}.dcm"
            ds.save_as(folder / name, enforce_file_format=True)
            entry = {"file": f"lesions/{name}", "class": cls, "source": sl.source,
                     "lesion_pixels": int(sl.mask.sum())}
            if write_seg:
                seg = seg_dataset(ds, sl.mask, cls, seed, site.name, k)
                seg.save_as(folder / f"{k + 1:03d}{SEG_SUFFIX}", enforce_file_format=True)
                entry["seg"] = f"lesions/{k + 1:03d}{SEG_SUFFIX}"
            files.append(entry)
        log.info("%s: %s %d slices %s", site.name, site.modality, len(labels),
                 dict(zip(CLASSES, counts)))
        paths.append(hdir)
        entries.append({"name": site.name, "path": site.name, "modality": site.modality,
                        "small": site.small, "profile": asdict(profile), "contrast": site.contrast,
                        "class_counts": dict(zip(CLASSES, counts)), "files": files})
    manifest = {"generator": "fedsynth.lesion_data", "version": 1, "seed": seed,
                "matrix": matrix, "classes": list(CLASSES), "run_data_settings": RUN_DATA_SETTINGS,
                "hospitals": entries}
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return paths


def run_snippet() -> str:
    """The data set's label rule as the ``[run]`` lines ``fedsynth launch`` accepts (keys from
    ``server.run_config``, so the printed snippet cannot drift from what the loader knows)."""
    from server.run_config import SETTINGS, toml_value

    key = {s.path: s.key for s in SETTINGS}
    lines = ["[run]", *(f"{key[('data', k)]} = {toml_value(v)}"
                        for k, v in RUN_DATA_SETTINGS.items())]
    return "\n".join([*lines, '# maskgan / aae: the default mask-labels = "lesion" takes every SEG; '
                       'mask-labels = "' + ",".join(CLASSES) + '" gives one channel per class'])


def small_site(sites: Sequence[LesionSite] = LESION_SITES) -> int:
    """Index of the small hospital."""
    return next(i for i, s in enumerate(sites) if s.small)


def manifest(out_dir: Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / MANIFEST_NAME).read_text())
