"""``fedsynth sample CHECKPOINT``: draw images from a trained generator, as PNG or synthetic DICOM.

Generation families (dcgan, wgan-gp, cdcgan) draw ``--n`` images from fixed-seed noise; cdcgan
cycles through the run's classes, or draws one class with ``--class NAME`` (or its index).
Translation families (pix2pix, cyclegan) translate real slices: ``--input DICOM_DIR`` is read
with the hospital's own DICOM path (``client.dicom``, at the checkpoint's image size), its
slices of domain A are chosen with the run's data rules (the run folder's ``config.json``, else
the defaults) and translated A -> B (cyclegan: ``g_ab``). A DICOM translation names its input
only as "input slice k of N" and its modality; nothing of the input file's identity is copied.

Mask-conditioned models (maskgan) draw an image for each mask of ``--input DICOM_DIR``'s DICOM
SEG / RTSTRUCT files (the run's ``mask-labels``, read as a hospital reads them). A mask
generator (aae) draws masks from noise; with ``--stage2 MASKGAN_CHECKPOINT`` each drawn mask
gets its image (two-stage synthesis). ``--format dicom`` of either writes every synthetic image
with a DICOM SEG of its mask beside it (``fedsynth.seg_export``), both marked synthetic.

Normalisation statistics: see ``server.images.sample_images`` (``--norm-stats``). A checkpoint
whose BatchNorm statistics were never aggregated (FedBN keeps them at the hospitals) is sampled
with batch statistics by default.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from fedsynth.generation import (class_index, class_names, generate,  # noqa: F401 - the API
                                 load_generator, mask_inputs, run_config, translate,
                                 translation_inputs)

log = logging.getLogger("fedsynth.sample")



def register(sub: argparse._SubParsersAction) -> None:
    from server.images import NORM_STATS
    from shared_models.config import DOMAIN_ATTRIBUTES

    p = sub.add_parser(
        "sample", help="generate images from a checkpoint, or translate a DICOM folder with one",
        description="Generation checkpoints (dcgan, wgan-gp, cdcgan) draw --n images from noise; "
                    "translation checkpoints (pix2pix, cyclegan) need --input, a DICOM folder "
                    "whose domain-A slices they translate to domain B.")
    p.add_argument("checkpoint", type=Path, help="checkpoint .npz written by a federated run")
    p.add_argument("--n", type=int, default=16,
                   help="number of images (translation: at most this many input slices, evenly "
                        "spaced through the folder's domain-A slices)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--format", choices=("png", "dicom"), default="png",
                   help="png (a translation: input beside its translation) or synthetic DICOM")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class", dest="class_name", metavar="NAME",
                   help="conditional families (cdcgan): draw every image of this class, by name "
                        "from the run's class list or by index (default: cycle through them)")
    p.add_argument("--input", type=Path, metavar="DICOM_DIR",
                   help="translation families: the DICOM folder to translate (read as a "
                        "hospital reads its data; nothing is cached)")
    p.add_argument("--input-attribute", choices=DOMAIN_ATTRIBUTES, metavar="ATTRIBUTE",
                   help="with --input: the slice attribute domain A is read from in this folder, "
                        "one of " + ", ".join(DOMAIN_ATTRIBUTES)
                        + " (default: the run's domain-attribute)")
    p.add_argument("--input-pattern", metavar="REGEX",
                   help="with --input: this folder's regular expression for domain A (default: "
                        "the run's domain-a-pattern, else the domain's name)")
    p.add_argument("--stage2", type=Path, metavar="CHECKPOINT",
                   help="two-stage synthesis: with a mask generator checkpoint (aae), the "
                        "mask-conditioned checkpoint (maskgan) that draws each mask's image")
    p.add_argument("--norm-stats", choices=NORM_STATS, default="auto",
                   help="BatchNorm statistics: stored (the checkpoint's), batch (over the sampled "
                        "batch) or auto: batch when the stored ones were never trained, e.g. "
                        "under fedbn, where hospitals keep their norm layers (default)")
    p.add_argument("--audit", type=Path, metavar="DATA_DIR",
                   help="export gate, at the hospital: check every image against the training "
                        "slices of DATA_DIR (fedsynth audit) and never write a near-copy; DICOM "
                        "records the model's DP epsilon and the audit in its private block")
    from fedsynth.export_gate import add_data_options

    add_data_options(p)
    p.add_argument("--ssim-threshold", type=float, default=0.9,
                   help="with --audit: SSIM at or above which a closest-ever image is a "
                        "near-copy (default 0.9)")
    p.set_defaults(func=run)


def _apply_gate(args: argparse.Namespace, images: np.ndarray, notes: list[str] | None,
                cfg: Any, data: Any, run: dict, round_: int
                ) -> tuple[np.ndarray, list[str] | None, dict[str, Any] | None, np.ndarray]:
    """``--audit``: drop near-copies of the hospital's training slices (never written).

    Returns the images and notes kept, the privacy record for the DICOM and the keep mask."""
    if args.audit is None:
        return images, notes, None, np.ones(len(images), dtype=bool)
    from fedsynth.errors import UserError

    from fedsynth.export_gate import gate, model_epsilon

    try:
        keep, scalars = gate(images, args.audit, cfg, data, args.holdout_every,
                             args.modalities, args.ssim_threshold)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    refused = int((~keep).sum())
    if refused:
        log.warning("export gate: %d of %d images are near-copies of training slices of %s "
                    "and are not written", refused, len(images), args.audit)
    privacy = {**model_epsilon(args.checkpoint, round_, run), "audit": scalars}
    kept_notes = [n for n, k in zip(notes, keep) if k] if notes is not None else None
    return images[keep], kept_notes, privacy, keep


















def _labelled_dicom(images: np.ndarray, masks: np.ndarray, data: Any, out: Path, prov: Any,
                    prefix: str, notes: list[str], real_masks: bool = False) -> list[Path]:
    """Each synthetic image (fedsynth.export) with a DICOM SEG of its mask beside it."""
    from fedsynth.export import write_dicom
    from fedsynth.seg_export import write_segs

    paths = write_dicom(images, out, prov, prefix=prefix, notes=notes)
    return paths + write_segs(paths, masks, data.mask_label_names, prov, real_masks=real_masks)


def _mask_grey(masks: np.ndarray) -> np.ndarray:
    """K-channel masks {0, 1} -> one grey image in [-1, 1]: label k at grey (k + 1) / K."""
    k = masks.shape[1]
    level = np.arange(1, k + 1, dtype=np.float32).reshape(1, k, *[1] * (masks.ndim - 2))
    return ((masks * level).max(1, keepdims=True) / max(k, 1) * 2.0 - 1.0).astype(np.float32)


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from fedsynth.errors import UserError
    from fedsynth.export import Provenance, write_dicom, write_png

    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    try:
        family, nets, meta = load_generator(args.checkpoint)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    cfg, data = meta.pop("_config"), meta.pop("_data")
    run_cfg = meta.pop("_run")
    name = str(meta["family"])
    prov = dict(family=name, round=int(meta.get("round", 0)), model=asdict(cfg),
                checkpoint=args.checkpoint.name)
    translation = family.task == "translation"
    masked = family.data_layout == "masked"
    if args.format == "dicom" and cfg.spatial_dims == 3 and (
            masked or args.stage2 is not None):
        raise UserError("labelled DICOM (image + SEG) is 2D only: a synthetic volume is a "
                        "multi-frame Secondary Capture without a frame of reference, which a "
                        "DICOM SEG cannot reference frame by frame; use --format png")
    if args.stage2 is not None and family.output != "mask":
        raise UserError(f"--stage2 follows a mask generator (aae); {name} draws no masks")
    if args.audit is not None and (masked or family.output == "mask"):
        # the gate compares generated slices with training slices; a mask-conditioned image is
        # pixel-aligned to its mask, which the gate does not audit: refuse rather than pass it
        raise UserError(f"--audit (the export gate) does not yet check {name} exports (mask "
                        "generators and mask-conditioned images); export without it only after "
                        "`fedsynth audit` at this hospital")

    if family.output == "mask":  # stage 1: masks from noise
        if args.input is not None or args.class_name is not None:
            raise UserError(f"{name} draws masks from noise: --input and --class do not apply")
        masks = generate(family, nets, cfg, args.n, args.seed, None, args.norm_stats)
        import torch

        labels = data.mask_labels
        if args.stage2 is None:
            if args.format == "dicom":
                raise UserError("masks alone are written as PNG; give --stage2 CHECKPOINT (a "
                                "maskgan) for synthetic images with their DICOM SEG")
            grey = _mask_grey(masks)
            paths = write_png(grey, args.out, prefix="mask")
            what = f"masks ({labels}) from the stage-1 model"
        else:
            try:
                fam2, nets2, meta2 = load_generator(args.stage2)
            except ValueError as exc:
                raise UserError(str(exc)) from exc
            cfg2 = meta2["_config"]
            if fam2.data_layout != "masked" or fam2.task != "translation":
                raise UserError(f"--stage2 '{args.stage2}' is a {meta2['family']} checkpoint, "
                                f"not a mask-conditioned one (maskgan)")
            if (cfg2.image_size, cfg2.spatial_dims, cfg2.num_classes) != (
                    cfg.image_size, cfg.spatial_dims, cfg.num_classes):
                raise UserError(
                    f"the stages do not fit: stage 1 draws {cfg.num_classes}-label masks of "
                    f"{cfg.image_size} px in {cfg.spatial_dims}D, stage 2 takes "
                    f"{cfg2.num_classes}-label masks of {cfg2.image_size} px in "
                    f"{cfg2.spatial_dims}D")
            images = translate(fam2, nets2, masks, args.norm_stats)
            what = f"two-stage samples: {name} masks ({labels}), {meta2['family']} images"
            if args.format == "png":
                shown = fam2.show_input(torch.from_numpy(masks)).numpy()
                paths = write_png(images, args.out, prefix="two-stage", inputs=shown)
            else:
                prov["translation"] = f"{name} mask ({labels}) -> {meta2['family']} image"
                notes = [f"two-stage synthetic: mask {i + 1} drawn by fedsynth {name}, image by "
                         f"{meta2['family']} ({args.stage2.name})" for i in range(len(images))]
                paths = _labelled_dicom(images, masks, data, args.out, Provenance(**prov),
                                        "two-stage", notes)
    elif masked:
        if args.class_name is not None:
            raise UserError(f"--class is for conditional generation; {name} draws images for "
                            f"masks")
        if args.input is None:
            raise UserError(f"checkpoint '{args.checkpoint}' is a {name} mask-conditioned model "
                            f"(labels {data.mask_labels}): give a DICOM folder whose SEG / "
                            f"RTSTRUCT masks it should draw images for with --input DICOM_DIR")
        try:
            masks, notes, total = mask_inputs(args.input, cfg, data, args.n)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        images = translate(family, nets, masks, args.norm_stats)
        what = f"images for {len(images)} of {total} masks ({data.mask_labels})"
        if args.format == "png":
            import torch

            shown = family.show_input(torch.from_numpy(masks)).numpy()
            paths = write_png(images, args.out, prefix="mask-synthetic", inputs=shown)
        else:
            # the mask is the hospital's own (real) segmentation; only the image is synthetic
            notes = [f"synthesised by fedsynth {name} from a {note}; the mask is a REAL "
                     "segmentation from the input folder, only the image is synthetic"
                     for note in notes]
            paths = _labelled_dicom(images, masks, data, args.out, Provenance(
                **prov, translation=f"mask ({data.mask_labels}) -> image"), "synthetic", notes,
                real_masks=True)
    elif translation:
        if args.class_name is not None:
            raise UserError(f"--class is for conditional generation; {name} translates images")
        if args.input is None:
            raise UserError(f"checkpoint '{args.checkpoint}' is a {name} translation model "
                            f"({data.domain_a} -> {data.domain_b}): give the DICOM folder whose "
                            f"{data.domain_a} slices it should translate with --input DICOM_DIR")
        try:
            inputs, notes, total = translation_inputs(args.input, cfg, data, args.n,
                                                      args.input_attribute, args.input_pattern)
        except ValueError as exc:  # NoUsableDicomError, DataSelectionError, settings
            raise UserError(str(exc)) from exc
        images = translate(family, nets, inputs, args.norm_stats)
        notes = [f"translated from {data.domain_a} by fedsynth {name} ({note})"
                 for note in notes]
        images, notes, privacy, keep = _apply_gate(args, images, notes, cfg, data, run_cfg,
                                                   prov["round"])
        inputs = inputs[keep]
        what = f"translations of {len(images)} of {total} {data.domain_a} inputs"
        if not len(images):
            paths = []
        elif args.format == "png":
            paths = write_png(images, args.out, prefix="translation", inputs=inputs)
        else:
            tag = f"{data.domain_a} -> {data.domain_b}"
            paths = write_dicom(images, args.out,
                                Provenance(**prov, translation=tag, privacy=privacy),
                                prefix="translation", notes=notes)
    else:
        if args.input is not None or args.input_attribute or args.input_pattern:
            raise UserError(f"--input is for translation checkpoints; {name} generates from noise")
        label, names = None, class_names(cfg, data)
        if args.class_name is not None:
            if cfg.num_classes == 0:
                raise UserError(f"--class is for conditional families (cdcgan); {name} has no "
                                f"classes")
            try:
                label, _ = class_index(cfg, data, args.class_name)
            except ValueError as exc:
                raise UserError(str(exc)) from exc
        images = generate(family, nets, cfg, args.n, args.seed, label, args.norm_stats)
        what = "samples"
        notes = None
        if cfg.num_classes:
            labels = [label if label is not None else i % cfg.num_classes
                      for i in range(len(images))]
            notes = [f"class {names[k]} (label {k})" for k in labels]
            what = (f"samples of class {names[label]}" if label is not None
                    else "samples of classes " + ", ".join(names) + " in turn")
        images, notes, privacy, keep = _apply_gate(args, images, notes, cfg, data, run_cfg,
                                                   prov["round"])
        if args.format == "png":
            paths = write_png(images, args.out) if len(images) else []
        else:
            paths = (write_dicom(images, args.out, Provenance(**prov, privacy=privacy),
                                 notes=notes) if len(images) else [])
    if args.audit is not None:
        print(f"export gate: {int((~keep).sum())} near-copies of training slices refused "
              "(not written)")
    print(f"wrote {len(paths)} {args.format} files to {args.out} ({what})")
    return 0
