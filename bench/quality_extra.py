"""Quality rows beyond pix2pix: CycleGAN (SSIM/PSNR/MAE) and DCGAN / conditional DCGAN (Fréchet, TSTR).

Same hospitals and compute budget as ``bench.quality`` (4 demo phantom hospitals with different
scanner profiles, each family's tensors as the hospital's ClientApp loads them, every 4th unit
held out, ``S = rounds x local_steps`` optimiser steps per hospital, centralized = ``S`` steps on
the pooled data at ``hospitals x batch`` images, alone = ``S`` steps on one hospital's data at
``batch`` images), and the same federation: ``run_federation`` over ``fedsynth.inprocess``'s Grid
to the real ClientApp, hospitals keeping their Adam state between rounds
(``bench.quality.KeptOptimizers``). Differences from ``bench.quality``:

- the family's own data layout (``client.datasets``): CycleGAN gets every training slice of
  each domain, drawn with independent indices (unpaired: the T1w/T2w pairing of the phantom is
  never used in training; the held-out pairs are only the ground truth of the score), DCGAN
  every slice of both contrasts, the conditional DCGAN the slices with their contrast as label;
  centralized and alone rows draw batches with ``family.draw`` as the ClientApp's trainer does;
- CycleGAN: ``sample(nets, a)`` = ``g_ab(a)``, scored against the true T2w with
  ``bench.quality._metrics`` (SSIM, PSNR, MAE on [0, 1]). ``fedmed-gan`` = both generators shared,
  both discriminators kept at each hospital.
- DCGAN (unconditional) learns the mixture of T1w and T2w slices; the conditional DCGAN
  (``num_classes=2``) learns them with the contrast as label (0 = T1w, 1 = T2w). Fréchet distance:
  ``shared_models.quality.FeatureNet`` (fixed random conv features, ``FEATURE_SEED``), between
  ``SAMPLES`` generated slices (half of each class for cdcgan) and the pooled held-out real slices
  (T1w and T2w). The held-out set is small (a few dozen slices for 176 feature dimensions), so the
  distance is biased upward; the row "reference: real training slices" (real vs real) is its floor.
- TSTR (cdcgan only): a tiny CNN (``SmallClassifier``) trained on ``SAMPLES`` generated slices with
  the labels they were generated with, tested on the held-out real slices with their true contrast.
  Chance is 0.5; "reference: train on real" trains it on the real training slices instead. Plain
  DCGAN samples carry no label, so it gets the Fréchet distance only.

Run: ``python -m bench.quality_extra`` (``--families``, ``--seeds``; default one seed).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from bench.quality import (BenchConfig, _metrics, federation_config, hospital_nets,
                           hospital_settings, load_hospital, mean_rows, run_federated)
from shared_models import ModelConfig, StepContext, TrainConfig, get_family
from shared_models.codec import decode_into
from shared_models.quality import (FeatureNet, frechet_distance, frechet_radiomics_distance,
                                   radiomics_features)
from shared_models.small_data import SmallData

log = logging.getLogger("bench.quality_extra")

FAMILIES = ("cyclegan", "dcgan", "cdcgan")
# row name -> preset, per family
VARIANTS: dict[str, dict[str, str]] = {
    "cyclegan": {"fedgan": "fedgan", "fedmed-gan (generators shared, D local)": "fedmed-gan"},
    "dcgan": {"fedgan": "fedgan", "local-d": "local-d"},
    "cdcgan": {"fedgan": "fedgan", "local-d": "local-d"},
}
UNTRAINED = "reference: untrained generator"
SAMPLES = 128  # generated slices per Fréchet / TSTR evaluation
Data = Mapping[str, torch.Tensor]
Nets = dict[str, nn.Module]


@dataclass(frozen=True)
class ExtraConfig:
    """Sizes of the extra rows; ``bench`` carries the shared split and budget."""

    bench: BenchConfig = BenchConfig(rounds=20, local_steps=5)
    lr_generation: float = 5e-4  # DCGAN-family learning rate (G and D)
    augment: str = ""  # DiffAugment policy of the generation rows (every row alike)

    def model(self, family: str) -> ModelConfig:
        b = self.bench
        return ModelConfig(family=family, image_size=b.image_size, width=b.width,
                           num_classes=2 if family == "cdcgan" else 0)

    def train_config(self, family: str) -> TrainConfig:
        b = self.bench
        lr = b.lr if family == "cyclegan" else self.lr_generation
        return TrainConfig(local_steps=b.local_steps, batch_size=b.batch, lr_g=lr, lr_d=lr,
                           seed=b.seed, augment="" if family == "cyclegan" else self.augment)


def family_data(family: str, cfg: ExtraConfig
                ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Per-hospital training data in ``family``'s batch keys, as each hospital's ClientApp loads
    it (cdcgan: ``label`` = the contrast, 0 = T1w, 1 = T2w), and the pooled held-out set."""
    loaded = [load_hospital(h, cfg.model(family)) for h in hospital_settings(cfg.bench)]
    return ([t for t, _ in loaded],
            {k: torch.cat([h[k] for _, h in loaded]) for k in loaded[0][1]})


