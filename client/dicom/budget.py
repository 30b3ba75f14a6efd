"""Decompression-bomb checks: bound what decoding a file could allocate, before any decoder runs.

A few kB of compressed pixel data can declare (or encode) a 16384 x 16384 x N image: the
decoder would allocate gigabytes before anything could reject it.  Everything here looks
at the header and at the codestream headers only.  :data:`SIZE_BOUNDS` is the one table
saying, per transfer syntax, how its decoded size is bounded; a syntax it does not list
is refused (nothing bounds what an unknown decoder would allocate).
"""

from __future__ import annotations

import zlib
from typing import Callable, Iterator

import pydicom
from pydicom.dataset import Dataset

from .tags import DEFLATED_UID, header_int
from .types import TOO_LARGE, UNDECODABLE, Skip

MIB = 1024 * 1024

_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
# SOFn markers of ISO 10918 (baseline, extended, progressive, lossless; no DHT/JPG/DAC) and
# SOF55 of JPEG-LS.
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
                          0xCE, 0xCF, 0xF7})


def check_deflate(data: bytes, budget: int) -> None:
    """A deflated data set is inflated whole by pydicom at read time: bound it first (1 MiB steps)."""
    if DEFLATED_UID not in data[:65536]:
        return
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = DicomBytesIO(data)
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
    except Exception:
        return  # pydicom fails on it the same way, without inflating
    if str(meta.get("TransferSyntaxUID", "")) != DEFLATED_UID.decode():
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending, total = data[fp.tell():], 0
    try:
        while pending and not inflater.eof:
            total += len(inflater.decompress(pending, MIB))
            if total > budget:
                raise Skip(TOO_LARGE, f"deflated data set inflates past {budget} bytes")
            pending = inflater.unconsumed_tail
    except zlib.error:
        return  # pydicom reports the corrupt stream


def declared_decoded_bytes(ds: Dataset) -> int:
    """Rows x Columns x Frames x SamplesPerPixel x bytes per sample (BitsAllocated) of ``ds``."""
    rows, cols = max(header_int(ds, "Rows"), 0), max(header_int(ds, "Columns"), 0)
    frames = max(header_int(ds, "NumberOfFrames", 1), 1)
    samples = max(header_int(ds, "SamplesPerPixel", 1), 1)
    if "PixelData" in ds:
        bits = max(header_int(ds, "BitsAllocated", 16), 1)
    else:
        bits = 32 if "FloatPixelData" in ds else 64
    return rows * cols * frames * samples * ((bits + 7) // 8)


def _fragments(value: bytes) -> Iterator[memoryview]:
    """Fragments of encapsulated pixel data (Basic Offset Table left out), without copying."""
    view = memoryview(value)
    pos, first = 0, True
    while pos + 8 <= len(view):
        tag = bytes(view[pos : pos + 4])
        length = int.from_bytes(view[pos + 4 : pos + 8], "little")
        if tag != b"\xfe\xff\x00\xe0" or length == 0xFFFFFFFF:
            return  # sequence delimiter or garbage: the decoder deals with it
        if not first:
            yield view[pos + 8 : pos + 8 + length]
        first = False
        pos += 8 + length


def _j2k_size(frag: memoryview) -> tuple[int, int, int, int] | None:
    """(width, height, components, bytes per component) from a J2K/JP2 start, else None."""
    head = bytes(frag[:4096])
    if head.startswith(b"\xff\x4f\xff\x51"):
        at = 2
    elif head.startswith(_JP2_SIGNATURE):
        at = head.find(b"\xff\x4f\xff\x51")
        if at < 0:
            return None
        at += 2
    else:
        return None
    siz = head[at : at + 40]  # SIZ marker, Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, ..., Csiz
    if len(siz) < 40:
        return None
    x, y = int.from_bytes(siz[6:10], "big"), int.from_bytes(siz[10:14], "big")
    xo, yo = int.from_bytes(siz[14:18], "big"), int.from_bytes(siz[18:22], "big")
    comps = int.from_bytes(siz[38:40], "big")
    depth = 1
    for c in range(min(comps, 16384)):
        ssiz = head[at + 40 + 3 * c : at + 41 + 3 * c]
        if not ssiz:
            break
        depth = max(depth, (ssiz[0] & 0x7F) + 1)
    return max(x - xo, 0), max(y - yo, 0), max(comps, 1), 1 if depth <= 8 else 2 if depth <= 16 else 4


def _jpeg_size(frag: memoryview) -> tuple[int, int, int, int] | None:
    """(width, height, components, bytes per sample) from the SOF of a JPEG/JPEG-LS start.

    A height of 0 (defined later by a DNL marker) is returned as is (unbounded).
    """
    head = bytes(frag[:65536])
    if not head.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker == 0xDA:  # start of scan without a frame header
            return None
        length = int.from_bytes(head[pos + 2 : pos + 4], "big")
        if marker in _SOF_MARKERS:
            sof = head[pos + 4 : pos + 10]
            if len(sof) < 6:
                return None
            precision = sof[0]
            height, width = int.from_bytes(sof[1:3], "big"), int.from_bytes(sof[3:5], "big")
            return width, height, max(sof[5], 1), 1 if precision <= 8 else 2
        pos += 2 + length
    return None


def _rle_decoded_len(segment: memoryview, stop: int) -> int:
    """Bytes an RLE (PackBits) segment decodes to, counting only up to just past ``stop``."""
    n = pos = 0
    size = len(segment)
    while pos < size:
        h = segment[pos]
        pos += 1
        if h > 128:  # replicate run: one byte, 257 - h times
            n += 257 - h
            pos += 1
        elif h < 128:  # literal run of h + 1 bytes
            n += h + 1
            pos += h + 1
        if n > stop:
            break
    return n




def _fragment_sizes(sizer: Callable[[memoryview], tuple[int, int, int, int] | None]
                    ) -> Callable[[bytes, int, int], None]:
    """Bound by each frame's codestream header (decoders allocate that, not the declared size)."""

    def bound(value: bytes, room: int, budget: int) -> None:
        for frag in _fragments(value):
            size = sizer(frag)
            if size is None:
                continue
            width, height, comps, nbytes = size
            frame_bytes = width * height * comps * nbytes
            if height == 0 or frame_bytes > room:
                raise Skip(TOO_LARGE, f"codestream of {width}x{height}x{comps} decodes past "
                                      f"the budget {budget}")

    return bound


def _rle_segments(value: bytes, room: int, budget: int) -> None:
    """RLE: at most 64 x its bytes; counted exactly, segment by segment, when that does not fit."""
    frags = list(_fragments(value))
    if 64 * sum(len(f) for f in frags) <= room:
        return
    for frag in frags:  # big RLE data: bound each segment of each fragment exactly
        header = bytes(frag[:64])
        if len(header) < 64:
            continue
        count = int.from_bytes(header[:4], "little")
        offsets = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "little")
                   for i in range(min(count, 15))] + [len(frag)]
        for start, end in zip(offsets, offsets[1:]):
            segment = frag[start:end] if 0 <= start <= end else frag[0:0]
            if 64 * len(segment) > room and _rle_decoded_len(segment, room) > room:
                raise Skip(TOO_LARGE, f"RLE segment decodes past the budget {budget}")


