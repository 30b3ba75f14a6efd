"""Decompression bombs (issue 11, finding 9): a few kB of DICOM that would decode to gigabytes.

Every bomb is refused as ``too-large`` from its header (and its codestream headers) BEFORE any
decoder runs: the declared Rows x Columns x Frames x Samples x bytes per sample against the
hospital's ``max-decoded-mb``, the size a JPEG 2000 SIZ / JPEG SOF marker says the decoder will
allocate (headers that lie about Rows/Columns), what RLE segments could expand to, and what a
deflated data set inflates to. A scan of a folder of bombs stays within a stated memory bound.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

from client import dicom
from client.dicom import TOO_LARGE, DicomSettings, scan_folder
from client.settings import HospitalSettings, SettingsError
from fedsynth.demo_data import build_demo_hospitals

REPO = Path(__file__).resolve().parents[3]
BIG = 16384


def _j2k_codestream(width: int, height: int) -> bytes:
    """A real 8-bit JPEG 2000 codestream of ``width`` x ``height`` zeros, about 150 bytes.

    Encoded at 64 x 64, then SIZ (image and tile size) rewritten: openjpeg decodes it to the
    full size (a 16384 x 16384 one peaks at about 1.3 GB in the decoder).
    """
    import openjpeg

    cs = bytearray(openjpeg.encode(np.zeros((64, 64), dtype=np.uint8), codec_format=0))
    at = cs.find(b"\xff\x51")
    struct.pack_into(">IIIIII", cs, at + 6, width, height, 0, 0, width, height)
    return bytes(cs)


def _jpeg_header(width: int, height: int) -> bytes:
    """SOI + a baseline SOF0 of ``width`` x ``height`` (the rest is garbage: never decoded)."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + sof + b"\x00" * 64


def _rle_frame(segments: int, segment: bytes) -> bytes:
    header = struct.pack("<I", segments)
    offsets, pos = [], 64
    for _ in range(segments):
        offsets.append(pos)
        pos += len(segment)
    header += b"".join(struct.pack("<I", o) for o in offsets) + b"\x00" * (60 - 4 * segments)
    return header + segment * segments


def _deflate_bomb(mb: int) -> bytes:
    """A Deflated Explicit VR Little Endian file of a 64 x 64 image plus ``mb`` MB of zeros
    in a private OB element: a few hundred kB on disk, inflated whole by pydicom's reader."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    ds = _image(64, 64)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.PixelData = b"\x00" * (64 * 64)
    head = DicomBytesIO()
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, ds.file_meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    zipper = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunks = [zipper.compress(body.getvalue()),
              zipper.compress(b"\xe1\x7f\x10\x10OB\x00\x00" + struct.pack("<I", mb << 20))]
    block = b"\x00" * (1 << 20)
    chunks += [zipper.compress(block) for _ in range(mb)]
    chunks.append(zipper.flush())
    return head.getvalue() + b"".join(chunks)


def _image(rows: int, cols: int, *, frames: int = 1, bits: int = 8, samples: int = 1) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "MR"
    ds.Rows, ds.Columns = rows, cols
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    return ds


def _save(ds: Dataset, path: Path, tsyntax: str, pixels: bytes, encapsulated: bool) -> Path:
    ds.file_meta.TransferSyntaxUID = tsyntax
    ds.PixelData = pixels
    if encapsulated:
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    return path


def write_bombs(folder: Path) -> dict[str, Path]:
    """Each kind of bomb, a few kB each; the name says what it does."""
    folder.mkdir(parents=True, exist_ok=True)
    j2k = _j2k_codestream(BIG, BIG)
    out = {
        # 2 kB of JPEG 2000 declaring and encoding 16384 x 16384 (256 MB decoded, 1.3 GB peak)
        "j2k_16k.dcm": _save(_image(BIG, BIG), folder / "j2k_16k.dcm", JPEG2000Lossless,
                             encapsulate([j2k]), True),
        # two such frames
        "j2k_16k_2frames.dcm": _save(_image(BIG, BIG, frames=2), folder / "j2k_16k_2frames.dcm",
                                     JPEG2000Lossless, encapsulate([j2k, j2k]), True),
        # a header that lies: 64 x 64 declared, the codestream decodes to 16384 x 16384
        "j2k_lying_header.dcm": _save(_image(64, 64), folder / "j2k_lying_header.dcm",
                                      JPEG2000Lossless, encapsulate([j2k]), True),
        # RLE of 16384 x 16384 x 16 bit, 2 frames: pydicom zero-fills 512 MB per frame
        "rle_16k.dcm": _save(_image(BIG, BIG, frames=2, bits=16), folder / "rle_16k.dcm",
                             RLELossless, encapsulate([_rle_frame(2, b"\x81\x00" * 8)] * 2), True),
        # JPEG baseline declaring and encoding 16384 x 16384 RGB
        "jpeg_16k.dcm": _save(_image(BIG, BIG, samples=3), folder / "jpeg_16k.dcm",
                              JPEGBaseline8Bit, encapsulate([_jpeg_header(BIG, BIG)]), True),
        # native pixel data, 4 bytes for a declared 16384 x 16384 x 100 frames x 16 bit
        "native_16k.dcm": _save(_image(BIG, BIG, frames=100, bits=16), folder / "native_16k.dcm",
                                ExplicitVRLittleEndian, b"\x00" * 4, False),
    }
    # deflated data set: 64 x 64 declared, but a 600 MB private element inflates at read time
    (folder / "deflate_600mb.dcm").write_bytes(_deflate_bomb(600))
    out["deflate_600mb.dcm"] = folder / "deflate_600mb.dcm"
    return out


def write_normal(folder: Path) -> int:
    """Real files that must still load: demo phantom MR + pydicom test files (RLE, J2K, CT)."""
    build_demo_hospitals(folder / "demo", 1, matrix=32)
    for name in ("CT_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                 "JPEG2000.dcm", "SC_rgb_rle.dcm"):
        shutil.copyfile(get_testdata_file(name), folder / name)
    return len([p for p in folder.rglob("*") if p.is_file()])


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_bombs(tmp_path_factory.mktemp("bombs"))


@pytest.fixture()
def no_decode(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any call into a pixel decoder fails the scan's file as 'undecodable' (and is recorded)."""
    calls: list[str] = []

    def refuse(ds: Dataset) -> np.ndarray:
        calls.append(str(ds.get("SOPInstanceUID", "")))
        raise AssertionError("decoder called for a bomb")

    monkeypatch.setattr(dicom.pixels, "decode_frames", refuse)  # where decode_dataset calls it
    return calls


