"""Pixel decoding: stored values to float32 frames in modality units, and where they lie.

Why a module of its own: decoding is the only stage that runs a codec on hospital bytes, so
it runs only after the header checks and :func:`check_pixel_budget` let the file through;
the result (HU for CT, luminance for colour) is what preprocessing and volumes start from.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from .budget import check_pixel_budget
from .reader import file_limit, has_pixel_tag, read_bytes
from .tags import PIXEL_KEYWORDS, header_int, header_str
from .types import (
    GREY_IN_COLOUR_RUN,
    INCONSISTENT_GEOMETRY,
    NO_PIXEL_DATA,
    TOO_SMALL,
    TRUNCATED_PIXEL_DATA,
    UNDECODABLE,
    DicomSettings,
    Skip,
)

logger = logging.getLogger(__name__)


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Files without file meta (or without its TransferSyntaxUID) get the syntax they were read in.

    pydicom needs it to decode; only native (uncompressed) encodings can lack it, and
    ``original_encoding`` records which one the parser actually met.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    if implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _expected_native_bytes(ds: Dataset) -> int | None:
    """Bytes an uncompressed PixelData must hold, or None for compressed syntaxes."""
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is not None and tsyntax.is_compressed:
        return None
    rows, cols = header_int(ds, "Rows"), header_int(ds, "Columns")
    frames = max(header_int(ds, "NumberOfFrames", 1), 1)
    samples = max(header_int(ds, "SamplesPerPixel", 1), 1)
    bits = header_int(ds, "BitsAllocated", 16)
    if "PixelData" not in ds:
        bits = 32 if "FloatPixelData" in ds else 64
    if header_str(ds, "PhotometricInterpretation") == "YBR_FULL_422":
        # 4:2:2 subsampled: two luma + two chroma values per pixel pair.
        return (rows * cols * 2 * frames * bits + 7) // 8
    return (rows * cols * samples * frames * bits + 7) // 8


def _pixel_bytes_len(ds: Dataset) -> int:
    for kw in PIXEL_KEYWORDS:
        if kw in ds:
            value = ds[kw].value
            return len(value) if value is not None else 0
    return 0


def _rescale_from_functional_groups(ds: Dataset, n_frames: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-frame (slope, intercept) from enhanced multi-frame functional groups.

    Per-frame groups win over the shared group; returns None when neither holds a
    PixelValueTransformationSequence (caller then uses identity).
    """

    def from_item(item: Dataset) -> tuple[float, float] | None:
        seq = item.get("PixelValueTransformationSequence")
        if not seq:
            return None
        pvt = seq[0]
        try:
            return float(pvt.get("RescaleSlope", 1.0)), float(pvt.get("RescaleIntercept", 0.0))
        except (TypeError, ValueError):
            return None

    shared = None
    sfg = ds.get("SharedFunctionalGroupsSequence")
    if sfg:
        shared = from_item(sfg[0])
    per_frame: list[tuple[float, float] | None] = [None] * n_frames
    pfg = ds.get("PerFrameFunctionalGroupsSequence")
    if pfg and len(pfg) == n_frames:
        per_frame = [from_item(item) for item in pfg]
    if shared is None and all(p is None for p in per_frame):
        return None
    default = shared or (1.0, 0.0)
    pairs = [p or default for p in per_frame]
    slopes = np.array([p[0] for p in pairs], dtype=np.float32)
    intercepts = np.array([p[1] for p in pairs], dtype=np.float32)
    return slopes, intercepts


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601


