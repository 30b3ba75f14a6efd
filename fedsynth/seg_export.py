"""Labelled synthetic data out: a DICOM SEG (highdicom) beside each synthetic image.

``fedsynth sample --format dicom`` of a mask-conditioned model (``maskgan``, or the two-stage
``aae --stage2 maskgan``) writes each synthetic image with :func:`fedsynth.export.write_dicom`
and then, with :func:`write_segs`, one binary Segmentation object of the mask it was drawn
from. The SEG references its image (Referenced Series / Source Image Sequence: the synthetic
image's own UIDs, never a patient's), shares its fake patient and study, and is marked synthetic
the way the image is: a series description starting ``SYNTHETIC - fedsynth``, a content
description saying "SYNTHETIC - not a patient", and the ``FEDSYNTH SYNTHETIC`` private block
(:func:`client.dicom.is_synthetic`), so a hospital scanning a folder of exports never trains
on them, nor reads their masks as its own. Segment k is the run's mask label k.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from client.dicom import SYNTHETIC_PRIVATE_CREATOR
from fedsynth.export import SERIES_PREFIX, Provenance

log = logging.getLogger(__name__)

_PRIVATE_GROUP = 0x0009


def _descriptions(labels: Sequence[str]) -> list:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algo = hd.AlgorithmIdentificationSequence(name="fedsynth", version="1",
                                              family=codes.cid7162.ArtificialIntelligence)
    return [hd.seg.SegmentDescription(
        segment_number=k + 1, segment_label=str(label)[:64],
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algo) for k, label in enumerate(labels)]


def write_segs(image_paths: Sequence[Path], masks: np.ndarray, labels: Sequence[str],
               provenance: Provenance, real_masks: bool = False) -> list[Path]:
    """One SEG per synthetic 2D image file (``masks`` (N, K, H, W) in {0, 1}), written beside
    it as ``<image stem>-seg.dcm``.

    ``real_masks``: the masks are the hospital's own segmentations (maskgan drawing images for
    an input folder's masks): the SEG says so, since the lesion geometry is a patient's, and
    such a pair must be treated as patient data, not as synthetic data."""
    import highdicom as hd

    masks = np.asarray(masks)
    if masks.ndim != 4:
        raise ValueError("labelled DICOM export is 2D only: a synthetic volume is a multi-frame "
                         "Secondary Capture without a frame of reference, which a DICOM SEG "
                         "(highdicom) can reference one frame of only")
    if len(masks) != len(image_paths) or masks.shape[1] != len(labels):
        raise ValueError(f"{len(masks)} masks of {masks.shape[1]} labels for "
                         f"{len(image_paths)} images and labels {list(labels)}")
    descriptions = _descriptions(labels)
    series_uid = generate_uid()
    paths = []
    for i, (path, mask) in enumerate(zip(image_paths, masks)):
        source = pydicom.dcmread(path)
        pixels = np.moveaxis(mask.astype(np.uint8), 0, -1)[None]  # (1 frame, rows, cols, K)
        seg = hd.seg.Segmentation(
            source_images=[source], pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=series_uid,
            series_number=2, sop_instance_uid=generate_uid(), instance_number=i + 1,
            manufacturer="fedsynth", manufacturer_model_name="fedsynth",
            software_versions="fedsynth", device_serial_number="none",
            content_description=("REAL mask from a patient; image synthetic" if real_masks
                                 else "SYNTHETIC - not a patient"),
            content_label="REALMASK" if real_masks else "SYNTHETIC", omit_empty_frames=False,
            series_description=f"{SERIES_PREFIX} mask of {provenance.text()}"[:64])
        seg.PatientOrientation = ""  # type 2C (General Image): the source has no orientation
        block = seg.private_block(_PRIVATE_GROUP, SYNTHETIC_PRIVATE_CREATOR, create=True)
        block.add_new(0x01, "LO", provenance.family[:64])
        block.add_new(0x02, "IS", str(int(provenance.round)))
        block.add_new(0x03, "UT", json.dumps(dict(provenance.model), sort_keys=True))
        block.add_new(0x04, "LO", provenance.checkpoint[:64])
        block.add_new(0x05, "LT", ("REAL segmentation (from the input folder) of the synthetic "
                                   if real_masks else "mask of the synthetic image ")
                      + Path(path).name)
        target = Path(path).with_name(f"{Path(path).stem}-seg.dcm")
        tmp = target.with_suffix(".dcm.tmp")
        seg.save_as(tmp)
        tmp.replace(target)
        paths.append(target)
    log.info("wrote %d synthetic SEG objects beside their images", len(paths))
    return paths