@pytest.mark.parametrize("name", ["j2k_16k.dcm", "j2k_16k_2frames.dcm", "j2k_lying_header.dcm",
                                  "rle_16k.dcm", "jpeg_16k.dcm", "native_16k.dcm",
                                  "deflate_600mb.dcm"])
def test_each_bomb_is_too_large_before_any_decode(bombs: dict[str, Path], tmp_path: Path,
                                                  no_decode: list[str], name: str) -> None:
    folder = tmp_path / "site"
    folder.mkdir()
    shutil.copyfile(bombs[name], folder / name)
    shutil.copyfile(get_testdata_file("CT_small.dcm"), folder / "ok.dcm")
    items = list(dicom.iter_files(folder, DicomSettings()))
    reasons = {i[0]: i[1] for i in items if isinstance(i, tuple)}
    assert reasons[name] == TOO_LARGE
    assert len(no_decode) == 1  # only ok.dcm reached the decoder (and was refused by the stub)
    assert bombs[name].stat().st_size < 1 << 20  # a few kB on disk (deflate: 600 kB)


def test_bombs_counted_in_the_report(bombs: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "site"
    folder.mkdir()
    for name, path in bombs.items():
        shutil.copyfile(path, folder / name)
    shutil.copyfile(get_testdata_file("CT_small.dcm"), folder / "ok.dcm")
    rep = scan_folder(folder, DicomSettings(image_size=32)).report
    assert rep.usable_files == 1
    assert rep.skipped == {TOO_LARGE: len(bombs)}
    assert rep.counts()["skipped_too_large"] == len(bombs)
    assert "too-large" in rep.summary()


def test_budget_is_the_hospital_setting(tmp_path: Path) -> None:
    folder = tmp_path / "site"
    folder.mkdir()
    shutil.copyfile(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")  # 128 x 128 x 16 bit
    assert dicom.declared_decoded_bytes(pydicom.dcmread(folder / "ct.dcm")) == 128 * 128 * 2
    assert scan_folder(folder, DicomSettings()).report.usable_files == 1
    tight = DicomSettings(max_decoded_mb=(128 * 128 * 2 - 1) / 1024 / 1024)
    with pytest.raises(dicom.NoUsableDicomError, match="too-large 1"):
        scan_folder(folder, tight)
    assert DicomSettings().fingerprint() != tight.fingerprint()  # a cache key per budget
    with pytest.raises(ValueError):
        DicomSettings(max_decoded_mb=0)


def test_hospital_setting_parsed_and_passed_to_the_scan(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    assert HospitalSettings.from_mapping({"data-dir": "x"}).max_decoded_mb == 256.0
    h = HospitalSettings.from_mapping({"data-dir": str(tmp_path), "max-decoded-mb": "64"})
    assert h.max_decoded_mb == 64.0
    assert HospitalSettings.from_mapping(h.to_node_config()) == h
    for bad in ("0", "-1", "lots", "inf"):
        with pytest.raises(SettingsError, match="max-decoded-mb"):
            HospitalSettings.from_mapping({"data-dir": "x", "max-decoded-mb": bad})

    from client import datasets
    from shared_models import ModelConfig

    seen: list[DicomSettings] = []

    def fake_load(folder: Path, settings: DicomSettings, cache_dir: Path | None) -> None:
        seen.append(settings)
        raise RuntimeError("stop here")

    monkeypatch.setattr(datasets, "load_slices", fake_load)
    with pytest.raises(RuntimeError, match="stop here"):
        datasets.local_data(h, ModelConfig())
    assert seen[0].max_decoded_mb == 64.0


def test_cli_scan_budget_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedsynth.cli import main

    folder = tmp_path / "site"
    folder.mkdir()
    shutil.copyfile(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    shutil.copyfile(get_testdata_file("MR_small.dcm"), folder / "mr.dcm")  # 64 x 64 x 16 bit
    assert main(["data", "scan", str(folder), "--json", "--max-decoded-mb", "0.01"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["skipped"] == {"too-large": 1} and out["counts"]["skipped_too_large"] == 1
    assert main(["data", "scan", str(folder)]) == 0
    assert "too-large" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- syntaxes


@pytest.mark.parametrize("tsyntax", ["1.2.826.0.1.3680043.99.1.2",  # a private syntax
                                     "1.2.840.10008.1.2.4.102"])  # H.264: no size bound here
def test_a_syntax_without_a_size_bound_is_refused(tmp_path: Path, no_decode: list[str],
                                                  tsyntax: str) -> None:
    """Not merely unbounded: the scan skips it as undecodable before any decoder runs, and the
    reason's detail names the file and the syntax."""
    assert tsyntax not in dicom.budget.SIZE_BOUNDS
    folder = tmp_path / "site"
    folder.mkdir()
    ds = _image(64, 64)
    ds.file_meta.TransferSyntaxUID = tsyntax
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    path = folder / "odd.dcm"
    ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
    shutil.copyfile(get_testdata_file("CT_small.dcm"), folder / "ok.dcm")
    reasons = {i[0]: i[1] for i in dicom.iter_files(folder, DicomSettings()) if isinstance(i, tuple)}
    assert reasons["odd.dcm"] == dicom.UNDECODABLE
    assert len(no_decode) == 1  # only ok.dcm reached the decoder
    ds = pydicom.dcmread(path)
    with pytest.raises(dicom.Skip) as info:
        dicom.check_pixel_budget(ds, DicomSettings().max_decoded_bytes, path)
    assert info.value.reason == dicom.UNDECODABLE
    assert str(path) in info.value.detail and tsyntax in info.value.detail
    assert "no decoded-size bound" in info.value.detail


def test_every_syntax_pydicom_decodes_has_a_size_bound() -> None:
    """The table refuses only what could not be decoded anyway (no file lost to it)."""
    from pydicom.pixels import get_decoder

    for tsyntax in pydicom.uid.AllTransferSyntaxes:
        try:
            available = get_decoder(tsyntax).is_available
        except NotImplementedError:
            continue
        if available:
            assert tsyntax in dicom.budget.SIZE_BOUNDS, tsyntax.name


# ----------------------------------------------------------------------------- memory

_CHILD = r"""
import json, sys, warnings, logging
warnings.simplefilter("ignore")
logging.disable(logging.CRITICAL)
from client.dicom import DicomSettings, scan_folder
res = scan_folder(sys.argv[1], DicomSettings(image_size=32, min_size=1))
# VmHWM: this process's own peak (ru_maxrss would carry the forking parent's peak over exec)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(json.dumps({"skipped": dict(res.report.skipped_files), "usable": res.report.usable_files,
                  "maxrss_mb": int(hwm) / 1024}))
"""

MEMORY_BOUND_MB = 400  # the bomb folder's scan may peak at most this much above the baseline


def _scan_child(folder: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(folder)], cwd=REPO, text=True,
                          capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_scan_of_bombs_stays_within_memory_bound(bombs: dict[str, Path], tmp_path: Path) -> None:
    normal, mixed = tmp_path / "normal", tmp_path / "mixed"
    n_normal = write_normal(normal)
    shutil.copytree(normal, mixed)
    for name, path in bombs.items():
        shutil.copyfile(path, mixed / name)
    baseline = _scan_child(normal)
    with_bombs = _scan_child(mixed)
    print(f"peak RSS: normal files {baseline['maxrss_mb']:.0f} MB, with bombs "
          f"{with_bombs['maxrss_mb']:.0f} MB")
    assert with_bombs["maxrss_mb"] < baseline["maxrss_mb"] + MEMORY_BOUND_MB
    # the normal files still load (the demo folder also holds a non-image or two)
    assert with_bombs["usable"] == baseline["usable"] >= n_normal - 2
    assert with_bombs["skipped"] == {**baseline["skipped"], **{n: TOO_LARGE for n in bombs}}