def _to_luminance(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma from RGB in the last axis."""
    return rgb.astype(np.float32, copy=False) @ _LUMA


def _raw_pixels(ds: Dataset) -> tuple[np.ndarray, str]:
    """Decoded stored values and the photometric interpretation they come out in.

    ``as_rgb=False``: YBR data stays YBR, so its Y plane can serve as luminance without
    pydicom's (slow) conversion to RGB and back.
    """
    from pydicom.pixels import get_decoder

    tsyntax = ds.file_meta.TransferSyntaxUID
    decoder = get_decoder(tsyntax)
    arr, meta = decoder.as_array(ds, as_rgb=False)
    return arr, str(meta.get("photometric_interpretation", header_str(ds, "PhotometricInterpretation")))


def decode_frames(ds: Dataset) -> np.ndarray:
    """Decode all frames of ``ds`` to float32 ``(frames, rows, cols)`` in modality units.

    - Grayscale: the modality LUT / rescale slope+intercept is applied (for enhanced
      multi-frame, the PixelValueTransformationSequence of the per-frame or shared
      functional groups, else identity), so CT comes out in Hounsfield units.
    - MONOCHROME1 (low value = bright): inverted as ``min + max - v`` over the whole
      object, so that afterwards bright means high signal and the value range is kept.
    - Colour: the Y plane of YBR data, BT.601 luminance of RGB, PALETTE COLOR through
      its colour LUT; no modality LUT.

    Raises whatever the decoder raises (the scanner maps that to "undecodable"). A colour
    run's frames come from :func:`decode_rgb` instead.
    """
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    _ensure_transfer_syntax(ds)
    arr, photometric = _raw_pixels(ds)
    rows, cols = header_int(ds, "Rows"), header_int(ds, "Columns")
    n_frames = max(header_int(ds, "NumberOfFrames", 1), 1)
    samples = max(header_int(ds, "SamplesPerPixel", 1), 1)
    photometric = photometric.upper()

    if photometric == "PALETTE COLOR" and samples == 1:
        return _to_luminance(apply_color_lut(arr, ds)).reshape(n_frames, rows, cols)
    if samples == 3:
        arr = arr.reshape(n_frames, rows, cols, 3)
        if photometric.startswith("YBR"):
            return arr[..., 0].astype(np.float32)
        return _to_luminance(arr)

    arr = arr.reshape(n_frames, rows, cols)
    if "ModalityLUTSequence" in ds:
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    elif "RescaleSlope" in ds or "RescaleIntercept" in ds:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        values = arr.astype(np.float32)
        if slope != 1.0:
            values *= np.float32(slope)
        if intercept != 0.0:
            values += np.float32(intercept)
    else:
        fg = _rescale_from_functional_groups(ds, n_frames)
        values = arr.astype(np.float32)
        if fg is not None:
            values = values * fg[0][:, None, None] + fg[1][:, None, None]
    values = values.reshape(n_frames, rows, cols)
    if photometric == "MONOCHROME1":
        values = values.min() + values.max() - values
    return values.astype(np.float32, copy=False)


def is_colour(ds: Dataset) -> bool:
    """Three samples per pixel (RGB, YBR_*) or a palette: what a colour run decodes."""
    photometric = header_str(ds, "PhotometricInterpretation").upper()
    return max(header_int(ds, "SamplesPerPixel", 1), 1) == 3 or photometric == "PALETTE COLOR"


def decode_rgb(ds: Dataset) -> np.ndarray:
    """Decode a colour object to float32 ``(frames, rows, cols, 3)`` RGB in [-1, 1] per channel.

    The one colour space of colour runs (``channels = 3``): RGB, each channel mapped linearly
    from its stored range (0 .. 2**BitsStored - 1; a palette's LUT entries: 0 .. 2**bits of
    its descriptor - 1) to [-1, 1], the same fixed mapping for every slice and channel, so the
    colour balance of a photograph is kept (per-slice percentiles, as for MR, would not).
    YBR_FULL, YBR_FULL_422 (and the JPEG codecs' YBR_ICT/RCT) are converted by pydicom
    (``as_rgb=True``: PS3.3 C.7.6.3.1.2's full-range BT.601 equations); PALETTE COLOR goes
    through its colour LUT. Raises ``ValueError`` for anything else.
    """
    from pydicom.pixels import apply_color_lut, get_decoder

    _ensure_transfer_syntax(ds)
    rows, cols = header_int(ds, "Rows"), header_int(ds, "Columns")
    n_frames = max(header_int(ds, "NumberOfFrames", 1), 1)
    samples = max(header_int(ds, "SamplesPerPixel", 1), 1)
    photometric = header_str(ds, "PhotometricInterpretation").upper()
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    if photometric == "PALETTE COLOR" and samples == 1:
        arr, _ = decoder.as_array(ds, as_rgb=False)
        rgb = apply_color_lut(arr, ds)
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
        bits = int(descriptor[2]) if descriptor is not None and len(descriptor) == 3 else 16
        top = float(2 ** (16 if bits > 8 else 8) - 1)
    elif samples == 3:
        rgb, _ = decoder.as_array(ds, as_rgb=True)
        top = float(2 ** max(1, header_int(ds, "BitsStored", header_int(ds, "BitsAllocated", 8))) - 1)
    else:
        raise ValueError(f"not a colour image: {samples} sample(s), {photometric!r}")
    rgb = np.asarray(rgb, dtype=np.float32).reshape(n_frames, rows, cols, 3)
    return np.clip(rgb * np.float32(2.0 / top) - 1.0, -1.0, 1.0).astype(np.float32, copy=False)


def frame_geometry(ds: Dataset, n_frames: int) -> tuple[np.ndarray, tuple[float, ...] | None,
                                                         tuple[float, float] | None]:
    """Per-frame location along the plane normal (NaN where unknown), orientation, pixel spacing."""
    positions = np.full(n_frames, np.nan, dtype=np.float64)
    orientation: tuple[float, ...] | None = None
    spacing: tuple[float, float] | None = None

    def floats(values: Any, n: int) -> tuple[float, ...] | None:
        try:
            out = tuple(float(v) for v in values)
        except Exception:
            return None
        return out if len(out) == n and all(np.isfinite(out)) else None

    def normal_of(o: tuple[float, ...] | None) -> np.ndarray | None:
        if o is None:
            return None
        nrm = np.cross(np.asarray(o[:3]), np.asarray(o[3:]))
        return nrm if np.linalg.norm(nrm) > 0 else None

    def dot(pos: Any, nrm: np.ndarray | None) -> float:
        p = floats(pos, 3) if pos is not None else None
        return float(np.asarray(p) @ nrm) if nrm is not None and p is not None else float("nan")

    try:
        pfg = ds.get("PerFrameFunctionalGroupsSequence")
        if pfg and len(pfg) == n_frames:
            sfg = ds.get("SharedFunctionalGroupsSequence")
            shared = sfg[0] if sfg else Dataset()
            if shared.get("PlaneOrientationSequence"):
                orientation = floats(shared.PlaneOrientationSequence[0].get("ImageOrientationPatient", []), 6)
            if shared.get("PixelMeasuresSequence"):
                spacing = floats(shared.PixelMeasuresSequence[0].get("PixelSpacing", []), 2)  # type: ignore[assignment]
            for i, item in enumerate(pfg):
                if item.get("PlaneOrientationSequence"):
                    orientation = floats(
                        item.PlaneOrientationSequence[0].get("ImageOrientationPatient", []), 6) or orientation
                if spacing is None and item.get("PixelMeasuresSequence"):
                    spacing = floats(item.PixelMeasuresSequence[0].get("PixelSpacing", []), 2)  # type: ignore[assignment]
                if item.get("PlanePositionSequence"):
                    positions[i] = dot(item.PlanePositionSequence[0].get("ImagePositionPatient"),
                                       normal_of(orientation))
            return positions, orientation, spacing
        orientation = floats(ds.get("ImageOrientationPatient", []), 6)
        spacing = floats(ds.get("PixelSpacing", []), 2)  # type: ignore[assignment]
        if n_frames == 1:
            nrm = normal_of(orientation)
            pos = ds.get("ImagePositionPatient")
            if nrm is not None and pos is not None:
                positions[0] = dot(pos, nrm)
            elif "SliceLocation" in ds:
                positions[0] = float(ds.SliceLocation)
    except Exception:  # geometry is informative only; never fatal
        logger.debug("could not compute slice geometry", exc_info=True)
    return positions, orientation, spacing


def decode_dataset(ds: Dataset, path: Path, settings: DicomSettings,
                   raw: bytes | None = None) -> np.ndarray:
    """Checks that need pixel data, then decode to modality units; raises Skip on problems.

    ``raw``: the bytes ``ds`` was parsed from (else ``path`` is read again when needed).
    ``settings.channels`` 3 (a colour run): colour objects come out as :func:`decode_rgb`'s
    ``(frames, rows, cols, 3)`` RGB in [-1, 1]; a grey object is skipped (``grey-image``).
    """
    if not any(kw in ds for kw in PIXEL_KEYWORDS):
        if len(ds) == 0 or "Rows" in ds:
            # An image header (or an unparseable body) without a readable pixel element:
            # if the tag is in the bytes, the element was cut off.
            if raw is None:
                try:
                    raw = read_bytes(path, file_limit(settings))
                except Skip:
                    raw = b""
            if has_pixel_tag(raw):
                raise Skip(TRUNCATED_PIXEL_DATA, "pixel data element present but unreadable")
        raise Skip(NO_PIXEL_DATA)
    rows, cols = header_int(ds, "Rows"), header_int(ds, "Columns")
    if rows <= 0 or cols <= 0:
        raise Skip(INCONSISTENT_GEOMETRY, f"rows={rows} cols={cols}")
    if rows < settings.min_size or cols < settings.min_size:
        raise Skip(TOO_SMALL, f"{rows}x{cols}")
    _ensure_transfer_syntax(ds)
    check_pixel_budget(ds, settings.max_decoded_bytes, path)
    expected = _expected_native_bytes(ds)
    if expected is not None and _pixel_bytes_len(ds) < expected:
        raise Skip(TRUNCATED_PIXEL_DATA, f"{_pixel_bytes_len(ds)} < {expected} bytes")
    colour = settings.channels == 3
    if colour and not is_colour(ds):
        raise Skip(GREY_IN_COLOUR_RUN, header_str(ds, "PhotometricInterpretation"))
    try:
        frames = decode_rgb(ds) if colour else decode_frames(ds)
    except Exception as exc:
        msg = str(exc)
        if "less than expected" in msg or "too short" in msg.lower():
            raise Skip(TRUNCATED_PIXEL_DATA, msg) from exc
        raise Skip(UNDECODABLE, f"{type(exc).__name__}: {msg}") from exc
    if (frames.ndim != 3 + colour or frames.shape[1:3] != (rows, cols) or frames.shape[0] == 0
            or (colour and frames.shape[3] != 3)):
        raise Skip(INCONSISTENT_GEOMETRY, f"decoded shape {frames.shape}")
    if not np.all(np.isfinite(frames)):
        frames = np.nan_to_num(frames, nan=0.0, posinf=0.0, neginf=0.0)
    return frames
