"""``fedsynth audit CHECKPOINT DATA_DIR``: a memorisation audit at the hospital.

Draws ``--n`` images from the checkpoint (generation families: fixed-seed noise; translation
families: translations of the hospital's held-out domain-A slices; maskgan: the images it draws
for the hospital's held-out masks) and compares them with that hospital's training and held-out
slices (maskgan: its images) (the split the hospital trains with: every
``--holdout-every``-th slice held out, as its ``holdout-every`` setting) with
``shared_models.audit``: nearest-neighbour distances in pixel, SSIM and feature space, their
train / held-out ratio and the near-copies. Prints a table, or ``--json`` the scalars. Nothing
is written or sent anywhere; run it where the data is.

For a translation family (maskgan included) the held-out targets are the translated inputs' own
pairs, so its
"to held-out" distances are small by design and the ratio leans above 1: the near-copy count
(a translation closer to a training target than any held-out target is) is the measure to read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fedsynth.export_gate import add_data_options, draw, hospital_split


def register(sub: argparse._SubParsersAction) -> None:
    from shared_models.config import SSIM_THRESHOLD

    p = sub.add_parser(
        "audit", help="memorisation audit: generated images vs this hospital's training slices",
        description="Compare images drawn from CHECKPOINT with the training and held-out slices "
                    "of DATA_DIR (at this hospital; nothing leaves): nearest-neighbour distances, "
                    "train/held-out ratio and near-copies of training slices.")
    p.add_argument("checkpoint", type=Path, help="checkpoint .npz written by a federated run")
    p.add_argument("data_dir", type=Path, help="the hospital's DICOM folder (its data-dir)")
    add_data_options(p)
    p.add_argument("--n", type=int, default=64, help="images to draw and audit (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ssim-threshold", type=float, default=SSIM_THRESHOLD,
                   help=f"SSIM at or above which a closest-ever image is a near-copy "
                        f"(default {SSIM_THRESHOLD})")
    p.add_argument("--json", action="store_true", help="print the scalars as JSON")
    p.set_defaults(func=run)








def run(args: argparse.Namespace) -> int:
    import torch

    from fedsynth.errors import UserError
    from shared_models.audit import audit, table

    from fedsynth.generation import load_generator

    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    try:
        family, nets, meta = load_generator(args.checkpoint)
        cfg, data = meta["_config"], meta["_data"]
        train, held, local = hospital_split(args.data_dir, cfg, data, args.holdout_every,
                                            args.modalities)
        images = draw(family, nets, cfg, args.n, args.seed, local)
        result = audit(torch.from_numpy(images), train, held, args.ssim_threshold)
    except ValueError as exc:  # includes the DICOM reader's "no usable slice" errors
        raise UserError(str(exc)) from exc
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint.name, "family": str(meta["family"]),
                          "round": int(meta.get("round", 0)), **result.scalars()}, indent=2))
    else:
        print(f"memorisation audit of {args.checkpoint.name} ({meta['family']}, round "
              f"{int(meta.get('round', 0))})")
        print(table(result))
    return 0




