"""RT structure sets to masks: closed planar contours rasterised on their slices' own grids.

Each contour is matched to its slice by its ``ContourImageSequence`` reference, else by the
structure set's frame of reference and the plane its points lie in, and filled with
``skimage.draw.polygon`` (why not rt-utils: :mod:`client.segmentation`'s docstring). Every cost
a hostile file could inflate is capped before it is paid (the ``MAX_*`` limits below).
"""

from __future__ import annotations

import logging

import numpy as np
from pydicom.dataset import Dataset

from . import dicom
from .seg_labels import (MALFORMED, NO_MATCHING_IMAGE, NO_WANTED_LABEL, TOO_LARGE, LabelRule,
                         code_texts, first_item)
from .slice_index import SliceIndex

log = logging.getLogger(__name__)

PLANE_TOLERANCE_MM = 0.5  # an RTSTRUCT contour lies in a slice's plane when this close to it


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


def read_rtstruct(ds: Dataset, slices: SliceIndex, rule: LabelRule, found: dict[str, int],
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
                                        *code_texts(first_item(obs, "RTROIIdentificationCodeSequence"))])
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
                ref = first_item(c, "ContourImageSequence")
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