class SmallClassifier(nn.Module):
    """T1w-vs-T2w contrast classifier for TSTR: two strided convs and a linear layer."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(16 * (image_size // 4) ** 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def tstr_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                  test_y: torch.Tensor, seed: int, steps: int = 150) -> float:
    """Accuracy on (test_x, test_y) of a ``SmallClassifier`` trained on (train_x, train_y)."""
    torch.manual_seed(seed)
    clf = SmallClassifier(train_x.shape[-1])
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(len(train_x), (min(32, len(train_x)),))
        loss = nn.functional.cross_entropy(clf(train_x[idx].float()), train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((clf(test_x.float()).argmax(1) == test_y).float().mean())


_RADIOMICS: dict[int, np.ndarray] = {}


def _held_radiomics(held: Data) -> np.ndarray:
    """The held-out slices' radiomic features, computed once per held-out set."""
    key = id(held["image"])
    if key not in _RADIOMICS:
        _RADIOMICS[key] = radiomics_features(held["image"])
    return _RADIOMICS[key]


def _features(x: torch.Tensor) -> np.ndarray:
    return FeatureNet()(x.float().clamp(-1, 1)).numpy().astype(np.float64)


@torch.no_grad()
def _generate(family, nets: Nets, model: ModelConfig, seed: int  # noqa: ANN001
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed + 4242)
    z = torch.randn(SAMPLES, model.latent_dim, generator=gen)
    labels = (torch.arange(SAMPLES) % 2).long() if model.num_classes else None
    return family.sample(nets, z, labels), labels


def score_nets(family_name: str, nets_list: Sequence[Nets], held: Data, model: ModelConfig,
               seed: int) -> dict[str, float]:
    """The family's metrics of each of ``nets_list``, averaged (one entry but for FedBN-like rows)."""
    family = get_family(family_name)
    scores = []
    for nets in nets_list:
        if family_name == "cyclegan":
            scores.append(_metrics(family.sample(nets, held["a"]), held["b"]))
            continue
        fake, labels = _generate(family, nets, model, seed)
        s = {"frechet": frechet_distance(_features(fake), _features(held["image"])),
             "frd": frechet_radiomics_distance(_held_radiomics(held), radiomics_features(fake))}
        if labels is not None:
            s["tstr"] = tstr_accuracy(fake, labels, held["image"], held["label"], seed)
        scores.append(s)
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}


def _train(family, nets: Nets, opts, data: Data, steps: int, batch: int,  # noqa: ANN001
           train: TrainConfig | None = None) -> None:
    # the same small-data settings (augment, r1-gamma) as the federated hospitals' trainer
    ctx = StepContext(small_data=SmallData.from_train(train) if train is not None else SmallData())
    for _ in range(steps):
        family.train_step(family.draw(data, batch), nets, opts, ctx)


def _solo(family_name: str, cfg: ExtraConfig, data: Data, batch: int) -> Nets:
    family, b = get_family(family_name), cfg.bench
    torch.manual_seed(b.seed)
    nets = family.build(cfg.model(family_name))
    opts = family.optimizers(nets, cfg.train_config(family_name))
    torch.manual_seed(b.seed * 1009 + 7)
    _train(family, nets, opts, data, b.steps, batch, cfg.train_config(family_name))
    return nets


def federated(family_name: str, preset: str, cfg: ExtraConfig) -> list[Nets]:
    """Train ``preset`` through ``run_federation`` and the real ClientApp; the nets to score.

    Returns the global model, or for a preset with local norm layers each hospital's own model.
    """
    family, b = get_family(family_name), cfg.bench
    model = cfg.model(family_name)
    fcfg = federation_config(preset, model, cfg.train_config(family_name), b.rounds)
    arrays, grid = run_federated(fcfg, hospital_settings(b), b.keep_optimizers)
    if preset == "fedbn":
        return hospital_nets(family, model, grid)
    nets = family.build(model)
    decode_into(nets, arrays)
    return [nets]


def alone_rows(cfg: ExtraConfig) -> list[str]:
    return [f"hospital-{i + 1} alone" for i in range(cfg.bench.hospitals)]


