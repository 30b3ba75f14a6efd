"""``fedsynth data scan DIR``: what a hospital's folder holds, before anything is trained.

Runs entirely on the hospital's machine: the listing names local files, studies and
series for the hospital's own staff; nothing is sent anywhere.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="inspect a hospital's DICOM folder")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    scan = data_sub.add_parser("scan", help="what is usable for training, and why the rest is skipped")
    scan.add_argument("folder", type=Path, help="folder of DICOM files (searched recursively)")
    scan.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    scan.add_argument("--image-size", type=int, default=64)
    scan.add_argument("--modality", action="append", default=[], help="keep only this modality (repeatable)")
    scan.add_argument("--body-part", action="append", default=[], help="keep only this body part (repeatable)")
    scan.add_argument("--series-pattern", default="", help="regular expression on SeriesDescription")
    scan.add_argument("--min-size", type=int, default=16, help="smallest rows/columns kept")
    scan.add_argument("--max-decoded-mb", type=float, default=256.0,
                      help="skip a file whose pixels would decode to more MB (too-large); "
                           "the hospital setting max-decoded-mb")
    scan.add_argument("--mask-labels", default="",
                      help="count masks of these labels only (comma separated, the run's "
                           "mask-labels; default: every segment label found)")
    scan.add_argument("--mask-label-patterns", default="",
                      help="one regular expression per mask label, ';' separated")
    scan.set_defaults(func=run_scan)
    lesions = data_sub.add_parser(
        "make-lesions", help="write the labelled lesion data set (cyst, metastasis, haemangioma "
                             "in MR and CT slices, with DICOM SEG masks) from packaged data")
    lesions.add_argument("out_dir", type=Path, help="folder to write hospital-N/ into")
    lesions.add_argument("--seed", type=int, default=0)
    lesions.add_argument("--matrix", type=int, default=64, help="rows and columns of each slice")
    lesions.add_argument("--scale", type=float, default=1.0,
                         help="multiply every hospital's slice count (120, 120, 120 and 16)")
    lesions.add_argument("--no-real", action="store_true",
                         help="phantom backgrounds only (no pydicom / pydicom-data slices)")
    lesions.add_argument("--no-seg", action="store_true", help="do not write the DICOM SEG masks")
    lesions.set_defaults(func=run_make_lesions)


def report_dict(report) -> dict:  # type: ignore[no-untyped-def]
    """The full local report as plain JSON-able data."""
    studies: dict[str, list[dict]] = {}
    for s in report.series:
        studies.setdefault(s.study_uid, []).append(
            {"series_uid": s.series_uid, "modality": s.modality, "description": s.description,
             "size": s.size, "files": s.files, "slices": s.slices})
    return {
        "folder": report.folder_name,
        "files_seen": report.files_seen,
        "usable_files": report.usable_files,
        "slices": report.slices,
        "usable_by_modality": report.usable_by_modality,
        "usable_by_size": report.usable_by_size,
        "studies": [{"study_uid": k, "series": v} for k, v in sorted(studies.items())],
        "skipped": report.skipped,
        "skipped_files": [{"file": f, "reason": r} for f, r in report.skipped_files],
        "counts": report.counts(),
    }


def masks_dict(masks) -> dict:  # type: ignore[no-untyped-def]
    """What the segmentation files gave (client.segmentation.MaskReport), JSON-able."""
    return {"summary": masks.summary(), "slices_by_label": masks.slices_by_label,
            "unmatched": masks.unmatched,
            "unmatched_files": [{"file": f, "reason": r} for f, r in masks.unmatched_files],
            "counts": masks.counts()}


_MASK_HINTS = {
    "no-matching-image": "it references no image of this folder (SOP instance / frame of "
                         "reference): are its images elsewhere, or filtered out?",
    "no-wanted-label": "none of its segments matches the run's mask-labels",
    "grid-mismatch": "its frames are not the size of the images they reference",
    "malformed": "its references or frames do not add up (highdicom refuses it)",
    "too-large": "raise --max-decoded-mb if it is a real segmentation",
}


def _print_masks(masks) -> None:  # type: ignore[no-untyped-def]
    print(f"masks: {masks.summary()}")
    for rel, reason in masks.unmatched_files:
        print(f"  unmatched segmentation {reason:18s} {rel}")
    for reason, n in sorted(masks.unmatched.items()):
        print(f"note: {n} {reason}: {_MASK_HINTS.get(reason, '')}")


def _print_text(report) -> None:  # type: ignore[no-untyped-def]
    print(f"{report.folder_name}: {report.summary()}")
    print("usable slices by modality: " + (", ".join(
        f"{m} {n}" for m, n in sorted(report.usable_by_modality.items())) or "none"))
    print("usable slices by size: " + (", ".join(
        f"{s} {n}" for s, n in sorted(report.usable_by_size.items())) or "none"))
    studies: dict[str, list] = {}
    for s in report.series:
        studies.setdefault(s.study_uid, []).append(s)
    for i, (study, series) in enumerate(sorted(studies.items()), start=1):
        print(f"study {i} ({study}): {len(series)} series")
        for s in series:
            print(f"  {s.modality:3s} {s.size:>9s} {s.slices:5d} slices in {s.files:4d} files  "
                  f"{s.description or '(no description)'}")
    if report.skipped_files:
        print("skipped files:")
        for rel, reason in report.skipped_files:
            print(f"  {reason:22s} {rel}")
    hints = {"too-large": "raise --max-decoded-mb (hospital setting max-decoded-mb) if they are real images",
             "unreadable": "the scanning user cannot read them (permissions or I/O errors)",
             "unreadable-folder": "the scanning user cannot list them: their files were not seen",
             "outside-data-dir": "symlinks leading outside the data folder are not followed",
             "not-a-file": "FIFOs, sockets, devices and dangling links are never opened"}
    for reason, hint in hints.items():
        if report.skipped.get(reason):
            print(f"note: {report.skipped[reason]} {reason}: {hint}")


def run_scan(args: argparse.Namespace) -> int:
    from client.dicom import DicomSettings, NoUsableDicomError, scan_folder
    from fedsynth.errors import UserError

    if not args.verbose:  # every skip is reported below; pydicom's decoder tracebacks are noise here
        logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    try:
        settings = DicomSettings(image_size=args.image_size, modalities=tuple(args.modality),
                                 body_parts=tuple(args.body_part), series_pattern=args.series_pattern,
                                 min_size=args.min_size, max_decoded_mb=args.max_decoded_mb)
        result = scan_folder(args.folder, settings)
        masks = None
        if result.report.segmentation_files:
            from client.segmentation import LabelRule, load_masks

            rule = LabelRule.from_config(args.mask_labels, args.mask_label_patterns)
            masks = load_masks(args.folder, result, settings, rule).report
    except NoUsableDicomError as exc:
        raise UserError(str(exc)) from exc
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    if args.json:
        out = report_dict(result.report)
        if masks is not None:
            out["masks"] = masks_dict(masks)
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        _print_text(result.report)
        if masks is not None:
            _print_masks(masks)
    return 0


def run_make_lesions(args: argparse.Namespace) -> int:
    from fedsynth.errors import UserError
    from fedsynth.lesion_data import build_lesion_hospitals, manifest, run_snippet

    if args.matrix < 16 or args.scale <= 0:
        raise UserError("--matrix must be >= 16 and --scale > 0")
    paths = build_lesion_hospitals(args.out_dir, seed=args.seed, matrix=args.matrix,
                                   scale=args.scale, include_real=not args.no_real,
                                   write_seg=not args.no_seg)
    for h in manifest(args.out_dir)["hospitals"]:
        counts = ", ".join(f"{c} {n}" for c, n in h["class_counts"].items())
        print(f"{h['name']}: {h['modality']}{' (small)' if h['small'] else ''}, "
              f"{len(h['files'])} slices: {counts}")
    print(f"{len(paths)} hospitals in {args.out_dir}; the run's label rule, for the launch file:")
    print(run_snippet())
    return 0
