"""``fedsynth sample CHECKPOINT``: draw images from a trained generator, as PNG or synthetic DICOM."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("fedsynth.sample")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate images from a checkpoint")
    p.add_argument("checkpoint", type=Path, help="checkpoint .npz written by a federated run")
    p.add_argument("--n", type=int, default=16, help="number of images")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--format", choices=("png", "dicom"), default="png")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def load_generator(path: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(family, nets, meta) from a checkpoint; ValueError with one line on any problem."""
    from server.run_folder import load_checkpoint
    from shared_models import ModelConfig, decode_into, get_family

    if not path.is_file():
        raise ValueError(f"checkpoint '{path}' does not exist")
    try:
        arrays, meta = load_checkpoint(path)
    except Exception as exc:
        raise ValueError(f"checkpoint '{path}' is not a fedsynth checkpoint: "
                         f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(meta, dict) or "family" not in meta or "model" not in meta:
        raise ValueError(f"checkpoint '{path}' has no 'family'/'model' metadata")
    try:
        family = get_family(str(meta["family"]))
        cfg = ModelConfig(**meta["model"])
        nets = family.build(cfg)
        decode_into(nets, arrays, strict_components=("generator",) if "generator" in nets else ())
    except Exception as exc:
        raise ValueError(f"checkpoint '{path}' does not fit its model: {exc}") from exc
    meta["_config"] = cfg
    return family, nets, meta


def generate(family: Any, nets: dict[str, Any], cfg: Any, n: int, seed: int) -> np.ndarray:
    """``n`` samples in [-1, 1] from fixed-seed noise."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, cfg.latent_dim, generator=gen)
    labels = None
    if cfg.num_classes > 0:
        labels = torch.arange(n) % cfg.num_classes
    images = family.sample(nets, noise, labels) if labels is not None else family.sample(nets, noise)
    return images.detach().float().clamp(-1.0, 1.0).cpu().numpy()


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
    cfg = meta.pop("_config")
    images = generate(family, nets, cfg, args.n, args.seed)
    if args.format == "png":
        paths = write_png(images, args.out)
    else:
        prov = Provenance(family=str(meta["family"]), round=int(meta.get("round", 0)),
                          model=asdict(cfg), checkpoint=args.checkpoint.name)
        paths = write_dicom(images, args.out, prov)
    print(f"wrote {len(paths)} {args.format} files to {args.out}")
    return 0
