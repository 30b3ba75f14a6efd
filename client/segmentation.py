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

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from pydicom.dataset import Dataset

from shared_models.patterns import check_pattern, compile_pattern, literal

from . import dicom

log = logging.getLogger(__name__)

# Why a segmentation file gives no mask (fixed short strings: keys of MaskReport.unmatched).
NO_MATCHING_IMAGE = "no-matching-image"  # references no slice of the scan
NO_WANTED_LABEL = "no-wanted-label"  # none of its segments is one of the run's labels
GRID_MISMATCH = "grid-mismatch"  # SEG frames of another size than their source image
MALFORMED = "malformed"  # highdicom / the structure set's references refuse it
TOO_LARGE = dicom.TOO_LARGE  # over the decoded-pixel budget or the file-size limit
UNREADABLE = dicom.UNREADABLE  # cannot be read again
UNMATCHED_REASONS = (NO_MATCHING_IMAGE, NO_WANTED_LABEL, GRID_MISMATCH, MALFORMED, TOO_LARGE,
                     UNREADABLE)

PLANE_TOLERANCE_MM = 0.5  # an RTSTRUCT contour lies in a slice's plane when this close to it


def segmentation_kind(ds: Dataset) -> str | None:
    """``"SEG"``, ``"RTSTRUCT"`` or None for any other object."""
    sop = dicom.header_str(ds, "SOPClassUID")
    modality = dicom.header_str(ds, "Modality").upper()
    if sop == dicom.SEG_SOP_CLASS or (modality == "SEG" and not sop):
        return "SEG"
    if sop == dicom.RTSTRUCT_SOP_CLASS or (modality == "RTSTRUCT" and not sop):
        return "RTSTRUCT"
    return None


# ----------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class LabelRule:
    """The run's mask labels in channel order, each with its pattern (regex, case-insensitive).

    ``names`` empty: every distinct segment label is its own channel (``fedsynth data scan``)."""

    names: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, labels: str, patterns: str = "") -> "LabelRule":
        names = tuple(x.strip() for x in labels.split(",") if x.strip())
        pats = tuple(patterns.split(";")) if patterns else ()
        if pats and len(pats) != len(names):
            raise ValueError(f"mask label patterns has {len(pats)} patterns for {len(names)} labels")
        for p in pats:
            check_pattern(p)  # the run's (or the command line's): capped, RE2 only
        return cls(names, tuple(p or literal(n)
                                for n, p in zip(names, pats or ("",) * len(names))))

    def channel(self, texts: Sequence[str]) -> int | None:
        """Channel of a segment described by ``texts``; None when no label wants it."""
        joined = " | ".join(t for t in texts if t)
        for k, regex in enumerate(_compiled(self.patterns)):
            if regex.search(joined) is not None:
                return k
        return None


@functools.lru_cache(maxsize=8)
def _compiled(rule_patterns: tuple[str, ...]) -> tuple:
    """A rule's patterns compiled once by RE2 (linear time: they are run-sent), not per segment."""
    return tuple(compile_pattern(p) for p in rule_patterns)


def _code_texts(item: Dataset | None) -> list[str]:
    if item is None:
        return []
    return [dicom.header_str(item, "CodeMeaning"),
            f"{dicom.header_str(item, 'CodingSchemeDesignator')}:{dicom.header_str(item, 'CodeValue')}"]


def _first(ds: Dataset, keyword: str) -> Dataset | None:
    try:
        seq = ds.get(keyword)
        return seq[0] if seq else None
    except Exception:
        return None


# ----------------------------------------------------------------------------- report


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


# ----------------------------------------------------------------------------- slice index


