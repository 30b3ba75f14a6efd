"""DICOM discovery and decoding on the hospital side (a package: one module per job).

Everything in here runs next to the hospital's images and never leaves it: the
decoded slices feed the local GAN training, and the per-file details (paths,
UIDs, skip reasons, series descriptions) exist only for the hospital's own log
and ``fedsynth data scan``.  Only :meth:`ScanReport.counts` is fit to export
(plain integers under fixed keys).

Pipeline per file (each file is read from disk once):

1. one ``dcmread`` (``force`` only as a fallback for preamble-less DICOM) and the
   cheap header checks: empty file, not DICOM, DICOMDIR, non-image objects (SR,
   RT, SEG, ...), synthetic images fedsynth itself exported, the hospital's
   filters; no pixel is decoded for a skipped file;
2. the decompression-bomb checks (declared size, each frame's codestream header; a
   transfer syntax without a size bound is refused), then a
   ``pixel_array``-equivalent decode through pydicom 3's decoders (pylibjpeg and
   openjpeg cover the compressed transfer syntaxes); each frame of a multi-frame
   object is a slice; a missing transfer syntax is inferred from how the file was
   actually encoded;
3. modality units (modality LUT / rescale, per-frame functional groups of
   enhanced objects), MONOCHROME1 inversion, colour to luminance (the Y plane of
   YBR data is taken as is, which skips pydicom's costly YBR->RGB conversion);
4. resize (area when shrinking, bilinear when enlarging; both linear, so they
   commute with step 5's linear map) keeping the aspect ratio;
5. intensity normalisation to [-1, 1]: CT through a fixed HU window, every other
   modality by per-slice percentiles (MR and projection intensities have no
   absolute scale), then centre-pad to square with -1.

A single bad file never aborts a scan: it is skipped with one of a fixed set of
short reasons (:data:`SKIP_REASONS`) and counted in the :class:`ScanReport`.

Modules (each imports only the ones above it; none imports this ``__init__``):
:mod:`.tags` (UIDs, header predicates), :mod:`.types` (settings, reasons, reports),
:mod:`.budget` (decompression-bomb bounds per transfer syntax), :mod:`.reader` (folder
walk, bounded read), :mod:`.pixels` (decoding), :mod:`.preprocess` (resize, normalise,
pad), :mod:`.scan` (the loop over a folder).  Everything other modules and tests import
is re-exported here.
"""

from __future__ import annotations

from .budget import SIZE_BOUNDS, check_deflate, check_pixel_budget, declared_decoded_bytes
from .pixels import decode_dataset, decode_frames, frame_geometry
from .preprocess import normalise, pad_square, preprocess, resize_keep_aspect, resized_shape
from .reader import file_limit, list_candidate_files, read_bytes, read_file, walk_folder
from .scan import iter_files, meta_arrays, no_usable_error, scan_folder
from .tags import (
    RTSTRUCT_SOP_CLASS,
    SEG_SOP_CLASS,
    SEGMENTATION_SOP_CLASSES,
    SYNTHETIC_PRIVATE_CREATOR,
    header_int,
    header_str,
    is_non_image,
    is_segmentation,
    is_synthetic,
)
from .types import (
    DICOMDIR,
    EMPTY_FILE,
    FILTERED_OUT,
    INCONSISTENT_GEOMETRY,
    LABEL_ATTRIBUTES,
    META_KEYS,
    NO_PIXEL_DATA,
    NON_IMAGE_OBJECT,
    NOT_A_FILE,
    NOT_DICOM,
    OUTSIDE_DATA_DIR,
    PIPELINE_VERSION,
    SKIP_REASONS,
    SYNTHETIC,
    TOO_LARGE,
    TOO_SMALL,
    TRANSIENT_SKIP_REASONS,
    TRUNCATED_PIXEL_DATA,
    UNDECODABLE,
    UNREADABLE,
    UNREADABLE_FOLDER,
    DicomSettings,
    FileRecord,
    NoUsableDicomError,
    ScanReport,
    SeriesSummary,
    Skip,
    SliceSet,
    format_counts,
)

__all__ = [
    "DICOMDIR",
    "EMPTY_FILE",
    "FILTERED_OUT",
    "INCONSISTENT_GEOMETRY",
    "LABEL_ATTRIBUTES",
    "META_KEYS",
    "NON_IMAGE_OBJECT",
    "NOT_A_FILE",
    "NOT_DICOM",
    "NO_PIXEL_DATA",
    "OUTSIDE_DATA_DIR",
    "PIPELINE_VERSION",
    "RTSTRUCT_SOP_CLASS",
    "SEGMENTATION_SOP_CLASSES",
    "SEG_SOP_CLASS",
    "SIZE_BOUNDS",
    "SKIP_REASONS",
    "SYNTHETIC",
    "SYNTHETIC_PRIVATE_CREATOR",
    "TOO_LARGE",
    "TOO_SMALL",
    "TRANSIENT_SKIP_REASONS",
    "TRUNCATED_PIXEL_DATA",
    "UNDECODABLE",
    "UNREADABLE",
    "UNREADABLE_FOLDER",
    "DicomSettings",
    "FileRecord",
    "NoUsableDicomError",
    "ScanReport",
    "SeriesSummary",
    "Skip",
    "SliceSet",
    "check_deflate",
    "check_pixel_budget",
    "declared_decoded_bytes",
    "decode_dataset",
    "decode_frames",
    "file_limit",
    "format_counts",
    "frame_geometry",
    "header_int",
    "header_str",
    "is_non_image",
    "is_segmentation",
    "is_synthetic",
    "iter_files",
    "list_candidate_files",
    "meta_arrays",
    "no_usable_error",
    "normalise",
    "pad_square",
    "preprocess",
    "read_bytes",
    "read_file",
    "resize_keep_aspect",
    "resized_shape",
    "scan_folder",
    "walk_folder",
]