def _declared_only(value: bytes, room: int, budget: int) -> None:
    """Native pixels decode to the declared size (a deflated data set was bounded at read)."""


_J2K = _fragment_sizes(_j2k_size)
_JPEG = _fragment_sizes(_jpeg_size)

# Transfer syntax -> how the decoded size of its pixel data is bounded (on top of the declared
# Rows x Columns x Frames x Samples x bytes, always checked).  A syntax not listed here (video,
# JPIP references, private syntaxes, anything newer) is refused: see check_pixel_budget.
SIZE_BOUNDS: dict[str, Callable[[bytes, int, int], None]] = {
    pydicom.uid.ImplicitVRLittleEndian: _declared_only,
    pydicom.uid.ExplicitVRLittleEndian: _declared_only,
    pydicom.uid.ExplicitVRBigEndian: _declared_only,
    pydicom.uid.DeflatedExplicitVRLittleEndian: _declared_only,  # inflation: check_deflate
    pydicom.uid.JPEGBaseline8Bit: _JPEG,  # SOF of each frame
    pydicom.uid.JPEGExtended12Bit: _JPEG,
    pydicom.uid.JPEGLossless: _JPEG,
    pydicom.uid.JPEGLosslessSV1: _JPEG,
    pydicom.uid.JPEGLSLossless: _JPEG,  # JPEG-LS: SOF55
    pydicom.uid.JPEGLSNearLossless: _JPEG,
    pydicom.uid.JPEG2000Lossless: _J2K,  # SIZ of each frame
    pydicom.uid.JPEG2000: _J2K,
    pydicom.uid.JPEG2000MCLossless: _J2K,
    pydicom.uid.JPEG2000MC: _J2K,
    pydicom.uid.HTJ2KLossless: _J2K,  # High-Throughput JPEG 2000: the same SIZ marker
    pydicom.uid.HTJ2KLosslessRPCL: _J2K,
    pydicom.uid.HTJ2K: _J2K,
    pydicom.uid.RLELossless: _rle_segments,
}


def check_pixel_budget(ds: Dataset, budget: int, name: object = "") -> None:
    """Raise :class:`Skip` if decoding ``ds`` could allocate more than ``budget`` bytes.

    Checked before any decode: the declared size (Rows x Columns x Frames x Samples x bytes per
    sample), then the bound :data:`SIZE_BOUNDS` gives its transfer syntax (for compressed data,
    what each frame's codestream header says it decodes to, or what RLE segments could expand
    to).  A header that lies within the budget is harmless here (the decoder's own size check
    then rejects the file as undecodable).  A transfer syntax without an entry is refused as
    undecodable, the detail naming ``name`` (the file) and the syntax.  A data set without any
    transfer syntax (none given, none inferable) is left to the decoder, which cannot run on it.
    """
    declared = declared_decoded_bytes(ds)
    if declared > budget:
        raise Skip(TOO_LARGE, f"{declared} decoded bytes declared > budget {budget}")
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None:
        return
    bound = SIZE_BOUNDS.get(str(tsyntax))
    if bound is None:
        uid = pydicom.uid.UID(str(tsyntax))
        label = f"{uid} ({uid.name})" if uid.name != str(uid) else str(uid)
        raise Skip(UNDECODABLE, f"{name or 'file'}: transfer syntax {label} has no decoded-size "
                                f"bound (client.dicom.budget.SIZE_BOUNDS); refused")
    if bound is _declared_only or "PixelData" not in ds:
        return  # native (or float) pixels: decoded to the declared size, already within budget
    value = ds.PixelData
    if not isinstance(value, (bytes, bytearray)):
        return
    bound(value, budget - declared, budget)  # the output array holds `declared`; a frame needs more