class _Slices:
    """Lookups from the scan's per-slice metadata to slice rows, and the images' headers."""

    def __init__(self, folder: Path, meta: Mapping[str, np.ndarray], settings: dicom.DicomSettings):
        self.folder, self.meta, self.settings = folder, meta, settings
        self.by_ref: dict[tuple[str, int], int] = {}
        for i, (uid, frame) in enumerate(zip(meta["sop_uid"], meta["frame_number"])):
            self.by_ref.setdefault((str(uid), int(frame)), i)
        self.frames_of: dict[str, int] = {}
        for uid in meta["sop_uid"]:
            self.frames_of[str(uid)] = self.frames_of.get(str(uid), 0) + 1
        self._files: list[Path] | None = None
        self._headers: dict[int, Any] = {}

    def row(self, sop_uid: str, frame: int = 1) -> int | None:
        return self.by_ref.get((sop_uid, frame))

    def header(self, row: int) -> Dataset | None:
        """The header of the file slice ``row`` comes from (bounded read), or None."""
        k = int(self.meta["file_index"][row])
        if k not in self._headers:
            if self._files is None:
                self._files = dicom.list_candidate_files(self.folder)
            try:
                ds, _ = dicom.read_file(self._files[k], self.settings)
                for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009):  # keep the header, not pixels
                    ds.pop(tag, None)
                self._headers[k] = ds
            except Exception:
                log.debug("cannot re-read the image of slice %d", row, exc_info=True)
                self._headers[k] = None
        return self._headers[k]

    def geometry(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]] | None:
        """(IPP, row cosine, column cosine, (row spacing, column spacing)), (rows, cols) of a slice."""
        ds = self.header(row)
        if ds is None:
            return None
        try:
            frame = int(self.meta["frame_number"][row])
            pfg = ds.get("PerFrameFunctionalGroupsSequence")
            if pfg:
                item, shared = pfg[frame - 1], ds.SharedFunctionalGroupsSequence[0]
                ipp = item.PlanePositionSequence[0].ImagePositionPatient
                seq = (item if "PlaneOrientationSequence" in item else shared)
                iop = seq.PlaneOrientationSequence[0].ImageOrientationPatient
                seq = (item if "PixelMeasuresSequence" in item else shared)
                spacing = seq.PixelMeasuresSequence[0].PixelSpacing
            else:
                ipp, iop, spacing = ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing
            ipp = np.array([float(v) for v in ipp])
            iop = np.array([float(v) for v in iop])
            sp = np.array([float(v) for v in spacing])
            if ipp.shape != (3,) or iop.shape != (6,) or sp.shape != (2,) or np.any(sp <= 0) or \
                    not (np.isfinite(ipp).all() and np.isfinite(iop).all()):
                return None
            return ipp, iop[:3], iop[3:], sp, (int(ds.Rows), int(ds.Columns))
        except Exception:
            return None

    def in_frame_of_reference(self, uid: str) -> np.ndarray:
        return np.flatnonzero(self.meta["frame_of_reference"] == uid)


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


def _read_seg(ds: Dataset, slices: _Slices, rule: LabelRule, found: dict[str, int],
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
                     *_code_texts(_first(desc, "SegmentedPropertyTypeCodeSequence"))]
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


# ----------------------------------------------------------------------------- RTSTRUCT


# A hostile structure set must not hold a hospital's CPU for hours: skimage's polygon fill costs
# about (vertices x bounding-box pixels), and matching an unreferenced contour to its slice costs a
# plane test per slice of its frame of reference. Real structure sets stay far below these.
MAX_CONTOUR_POINTS = 20_000        # vertices of one contour
MAX_RTSTRUCT_POINTS = 2_000_000    # vertices of all contours of one file
MAX_RASTER_WORK = 5e10             # sum over contours of vertices x bounding-box pixels (~1 min)
MAX_PLANE_TESTS = 500_000          # contour-to-slice plane tests of one file (~10 s)


def _grid_coords(points: np.ndarray, geom: tuple) -> tuple[np.ndarray, np.ndarray]:
    ipp, row_cos, col_cos, spacing, _shape = geom
    d = points - ipp
    # snapped to 1/1000 pixel: ContourData is decimal text (16 characters), so a vertex on a
    # pixel centre comes back a hair off it and would flip that boundary pixel
    return np.round(d @ col_cos / spacing[0], 3), np.round(d @ row_cos / spacing[1], 3)


def _raster_work(points: np.ndarray, geom: tuple) -> float:
    """What filling this contour costs: vertices x its bounding box's pixels on the slice."""
    rows, cols = _grid_coords(points, geom)
    h, w = geom[4]
    height = np.clip(rows.max(), 0, h) - np.clip(rows.min(), 0, h) + 1
    width = np.clip(cols.max(), 0, w) - np.clip(cols.min(), 0, w) + 1
    return float(len(points)) * float(height) * float(width)


def _rasterise(points: np.ndarray, geom: tuple) -> np.ndarray:
    """The pixels of the slice grid ``geom`` whose centres lie inside or on the polygon."""
    from skimage.draw import polygon

    rows, cols = _grid_coords(points, geom)
    mask = np.zeros(geom[4], dtype=bool)
    rr, cc = polygon(rows, cols, shape=geom[4])
    mask[rr, cc] = True
    return mask


def _plane_distance(points: np.ndarray, geom: tuple) -> float:
    ipp, row_cos, col_cos = geom[0], geom[1], geom[2]
    normal = np.cross(row_cos, col_cos)
    return float(np.max(np.abs((points - ipp) @ normal)))


