"""The scan's slices looked up by what a segmentation references (SOP instance and frame, frame
of reference), with each slice's header and plane geometry read again by the bounded reader."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from pydicom.dataset import Dataset

from . import dicom

log = logging.getLogger(__name__)

class SliceIndex:
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
