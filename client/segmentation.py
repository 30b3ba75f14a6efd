"""Segmentations at the hospital: DICOM SEG and RT structure sets turned into masks on the slices.

The scan (:func:`client.dicom.scan_folder`) skips segmentation objects as non-image objects (a
mask must never be trained on as an image) and notes their files in
``ScanReport.segmentation_files``. :func:`load_masks` reads those files and places their masks on
the scanned slices:

- **DICOM SEG** through ``highdicom`` (``Segmentation.from_dataset``): each frame's source
  image is its ``SourceImageSequence`` reference (SOP Instance UID, and frame number for a
  multi-frame source), so a mask lands on exactly the slice it was drawn on; a fractional SEG
  is thresholded at one half.
- **RTSTRUCT**: each closed planar contour is a polygon in patient coordinates (mm). It is matched
  to its slice by the contour's ``ContourImageSequence`` reference, else by the structure set's
  frame of reference and the plane the points lie in, and rasterised onto that slice's own grid:
  a point ``p`` has column ``(p - IPP) . row_cosine / PixelSpacing[1]`` and row
  ``(p - IPP) . column_cosine / PixelSpacing[0]`` (ImagePositionPatient is the centre of the first
  pixel), and ``skimage.draw.polygon`` fills every pixel whose centre lies inside or on the
  polygon. ``rt-utils`` does the same job but pulls in OpenCV (``opencv-python``, a large binary
  wheel) for ``cv2.fillPoly``, which rounds the vertices to whole pixels first and needs the whole
  series loaded as pydicom datasets; scikit-image is already a dependency, keeps the sub-pixel
  vertices, and lets the image headers be read with the scanner's bounded reader.
  ``CLOSEDPLANAR_XOR`` contours of one ROI on one slice combine by exclusive or (holes), plain
  ``CLOSED_PLANAR`` ones by union; points and open contours enclose no area and are ignored.

Masks then follow the image's own preprocessing (aspect-keeping resize, thresholded at one half,
centre padding), so mask pixel (r, c) is image pixel (r, c) of the cached slice.

Which segments are which label is the run's choice (``DataConfig.mask_labels``): label k's
pattern (default: its name; ``mask_label_patterns`` overrides) is searched, case-insensitively,
in a segment's label, description and code (``SegmentLabel``, ``SegmentDescription``, the
segmented property type's code meaning and ``scheme:value``; for RTSTRUCT the ROI name and
description and the observation's label and identification code). A segment goes to the first
label whose pattern it matches.

A segmentation that cannot be used is never fatal: it is counted under one reason of
:data:`UNMATCHED_REASONS` (``fedsynth data scan`` lists them). Hostile files are refused before
any decode: the scanner's file-size limit and decoded-pixel budget (``max-decoded-mb``) hold
for the SEG's frames, and a frame count that disagrees with its per-frame references is malformed;
an RTSTRUCT may rasterise at most that budget's worth of slice pixels over all its contours.
Everything here stays at the hospital; only :meth:`MaskReport.counts` (integers under fixed keys)
is fit for metrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset

from . import dicom
from .rtstruct import read_rtstruct
from .seg_labels import (GRID_MISMATCH, MALFORMED, NO_MATCHING_IMAGE, NO_WANTED_LABEL,  # noqa: F401
                         TOO_LARGE, UNMATCHED_REASONS, UNREADABLE, LabelRule, code_texts,
                         first_item, open_rule, segmentation_kind)
from .slice_index import SliceIndex

log = logging.getLogger(__name__)


@dataclass
class MaskReport:
    """What the segmentation files gave; ``unmatched_files`` and ``labels_found`` stay local."""

    segmentation_files: int = 0
    matched_files: int = 0
    masked_slices: int = 0
    slices_by_label: dict[str, int] = field(default_factory=dict)
    unmatched: dict[str, int] = field(default_factory=dict)
    unmatched_files: list[tuple[str, str]] = field(default_factory=list)

    def refuse(self, rel: str, reason: str) -> None:
        self.unmatched[reason] = self.unmatched.get(reason, 0) + 1
        self.unmatched_files.append((rel, reason))

    def summary(self) -> str:
        line = (f"{self.masked_slices} masked slices from {self.matched_files} of "
                f"{self.segmentation_files} segmentation files")
        if self.slices_by_label:
            line += " (" + ", ".join(f"{k} {v}" for k, v in self.slices_by_label.items()) + ")"
        if self.unmatched:
            line += "; unmatched: " + ", ".join(f"{r} {n}" for r, n in sorted(self.unmatched.items()))
        return line

    def counts(self) -> dict[str, int]:
        """Integers under fixed keys only (no label text, path or UID)."""
        out = {"segmentation_files": int(self.segmentation_files),
               "segmentations_matched": int(self.matched_files),
               "masked_slices": int(self.masked_slices)}
        for reason in UNMATCHED_REASONS:
            out[f"segmentations_{reason.replace('-', '_')}"] = int(self.unmatched.get(reason, 0))
        return out


@dataclass
class SliceMasks:
    """Masks on the scanned slices: ``masks`` (N, K, S, S) float32 in {0, 1}, channel k = label k;
    ``covered`` (N,) the slices of a series some segmentation covers (their empty channels are
    known empty); ``labels`` the channel names."""

    masks: np.ndarray
    covered: np.ndarray
    labels: tuple[str, ...]
    report: MaskReport



# ----------------------------------------------------------------------------- SEG


def _seg_frame_refs(ds: Dataset) -> list[tuple[int, str, int]]:
    """(segment number, source SOP Instance UID, source frame number) of every SEG frame."""
    n_frames = dicom.header_int(ds, "NumberOfFrames", 1)
    pfg = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(pfg) != n_frames:
        raise ValueError(f"{n_frames} frames but {len(pfg)} per-frame functional groups")
    sfg = ds.get("SharedFunctionalGroupsSequence")
    shared = sfg[0] if sfg else Dataset()

    def group(item: Dataset, keyword: str) -> Dataset:
        """A functional group from the frame's item, else the shared one (a one-segment SEG
        keeps its SegmentIdentificationSequence there)."""
        return (item if keyword in item else shared)[keyword][0]

    refs = []
    for item in pfg:
        segment = int(group(item, "SegmentIdentificationSequence").ReferencedSegmentNumber)
        src = group(item, "DerivationImageSequence").SourceImageSequence[0]
        frames = src.get("ReferencedFrameNumber")
        frame = int(frames if not isinstance(frames, (list, tuple)) and frames is not None
                    else (frames[0] if frames else 1))
        refs.append((segment, str(src.ReferencedSOPInstanceUID), frame))
    return refs


def _read_seg(ds: Dataset, slices: SliceIndex, rule: LabelRule, found: dict[str, int],
              budget: int) -> dict[tuple[int, int], np.ndarray] | str:
    """{(slice row, channel): mask on the source grid}, or an unmatched reason."""
    import highdicom as hd

    try:
        dicom.check_pixel_budget(ds, budget)
    except dicom.Skip as skip:  # too large, or a transfer syntax with no size bound
        return TOO_LARGE if skip.reason == dicom.TOO_LARGE else MALFORMED
    try:
        refs = _seg_frame_refs(ds)
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
        channel: dict[int, int] = {}
        for number in seg.segment_numbers:
            desc = seg.get_segment_description(number)
            texts = [str(desc.segment_label or ""), dicom.header_str(desc, "SegmentDescription"),
                     *code_texts(first_item(desc, "SegmentedPropertyTypeCodeSequence"))]
            k = rule.channel(texts)
            if k is not None:
                channel[number] = k
    except Exception as exc:
        log.debug("SEG refused: %s", exc, exc_info=True)
        return MALFORMED
    matched = {(uid, frame) for _, uid, frame in refs if slices.row(uid, frame) is not None}
    if not matched:
        return NO_MATCHING_IMAGE
    if not channel:
        return NO_WANTED_LABEL
    numbers = sorted(channel)
    # what the read below materialises: every wanted segment on every matched source frame, which
    # can be far more than the SEG's own frames (S segments of one frame each on S slices: S^2)
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if len(numbers) * len(matched) * rows * cols > budget:
        return TOO_LARGE
    by_uid: dict[str, list[int]] = {}
    for uid, frame in matched:  # grouped once: a scan of `matched` per source is quadratic
        by_uid.setdefault(uid, []).append(frame)
    out: dict[tuple[int, int], np.ndarray] = {}
    try:
        for uid in sorted(by_uid):
            frames = sorted(by_uid[uid])
            if slices.frames_of.get(uid, 1) > 1:
                pixels = seg.get_pixels_by_source_frame(
                    uid, frames, segment_numbers=numbers, ignore_spatial_locations=True,
                    assert_missing_frames_are_empty=True, skip_overlap_checks=True)
            else:
                pixels = seg.get_pixels_by_source_instance(
                    [uid], segment_numbers=numbers, ignore_spatial_locations=True,
                    assert_missing_frames_are_empty=True, skip_overlap_checks=True)
            for frame, plane in zip(frames, pixels):
                row = slices.row(uid, frame)
                assert row is not None
                geom = slices.geometry(row)
                shape = geom[4] if geom is not None else None
                if shape is not None and plane.shape[:2] != shape:
                    return GRID_MISMATCH
                for j, number in enumerate(numbers):
                    m = np.asarray(plane[..., j], dtype=np.float32) >= 0.5
                    key = (row, channel[number])
                    out[key] = out[key] | m if key in out else m
    except Exception as exc:
        log.debug("SEG frames refused: %s", exc, exc_info=True)
        return MALFORMED
    for number in numbers:
        name = rule.names[channel[number]]
        found[name] = found.get(name, 0)
    return out


def preprocess_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """(n, rows, cols) masks on the source grid -> (n, size, size) float32 {0, 1}, pixel for
    pixel on :func:`client.dicom.preprocess`'s slices (same resize, thresholded at one half, same
    centre padding)."""
    small = dicom.resize_keep_aspect(masks.astype(np.float32), size) >= 0.5
    padded = dicom.pad_square(small.astype(np.float32) * 2.0 - 1.0, size)[:, 0]
    return (padded > 0).astype(np.float32)


def _segmentation_paths(folder: Path, rels: Sequence[str]) -> dict[str, Path]:
    """The scanner's own safe listing, restricted to ``rels`` (no link out of the folder)."""
    wanted = set(rels)
    return {rel: path for rel, path, problem in dicom.walk_folder(folder)
            if rel in wanted and path is not None and not problem}


