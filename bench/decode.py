"""DICOM decode benchmark: ``python -m bench.decode``.

Measures, in one run and on the same files:

- ``plain``: a bare pydicom loop (``dcmread`` + ``pixel_array`` per file, errors ignored),
  the floor any DICOM reader pays;
- ``scan``: :func:`client.dicom.scan_folder` (header checks, decode, modality units,
  normalisation, resize) -- the first pass of a hospital;
- ``cached``: a training epoch from the cache (:func:`client.cache.load_slices` hit plus
  touching every slice) against the first pass (``load_slices`` miss: scan + cache write).

The corpus is three demo hospitals (phantom MR series + real clinical files) plus every
file of pydicom's and pydicom-data's test sets, copied into one temporary folder. Each
timing is the best of ``--repeat`` interleaved runs (the machine is shared). Prints
``name: value`` lines.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def corpus_files() -> list[Path]:
    """Every regular file of pydicom's test data and of pydicom-data."""
    import pydicom.data as pdata

    roots = {Path(pdata.__file__).parent / "test_files"}
    liver = pdata.get_testdata_file("liver.dcm")  # lives in pydicom-data's folder
    if liver:
        roots.add(Path(liver).parent)
    files = {Path(f) for f in pdata.get_testdata_files() if Path(f).is_file()}
    for root in roots:
        files |= {p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    return sorted(files)


def build_corpus(dest: Path, hospitals: int = 3) -> Path:
    """Demo hospitals + pydicom test files under ``dest/corpus``."""
    from fedsynth.demo_data import build_demo_hospitals

    root = dest / "corpus"
    build_demo_hospitals(root / "demo", hospitals)
    test_dir = root / "pydicom"
    test_dir.mkdir(parents=True)
    for i, f in enumerate(corpus_files()):
        shutil.copyfile(f, test_dir / f"{i:03d}_{f.name}")
    return root


def plain_loop(files: list[Path]) -> int:
    """Frames decoded by dcmread + pixel_array; failures skipped like any careful script would."""
    import pydicom

    frames = 0
    for f in files:
        try:
            arr = pydicom.dcmread(f).pixel_array
        except Exception:
            continue
        n = 1
        if arr.ndim == 4 or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            n = arr.shape[0]
        frames += n
    return frames


def _best(fn, repeat: int) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--hospitals", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import pydicom  # noqa: F401  (its import sets its logger level; override after)

    logging.getLogger("pydicom").setLevel(logging.CRITICAL)  # broken test files log tracebacks
    warnings.simplefilter("ignore")  # pydicom warns about the deliberately broken test files

    from client.cache import load_slices
    from client.dicom import DicomSettings, list_candidate_files, scan_folder

    settings = DicomSettings(image_size=args.image_size)
    with tempfile.TemporaryDirectory(prefix="fedsynth-bench-") as tmp:
        corpus = build_corpus(Path(tmp), args.hospitals)
        files = list_candidate_files(corpus)
        for f in files:  # warm the page cache so neither side pays the first disk read
            f.read_bytes()

        plain_s = scan_s = float("inf")
        plain_n = scan_n = 0
        for _ in range(args.repeat):  # interleaved: both see the same machine load
            t, plain_n = _best(lambda: plain_loop(files), 1)
            plain_s = min(plain_s, t)
            t, result = _best(lambda: scan_folder(corpus, settings), 1)
            scan_s = min(scan_s, t)
            scan_n = result.report.slices

        first_s = cached_s = float("inf")
        for i in range(args.repeat):
            cache_dir = Path(tmp) / f"cache-{i}"
            t, first = _best(lambda: load_slices(corpus, settings, cache_dir), 1)
            first_s = min(first_s, t)

            def epoch() -> float:
                hit = load_slices(corpus, settings, cache_dir)
                return float(np.asarray(hit.images, dtype=np.float32).sum())  # touch every slice

            t, _ = _best(epoch, 1)
            cached_s = min(cached_s, t)
        n_first = first.report.slices  # type: ignore[union-attr]

    plain_rate, scan_rate = plain_n / plain_s, scan_n / scan_s
    first_rate, cached_rate = n_first / first_s, n_first / cached_s
    print(f"files: {len(files)}")
    print(f"image_size: {args.image_size}")
    print(f"plain_slices: {plain_n}")
    print(f"plain_seconds: {plain_s:.3f}")
    print(f"plain_slices_per_s: {plain_rate:.1f}")
    print(f"scan_slices: {scan_n}")
    print(f"scan_seconds: {scan_s:.3f}")
    print(f"scan_slices_per_s: {scan_rate:.1f}")
    print(f"scan_vs_plain_ratio: {scan_rate / plain_rate:.2f}")
    print(f"first_pass_seconds: {first_s:.3f}")
    print(f"first_pass_slices_per_s: {first_rate:.1f}")
    print(f"cached_epoch_seconds: {cached_s:.4f}")
    print(f"cached_epoch_slices_per_s: {cached_rate:.1f}")
    print(f"cached_vs_first_ratio: {cached_rate / first_rate:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