def run_family(family_name: str, cfg: ExtraConfig,
               variants: Mapping[str, str] | None = None) -> dict[str, dict[str, float]]:
    """All rows of ``family_name``'s table for ``cfg.bench.seed``."""
    variants = VARIANTS[family_name] if variants is None else variants
    b = cfg.bench
    model = cfg.model(family_name)
    train, held = family_data(family_name, cfg)

    def scored(nets_list: Sequence[Nets]) -> dict[str, float]:
        return score_nets(family_name, nets_list, held, model, b.seed)

    t0 = time.perf_counter()
    rows: dict[str, dict[str, float]] = {}
    if family_name == "cyclegan":
        rows["reference: input T1w as is"] = _metrics(held["a"], held["b"])
    else:
        pooled = torch.cat([t["image"] for t in train])
        real = {"frechet": frechet_distance(_features(pooled), _features(held["image"])),
                "frd": frechet_radiomics_distance(_held_radiomics(held),
                                                  radiomics_features(pooled))}
        if model.num_classes:
            labels = torch.cat([t["label"] for t in train])
            real["tstr"] = tstr_accuracy(pooled, labels, held["image"], held["label"], b.seed)
        rows["reference: real training slices"] = real
    torch.manual_seed(b.seed)
    rows[UNTRAINED] = scored([get_family(family_name).build(model)])
    pooled_data = {k: torch.cat([t[k] for t in train]) for k in train[0]}
    rows["centralized"] = scored([_solo(family_name, cfg, pooled_data, b.batch * b.hospitals)])
    for i, name in enumerate(alone_rows(cfg)):
        rows[name] = scored([_solo(family_name, cfg, train[i], b.batch)])
    for name, preset in variants.items():
        rows[name] = scored(federated(family_name, preset, cfg))
    log.info("%s seed %d: %.0f s", family_name, b.seed, time.perf_counter() - t0)
    return rows


def run(family_name: str, cfg: ExtraConfig, seeds: Sequence[int],
        variants: Mapping[str, str] | None = None) -> dict[str, dict[str, float]]:
    """Seed-averaged rows of ``family_name``."""
    return mean_rows([run_family(family_name, replace(cfg, bench=replace(cfg.bench, seed=s)),
                                 variants) for s in seeds])


def table(family_name: str, rows: Mapping[str, Mapping[str, float]]) -> str:
    if family_name == "cyclegan":
        lines = ["| training | SSIM | PSNR (dB) | MAE |", "| --- | --- | --- | --- |"]
        lines += [f"| {n} | {r['ssim']:.4f} | {r['psnr']:.2f} | {r['mae']:.4f} |"
                  for n, r in rows.items()]
        return "\n".join(lines)
    lines = ["| training | FRD (radiomics) | Fréchet (FeatureNet) | TSTR accuracy |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {n} | {r['frd']:.2f} | {r['frechet']:.3f} | "
              f"{'—' if 'tstr' not in r else format(r['tstr'], '.3f')} |" for n, r in rows.items()]
    return "\n".join(lines)


def summary(family_name: str, rows: Mapping[str, Mapping[str, float]], cfg: ExtraConfig,
            variants: Sequence[str]) -> str:
    """One line: best federated row vs centralized and vs the mean hospital alone."""
    alone = alone_rows(cfg)
    if family_name == "cyclegan":
        key, better = "ssim", max
    else:
        key, better = "frd", min  # the bar: FRD <= 1.1 x centralized
    best = better(variants, key=lambda n: rows[n][key])
    mean_alone = float(np.mean([rows[n][key] for n in alone]))
    line = (f"{family_name}: best federated {key} ({best}) = {rows[best][key]:.4g}, "
            f"centralized = {rows['centralized'][key]:.4g}, mean alone = {mean_alone:.4g}; "
            f"best federated / centralized = {rows[best][key] / rows['centralized'][key]:.3f}")
    if family_name == "cdcgan":
        line += (f"; TSTR best federated = {max(rows[n]['tstr'] for n in variants):.3f}, "
                 f"centralized = {rows['centralized']['tstr']:.3f}")
    return line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = ExtraConfig()
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--rounds", type=int, default=d.bench.rounds)
    parser.add_argument("--local-steps", type=int, default=d.bench.local_steps)
    parser.add_argument("--width", type=int, default=d.bench.width)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--augment", default="",
                        help="DiffAugment policy for the DCGAN rows, e.g. translation,cutout")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    torch.set_num_threads(args.threads)
    cfg = replace(d, augment=args.augment,
                  bench=replace(d.bench, rounds=args.rounds, local_steps=args.local_steps,
                                width=args.width))
    b = cfg.bench
    summaries = []
    for fam in args.families:
        t0 = time.perf_counter()
        rows = run(fam, cfg, args.seeds)
        lr = b.lr if fam == "cyclegan" else cfg.lr_generation
        print(f"\n{fam}, {b.hospitals} hospitals, {b.image_size}px, width {b.width}, "
              f"{b.rounds} rounds x {b.local_steps} local steps, batch {b.batch}, lr {lr:g}, "
              f"augment {cfg.augment or 'off'}, seeds {args.seeds} (mean), "
              f"{time.perf_counter() - t0:.0f} s")
        print(table(fam, rows))
        summaries.append(summary(fam, rows, cfg, list(VARIANTS[fam])))
    print()
    for line in summaries:
        print(line)


if __name__ == "__main__":
    main()