def load_masks(folder: Path, slices: dicom.SliceSet, settings: dicom.DicomSettings,
               rule: LabelRule) -> SliceMasks:
    """Masks of the run's labels on ``slices`` (a scan of ``folder``) from its segmentation files.

    ``rule.names`` empty (``fedsynth data scan``): every segment label found is a channel.
    """
    folder = Path(folder)
    rels = list(slices.report.segmentation_files)
    report = MaskReport(segmentation_files=len(rels))
    index = SliceIndex(folder, slices.meta, settings)
    n, size = len(slices.images), int(slices.images.shape[-1]) if len(slices.images) else settings.image_size
    every_label = not rule.names
    found: dict[str, int] = {}
    per_file: list[dict[tuple[int, str], np.ndarray]] = []
    paths = _segmentation_paths(folder, rels)
    for rel in rels:
        path = paths.get(rel)
        if path is None:
            report.refuse(rel, UNREADABLE)
            continue
        try:
            ds, _ = dicom.read_file(path, settings)
        except dicom.Skip as skip:
            report.refuse(rel, TOO_LARGE if skip.reason == dicom.TOO_LARGE else UNREADABLE
                          if skip.reason in (dicom.UNREADABLE, dicom.NOT_A_FILE) else MALFORMED)
            continue
        except Exception:
            report.refuse(rel, MALFORMED)
            continue
        kind = segmentation_kind(ds)
        file_rule = rule
        if every_label:  # every label of this file its own channel (named by its label text)
            file_rule = open_rule(ds, kind)
        if kind == "SEG":
            got = _read_seg(ds, index, file_rule, found, settings.max_decoded_bytes)
        elif kind == "RTSTRUCT":
            got = read_rtstruct(ds, index, file_rule, found, settings.max_decoded_bytes)
        else:
            got = MALFORMED
        if isinstance(got, str):
            report.refuse(rel, got)
            log.info("segmentation %s not used: %s", rel, got)
            continue
        report.matched_files += 1
        per_file.append({(row, file_rule.names[k]): m for (row, k), m in got.items()})
    names = rule.names if not every_label else tuple(sorted({name for d in per_file for _, name in d}))
    masks = np.zeros((n, len(names), size, size), dtype=np.float32)
    covered = np.zeros(n, dtype=bool)
    series = slices.meta["series_uid"]
    for got in per_file:
        for (row, name), m in got.items():
            k = names.index(name)
            masks[row, k] = np.maximum(masks[row, k], preprocess_masks(m[None], size)[0])
            covered |= series == series[row]
    report.masked_slices = int((masks.reshape(n, -1).max(1, initial=0) > 0).sum()) if n else 0
    report.slices_by_label = {name: int((masks[:, k].reshape(n, -1).max(1, initial=0) > 0).sum())
                              for k, name in enumerate(names)}
    log.info("%s: %s", folder.name, report.summary())
    return SliceMasks(masks=masks, covered=covered, labels=names, report=report)