def _read_rtstruct(ds: Dataset, slices: _Slices, rule: LabelRule, found: dict[str, int],
                   budget: int) -> dict[tuple[int, int], np.ndarray] | str:
    """{(slice row, channel): mask}, or an unmatched reason. ``budget``: the most pixels all its
    contours may rasterise together (the decode budget; a structure set of millions of
    full-slice contours is refused as too large instead of burning the CPU)."""
    try:
        rois: dict[int, tuple[list[str], str]] = {}
        for item in ds.StructureSetROISequence:
            rois[int(item.ROINumber)] = ([dicom.header_str(item, "ROIName"),
                                          dicom.header_str(item, "ROIDescription")],
                                         dicom.header_str(item, "ReferencedFrameOfReferenceUID"))
        for obs in ds.get("RTROIObservationsSequence") or []:
            number = int(obs.ReferencedROINumber)
            if number in rois:
                rois[number][0].extend([dicom.header_str(obs, "ROIObservationLabel"),
                                        *_code_texts(_first(obs, "RTROIIdentificationCodeSequence"))])
        contours = []
        total_points = 0
        for roi in ds.get("ROIContourSequence") or []:
            number = int(roi.ReferencedROINumber)
            for c in roi.get("ContourSequence") or []:
                kind = dicom.header_str(c, "ContourGeometricType").upper()
                if kind not in ("CLOSED_PLANAR", "CLOSEDPLANAR_XOR"):
                    continue
                declared = dicom.header_int(c, "NumberOfContourPoints", 0)
                raw = c.get("ContourData")
                n_values = len(raw) if raw is not None else 0
                if max(declared, n_values // 3) > MAX_CONTOUR_POINTS:
                    return TOO_LARGE
                total_points += n_values // 3
                if total_points > MAX_RTSTRUCT_POINTS:
                    return TOO_LARGE
                data = np.asarray([float(v) for v in raw], dtype=np.float64)
                if data.size < 9 or data.size % 3 or not np.isfinite(data).all():
                    raise ValueError("contour data is not a list of at least three points")
                ref = _first(c, "ContourImageSequence")
                refs = (dicom.header_str(ref, "ReferencedSOPInstanceUID"),
                        dicom.header_int(ref, "ReferencedFrameNumber", 1)) if ref is not None else None
                contours.append((number, kind, data.reshape(-1, 3), refs))
    except Exception as exc:
        log.debug("RTSTRUCT refused: %s", exc, exc_info=True)
        return MALFORMED
    channel = {n: k for n, (texts, _) in rois.items() if (k := rule.channel(texts)) is not None}
    out: dict[tuple[int, int], np.ndarray] = {}
    xor: set[tuple[int, int]] = set()
    any_match = False
    spent = 0
    work = 0.0
    plane_tests = 0
    for number, kind, points, refs in contours:
        row = None
        if refs is not None and refs[0]:
            row = slices.row(*refs)
            geom = slices.geometry(row) if row is not None else None
            if geom is not None and _plane_distance(points, geom) > PLANE_TOLERANCE_MM:
                row = None  # a reference that does not hold the contour: try the frame
        if row is None and number in rois:
            for cand in slices.in_frame_of_reference(rois[number][1]):
                plane_tests += 1
                if plane_tests > MAX_PLANE_TESTS:
                    return TOO_LARGE
                geom = slices.geometry(int(cand))
                if geom is not None and _plane_distance(points, geom) <= PLANE_TOLERANCE_MM:
                    row = int(cand)
                    break
        if row is None:
            continue
        any_match = True
        if number not in channel:
            continue
        geom = slices.geometry(row)
        if geom is None:
            continue
        spent += geom[4][0] * geom[4][1]  # rasterising touches at most the whole slice
        work += _raster_work(points, geom)
        if spent > budget or work > MAX_RASTER_WORK:
            return TOO_LARGE
        mask = _rasterise(points, geom)
        key = (row, channel[number])
        if key not in out:
            out[key] = mask
        elif kind == "CLOSEDPLANAR_XOR" or key in xor:
            out[key] = out[key] ^ mask
        else:
            out[key] = out[key] | mask
        if kind == "CLOSEDPLANAR_XOR":
            xor.add(key)
        name = rule.names[channel[number]]
        found[name] = found.get(name, 0)
    if not any_match:
        return NO_MATCHING_IMAGE
    if not out:
        return NO_WANTED_LABEL
    return out


# ----------------------------------------------------------------------------- masks


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
    index = _Slices(folder, slices.meta, settings)
    n, size = len(slices.images), int(slices.images.shape[-1]) if len(slices.images) else settings.image_size
    open_rule = not rule.names
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
        if open_rule:  # every label of this file its own channel (named by its label text)
            file_rule = _open_rule(ds, kind)
        if kind == "SEG":
            got = _read_seg(ds, index, file_rule, found, settings.max_decoded_bytes)
        elif kind == "RTSTRUCT":
            got = _read_rtstruct(ds, index, file_rule, found, settings.max_decoded_bytes)
        else:
            got = MALFORMED
        if isinstance(got, str):
            report.refuse(rel, got)
            log.info("segmentation %s not used: %s", rel, got)
            continue
        report.matched_files += 1
        per_file.append({(row, file_rule.names[k]): m for (row, k), m in got.items()})
    names = rule.names if not open_rule else tuple(sorted({name for d in per_file for _, name in d}))
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


def _open_rule(ds: Dataset, kind: str | None) -> LabelRule:
    """Every segment / ROI of ``ds`` a label of its own, named by its label (scan report)."""
    names: list[str] = []
    try:
        if kind == "SEG":
            for item in ds.SegmentSequence:
                names.append(dicom.header_str(item, "SegmentLabel") or f"segment {item.SegmentNumber}")
        elif kind == "RTSTRUCT":
            for item in ds.StructureSetROISequence:
                names.append(dicom.header_str(item, "ROIName") or f"roi {item.ROINumber}")
    except Exception:
        pass
    names = list(dict.fromkeys(names))
    return LabelRule(tuple(names), tuple(f"^{literal(n)}( \\||$)" for n in names))
