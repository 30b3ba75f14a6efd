"""Which segment is which of the run's mask labels, and why a segmentation gives no mask.

Shared by the SEG reader (:mod:`client.segmentation`) and the RTSTRUCT reader
(:mod:`client.rtstruct`): the run's labels and their RE2 patterns (:class:`LabelRule`), the
segment texts a pattern is searched in, and the fixed reasons a file is not used.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

from pydicom.dataset import Dataset

from shared_models.patterns import check_pattern, compile_pattern, literal

from . import dicom

# Why a segmentation file gives no mask (fixed short strings: keys of MaskReport.unmatched).
NO_MATCHING_IMAGE = "no-matching-image"  # references no slice of the scan
NO_WANTED_LABEL = "no-wanted-label"  # none of its segments is one of the run's labels
GRID_MISMATCH = "grid-mismatch"  # SEG frames of another size than their source image
MALFORMED = "malformed"  # highdicom / the structure set's references refuse it
TOO_LARGE = dicom.TOO_LARGE  # over the decoded-pixel budget or the file-size limit
UNREADABLE = dicom.UNREADABLE  # cannot be read again
UNMATCHED_REASONS = (NO_MATCHING_IMAGE, NO_WANTED_LABEL, GRID_MISMATCH, MALFORMED, TOO_LARGE,
                     UNREADABLE)


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


def code_texts(item: Dataset | None) -> list[str]:
    if item is None:
        return []
    return [dicom.header_str(item, "CodeMeaning"),
            f"{dicom.header_str(item, 'CodingSchemeDesignator')}:{dicom.header_str(item, 'CodeValue')}"]


def first_item(ds: Dataset, keyword: str) -> Dataset | None:
    try:
        seq = ds.get(keyword)
        return seq[0] if seq else None
    except Exception:
        return None



def open_rule(ds: Dataset, kind: str | None) -> LabelRule:
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
