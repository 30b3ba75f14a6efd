"""Class-faithful conditioning: how the cdcgan carries its class, side by side at one budget.

Data: the lesion data set of ``bench.utility`` (four hospitals, cyst / metastasis / haemangioma,
every 4th slice held out), centralized on the POOLED training slices: this compares conditioning
mechanisms, not federation (the federated bars are ``make bench-utility``'s). Every variant takes
the same ``--steps`` optimiser steps of ``--batch`` images (per-class generators share them: each
of the K generators takes steps / K, the same compute), the same seed and DiffAugment policy.

Variants (``ModelConfig.conditioning`` / ``TrainConfig.class_balanced``):

- ``projection``: z ++ one-hot, projection discriminator on D's last features (the baseline);
- ``acgan``: + an auxiliary classifier on D's features (Odena et al. 2017);
- ``cbn``: + class-conditional batch norm in G (de Vries et al. 2017);
- ``multiscale``: + projection at every stage of D;
- ``balanced``: projection with class-balanced batches at the hospital;
- ``per-class``: one unconditional DCGAN per class, as Frid-Adar et al. 2018 trained them;
- combinations of the above.

Scores, on the pooled held-out real slices: intended-class accuracy (a classifier trained on the
pooled real training slices reads ``--per-class`` generated slices of each class; balanced
accuracy against the class asked for) beside the same classifier's balanced accuracy on the
held-out real slices; TSTR (a classifier trained on the synthetic slices only) / pooled-real;
FRD of the synthetic slices against the held-out ones. Last line: each variant's intended-class
ratio, then TSTR ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from bench.utility import UtilityConfig, load
from fedsynth.lesion_data import CLASSES
from fedsynth.utility import ClassifierBudget, class_balanced_labels, concat, fidelity
from shared_models import ModelConfig, StepContext, TrainConfig, get_family
from shared_models.downstream import intended_class_accuracy, train_and_score, train_classifier
from shared_models.small_data import SmallData

log = logging.getLogger("bench.conditioning")

# variant -> (model conditioning, class-balanced batches, per-class generators)
VARIANTS: dict[str, tuple[str, bool, bool]] = {
    "projection": ("projection", False, False),
    "acgan": ("projection,acgan", False, False),
    "cbn": ("projection,cbn", False, False),
    "multiscale": ("projection,multiscale", False, False),
    "balanced": ("projection", True, False),
    "per-class": ("projection", False, True),
    "acgan+cbn": ("projection,acgan,cbn", False, False),
    "acgan+cbn+multiscale": ("projection,acgan,cbn,multiscale", False, False),
    "acgan+cbn+multiscale+balanced": ("projection,acgan,cbn,multiscale", True, False),
}


@dataclass(frozen=True)
class Budget:
    steps: int = 1500
    batch: int = 32
    width: int = 32
    lr: float = 2e-4
    augment: str = "translation,cutout"
    per_class: int = 64
    seed: int = 0


def _train(model: ModelConfig, train: TrainConfig, data: Mapping[str, torch.Tensor],
           steps: int, balanced: bool, seed: int) -> dict[str, nn.Module]:
    family = get_family(model.family)
    torch.manual_seed(seed)
    nets = family.build(model)
    opts = family.optimizers(nets, train)
    ctx = StepContext(small_data=SmallData.from_train(train))
    torch.manual_seed(seed * 1009 + 7)
    for _ in range(steps):
        family.train_step(family.draw(data, train.batch_size, balanced), nets, opts, ctx)
    for net in nets.values():
        net.eval()
    return nets


@torch.no_grad()
def _sample(model: ModelConfig, nets: Mapping[str, nn.Module], labels: torch.Tensor,
            seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 4242)
    z = torch.randn(len(labels), model.latent_dim, generator=gen)
    family = get_family(model.family)
    return family.sample(dict(nets), z, labels if model.num_classes else None
                         ).float().clamp(-1, 1)


def synthetic_set(variant: str, b: Budget, pooled: Mapping[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    conditioning, balanced, per_class = VARIANTS[variant]
    train = TrainConfig(batch_size=b.batch, lr_g=b.lr, lr_d=b.lr, seed=b.seed,
                        augment=b.augment, class_balanced=balanced)
    labels = class_balanced_labels(b.per_class, len(CLASSES))
    if not per_class:
        model = ModelConfig(family="cdcgan", image_size=pooled["image"].shape[-1], width=b.width,
                            num_classes=len(CLASSES), conditioning=conditioning)
        nets = _train(model, train, pooled, b.steps, balanced, b.seed)
        return {"image": _sample(model, nets, labels, b.seed), "label": labels}
    model = ModelConfig(family="dcgan", image_size=pooled["image"].shape[-1], width=b.width)
    images = []
    for k in range(len(CLASSES)):
        own = {"image": pooled["image"][pooled["label"] == k]}
        nets = _train(model, train, own, b.steps // len(CLASSES), False, b.seed + k)
        images.append(_sample(model, nets, labels[labels == k], b.seed + k))
    return {"image": torch.cat(images), "label": labels}


def run(b: Budget, variants: list[str]) -> dict[str, Any]:
    train, held = load(UtilityConfig(seed=b.seed, image_size=32))
    pooled = concat(*train)
    clf_budget = ClassifierBudget()
    real = train_and_score(pooled, held, len(CLASSES), b.seed * 31 + 1, clf_budget)
    reader = train_classifier(pooled, len(CLASSES), b.seed * 31 + 1, clf_budget)
    rows: dict[str, dict[str, Any]] = {}
    for v in variants:
        t0 = time.perf_counter()
        syn = synthetic_set(v, b, pooled)
        t_gan = time.perf_counter() - t0
        intended, per = intended_class_accuracy(reader, syn, len(CLASSES))
        tstr = train_and_score(syn, held, len(CLASSES), b.seed * 31 + 1, clf_budget)
        fid = fidelity(held["image"], syn["image"])
        rows[v] = {"intended": intended, "intended_per_class": per, "tstr": tstr["bacc"],
                   "frd": fid["frd"], "precision": fid["precision"],
                   "coverage": fid["coverage"], "gan_seconds": t_gan,
                   "load": os.getloadavg()[0]}
        log.warning("%s: %s", v, rows[v])
    return {"real_bacc": real["bacc"], "rows": rows}


def report(b: Budget, result: Mapping[str, Any], seconds: float, load0: float) -> list[str]:
    real = result["real_bacc"]
    out = [f"conditioning at one budget: lesion data seed {b.seed}, 32 px, pooled training slices "
           f"(centralized), {b.steps} steps x batch {b.batch}, width {b.width}, lr {b.lr:g}, "
           f"augment {b.augment or 'off'}, {b.per_class} generated per class; {seconds:.0f} s, "
           f"load average {load0:.2f} at start",
           f"real-slice classifier on held-out real slices: balanced accuracy {real:.3f}",
           "| variant | intended-class accuracy | / real | per class (" + ", ".join(CLASSES)
           + ") | TSTR / pooled | FRD | precision | coverage | GAN s | load |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for v, r in result["rows"].items():
        per = ", ".join(f"{x:.2f}" for x in r["intended_per_class"])
        out.append(f"| {v} | {r['intended']:.3f} | {r['intended'] / real:.3f} | {per} | "
                   f"{r['tstr'] / real:.3f} | {r['frd']:.1f} | {r['precision']:.2f} | "
                   f"{r['coverage']:.2f} | {r['gan_seconds']:.0f} | {r['load']:.2f} |")
    out.append("; ".join(f"{v} {r['intended'] / real:.3f} {r['tstr'] / real:.3f}"
                         for v, r in result["rows"].items()))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Budget()
    for name in ("steps", "batch", "width", "per_class", "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--augment", default=d.augment)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    b = replace(d, **{k: getattr(args, k) for k in ("steps", "batch", "width", "per_class",
                                                     "seed", "lr", "augment")})
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    result = run(b, args.variants)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    for line in report(b, result, time.perf_counter() - t0, load0):
        print(line)


if __name__ == "__main__":
    main()
