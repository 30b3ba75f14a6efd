"""UIDs, tag bytes and header predicates of the scan, each defined once.

Why a module of its own: the scan, the bomb checks and :mod:`client.segmentation` all ask
the same header questions (is this a mask? an image fedsynth made itself?); one copy of
each UID set keeps them answering alike.  Nothing here decodes a pixel.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"  # RT Structure Set Storage
# masks, not images: skipped by the scan, read by client.segmentation
SEGMENTATION_SOP_CLASSES = frozenset({SEG_SOP_CLASS, RTSTRUCT_SOP_CLASS})
SEGMENTATION_MODALITIES = frozenset({"SEG", "RTSTRUCT"})

# Modalities whose objects are not anatomical images even when they carry pixel
# data (an RT dose grid or a segmentation mask would poison the GAN's training set).
NON_IMAGE_MODALITIES = frozenset(
    {
        "SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "RTIMAGE_PLAN", "SEG", "PR",
        "KO", "REG", "FID", "ECG", "HD", "EPS", "RESP", "AU", "DOC", "PLAN", "RWV",
        "IOL", "MPR", "OAM", "OPV", "OPM", "LEN", "KER", "SMR", "STAIN",
    }
)

# SOP class UID prefixes of non-image objects, for files whose Modality is absent or misleading.
NON_IMAGE_SOP_PREFIXES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.88.",      # structured reports (SR, KO, CAD, dose SR)
    "1.2.840.10008.5.1.4.1.1.481.",     # RT objects (RTPLAN, RTSTRUCT, RTDOSE, ...)
    "1.2.840.10008.5.1.4.1.1.11.",      # presentation states
    "1.2.840.10008.5.1.4.1.1.9.",       # waveforms
    "1.2.840.10008.5.1.4.1.1.66",       # raw data, registration, segmentation, fiducials
    "1.2.840.10008.5.1.4.1.1.104.",     # encapsulated PDF/CDA
)
# RT Image is an image (portal films); keep it even though it sits under .481.
IMAGE_SOP_EXCEPTIONS = frozenset({"1.2.840.10008.5.1.4.1.1.481.1"})

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# Standard modality codes that may appear as keys of ScanReport.counts(); anything
# else a file claims (free text) is counted as "other" so no odd value leaks out.
COUNTED_MODALITIES = frozenset(
    {"CT", "MR", "CR", "DX", "MG", "US", "NM", "PT", "XA", "RF", "OT", "SC", "IO", "PX", "RG",
     "ES", "XC", "GM", "SM", "OP", "OCT", "BMD", "DG", "TG", "IVUS", "RTIMAGE"}
)

# Private block that fedsynth.export writes; the creator string marks a synthetic image.
SYNTHETIC_PRIVATE_CREATOR = "FEDSYNTH SYNTHETIC"
SYNTHETIC_PRIVATE_GROUP = 0x0009

# Tag bytes of (7FE0,0010) Pixel Data, little and big endian: lets a file whose pixel
# element pydicom could not parse be told apart from one that never had pixels.
PIXEL_TAG_BYTES = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")

# Deflated Explicit VR Little Endian, as it appears in a file's bytes (checked before parsing)
DEFLATED_UID = b"1.2.840.10008.1.2.1.99"


def header_str(ds: Dataset, keyword: str) -> str:
    """``ds.keyword`` as stripped text, ``""`` when absent or unreadable (never raises)."""
    try:
        value = ds.get(keyword, "")
    except Exception:
        return ""
    return "" if value is None else str(value).strip()


def header_int(ds: Dataset, keyword: str, default: int = 0) -> int:
    """``ds.keyword`` as an int, ``default`` when absent, empty or unreadable (never raises)."""
    try:
        value = ds.get(keyword, None)
        return default if value in (None, "") else int(value)
    except Exception:
        return default


def is_non_image(ds: Dataset) -> bool:
    """True for objects that are not anatomical images (SR, RT, SEG, ...): modality or SOP class."""
    modality = header_str(ds, "Modality").upper()
    if modality in NON_IMAGE_MODALITIES:
        return True
    sop = header_str(ds, "SOPClassUID")
    if sop and sop not in IMAGE_SOP_EXCEPTIONS and sop.startswith(NON_IMAGE_SOP_PREFIXES):
        return True
    return False


def is_segmentation(ds: Dataset) -> bool:
    """True for a DICOM SEG or RTSTRUCT object (by SOP class, else by modality)."""
    return (header_str(ds, "SOPClassUID") in SEGMENTATION_SOP_CLASSES
            or header_str(ds, "Modality").upper() in SEGMENTATION_MODALITIES)


def is_synthetic(ds: Dataset) -> bool:
    """True for images fedsynth (or anyone honest) flagged as synthetic: never train on them."""
    if header_str(ds, "SyntheticData").upper() == "YES":
        return True
    try:
        block = ds.private_block(SYNTHETIC_PRIVATE_GROUP, SYNTHETIC_PRIVATE_CREATOR)
        return block is not None
    except (KeyError, ValueError):
        return False
    except Exception:
        return False
