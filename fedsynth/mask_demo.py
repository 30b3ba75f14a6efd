"""Phantom lesion masks for demos and benches: a DICOM SEG (highdicom) beside each phantom series.

The demo hospitals (``fedsynth.demo_data``) hold phantom MR/CT series and no segmentation; the
mask-conditioned families need some. :func:`add_phantom_segs` writes, beside each single-frame
image series under a folder, one binary SEG whose segment (named ``label``) is the brightest
tenth of each slice's foreground after a Gaussian blur (blobs, not noise speckle) -- a stand-in lesion whose image follows its mask, enough to
show the pipeline end to end (not a clinical lesion model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_seg(images: list, masks: np.ndarray, path: Path, labels: tuple[str, ...]) -> None:
    """A binary DICOM SEG of ``images`` (pydicom datasets of one series) with ``masks``
    (n, rows, cols, len(labels)) written by highdicom (empty frames omitted)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    algo = hd.AlgorithmIdentificationSequence(name="fedsynth-phantom", version="1",
                                              family=codes.cid7162.ArtificialIntelligence)
    descs = [hd.seg.SegmentDescription(
        segment_number=k + 1, segment_label=name,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algo) for k, name in enumerate(labels)]
    seg = hd.seg.Segmentation(
        source_images=images, pixel_array=masks.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descs,
        series_instance_uid=generate_uid(), series_number=100, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer="fedsynth", manufacturer_model_name="phantom",
        software_versions="0", device_serial_number="0")
    seg.save_as(path)


def add_phantom_segs(folder: Path, label: str = "lesion") -> list[Path]:
    """One SEG per image series under ``folder`` (segment ``label``); returns the files."""
    import pydicom
    from scipy.ndimage import gaussian_filter

    series: dict[str, list] = {}
    for path in sorted(Path(folder).rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds or ds.get("Modality") in ("SEG", "RTSTRUCT"):
            continue
        if int(ds.get("NumberOfFrames", 1) or 1) != 1 or "ImagePositionPatient" not in ds:
            continue
        series.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    out = []
    for uid, items in sorted(series.items()):
        images = [ds for _, ds in items]
        pix = np.stack([ds.pixel_array.astype(np.float32) for ds in images])
        masks = np.zeros(pix.shape + (1,), dtype=bool)
        for i, p in enumerate(pix):
            smooth = gaussian_filter(p, sigma=max(1.0, p.shape[0] / 24))  # blobs, not speckle
            fg = smooth[p > np.percentile(p, 20)]
            if fg.size:
                masks[i, ..., 0] = smooth >= np.percentile(fg, 90)
        if not masks.any():
            continue
        target = items[0][0].parent / f"seg-{uid[-8:]}.dcm"
        write_seg(images, masks, target, (label,))
        out.append(target)
    return out
