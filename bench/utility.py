"""Utility benchmark: what a conditional GAN's synthetic slices do for a lesion classifier.

Data: the labelled lesion data set (``fedsynth.lesion_data``: cyst / metastasis / haemangioma in
MR and CT slices of four hospitals with their own scanner profiles and class mixes; hospital-4 is
the small one), loaded as each hospital's ClientApp loads it (``client.datasets``, the run's label
rule ``class-attribute = image_comments``). Every 4th slice of a hospital is held out; the pooled
held-out slices of every hospital are the one test set (a hospital too small to hold any out adds
none, and its slices only train).

A small MONAI ``DenseNet`` (``spatial_dims=2``, 16 initial features, growth 8, three dense blocks of
3 layers; ``fedsynth.utility.classifier``) is trained for the same number of steps and batch
size in every row on:

- (a) the small hospital's real training slices alone;
- (b) those plus synthetic slices of a conditional DCGAN (family ``cdcgan``) trained at the small
  hospital alone;
- (c) those plus synthetic slices of the federated ``cdcgan`` (``fedsynth.inprocess`` run of
  ``server.federation.run_federation`` over the real ClientApp of every hospital);
- (d) the federated model's synthetic slices only (train on synthetic, test on real: TSTR);
- (e) every hospital's real training slices pooled (what federation stands in for).

Compute budget, as ``make bench-quality``: with ``S = rounds x local_steps``, each federated
hospital takes ``S`` optimiser steps at ``batch`` images; the hospital alone (b) takes its own share,
``S`` steps at ``batch`` images on its own data. Synthetic sets are class-balanced
(``synthetic-per-class`` of each class). Scores: balanced accuracy and macro one-vs-rest AUC
(scikit-learn) on the held-out set; each seed sets the lesion data, the GAN and classifier
initialisations and batches; rows are averaged over ``--seeds`` (default 0 1 2), none is picked.
The last line prints ``augmentation gain (c)-(a)`` and ``TSTR / (e)``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from bench.quality import federation_config, work_dir
from fedsynth.lesion_data import CLASSES, LESION_SITES, RUN_DATA_SETTINGS, build_lesion_hospitals
from fedsynth.utility import (ClassifierBudget, class_balanced_labels, concat, fidelity,
                              train_and_score)
from shared_models.downstream import intended_class_accuracy, score, train_classifier
from shared_models import DataConfig, ModelConfig, StepContext, TrainConfig, get_family
from shared_models.small_data import SmallData
from shared_models.codec import decode_into

log = logging.getLogger("bench.utility")

HOLDOUT_EVERY = 4
ROWS = {
    "a": "(a) small hospital's real slices",
    "b": "(b) (a) + local cGAN synthetic",
    "c": "(c) (a) + federated cGAN synthetic",
    "d": "(d) federated synthetic only (TSTR)",
    "e": "(e) every hospital's real slices pooled",
}
Data = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class UtilityConfig:
    # the default budget: 1,200 optimiser steps of 32 per hospital, about 40 minutes for three
    # seeds on the 2-core box (BENCHMARKS.md, "Utility"; its learning curve)
    image_size: int = 32
    width: int = 32
    rounds: int = 40
    local_steps: int = 30
    batch: int = 32
    lr: float = 2e-4
    preset: str = "fedgan"
    scale: float = 1.0  # lesion data set size: slices per hospital x scale (120, 120, 120, 16)
    synthetic_per_class: int = 64
    clf_steps: int = 300
    clf_batch: int = 32
    clf_lr: float = 2e-3
    seed: int = 0
    augment: str = "translation,cutout"  # DiffAugment of both GANs (shared_models.small_data)
    # how the cdcgan carries its class (ModelConfig), and class-balanced batches at the hospitals:
    # the best of bench/conditioning.py's rows (BENCHMARKS.md, "Class-faithful conditioning")
    conditioning: str = "projection,multiscale,acgan,cbn"
    class_balanced: bool = True
    curve_points: int = 4  # checkpoints along the run scored for the learning curve
    # class-weighted-aggregation: each class's parameter rows weighted by the hospitals' slices
    # of that class (server/aggregation.py, class_weighted_mean); off = ordinary FedAvg
    class_weighted: bool = False

    @property
    def steps(self) -> int:
        return self.rounds * self.local_steps

    def model(self) -> ModelConfig:
        return ModelConfig(family="cdcgan", image_size=self.image_size, width=self.width,
                           num_classes=len(CLASSES), conditioning=self.conditioning)

    def train_config(self) -> TrainConfig:
        return TrainConfig(local_steps=self.local_steps, batch_size=self.batch, lr_g=self.lr,
                           lr_d=self.lr, seed=self.seed, augment=self.augment,
                           class_balanced=self.class_balanced, eval_classifier_steps=0)


def data_config() -> DataConfig:
    return DataConfig(**RUN_DATA_SETTINGS)


def hospital_settings(cfg: UtilityConfig) -> list[dict[str, Any]]:
    """The virtual hospitals' settings over the lesion data of ``cfg.seed`` (written once)."""
    root = work_dir() / f"lesions-seed{cfg.seed}-{cfg.image_size}px-x{cfg.scale:g}"
    if not root.is_dir():
        tmp = root.with_name(root.name + ".tmp")
        build_lesion_hospitals(tmp, seed=cfg.seed, matrix=cfg.image_size, scale=cfg.scale,
                               write_seg=False)
        tmp.rename(root)
    return [{"data-dir": str(root / s.name), "cache-dir": str(work_dir() / "cache" / root.name /
                                                               s.name),
             "name": s.name, "device": "cpu", "holdout-every": HOLDOUT_EVERY}
            for s in LESION_SITES]


def small_index() -> int:
    return next(i for i, s in enumerate(LESION_SITES) if s.small)


def load(cfg: UtilityConfig) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Every hospital's training slices and the pooled held-out set (none from a hospital that
    is too small to hold any out: its held-out tensors are its training ones)."""
    from client.datasets import local_data
    from client.settings import HospitalSettings

    train, held = [], []
    for h in hospital_settings(cfg):
        loaded = local_data(HospitalSettings.from_mapping(h), cfg.model(), data_config())
        train.append({k: v.clone() for k, v in loaded.train.items()})
        if loaded.holdout["image"] is not loaded.train["image"]:
            held.append({k: v.clone() for k, v in loaded.holdout.items()})
    return train, {k: torch.cat([h[k] for h in held]) for k in ("image", "label")}


# ----------------------------------------------------------------------------- GANs


def local_gan(cfg: UtilityConfig, data: Data) -> dict[str, nn.Module]:
    """``cfg.steps`` steps of the cdcgan at ``cfg.batch`` images on one hospital's data."""
    family = get_family("cdcgan")
    torch.manual_seed(cfg.seed)
    nets = family.build(cfg.model())
    opts = family.optimizers(nets, cfg.train_config())
    ctx = StepContext(small_data=SmallData.from_train(cfg.train_config()))  # as the hospitals
    torch.manual_seed(cfg.seed * 1009 + 7)
    for _ in range(cfg.steps):
        family.train_step(family.draw(data, cfg.batch, cfg.class_balanced), nets, opts, ctx)
    return nets


def federated_gan(cfg: UtilityConfig
                  ) -> tuple[dict[str, nn.Module], list[int], list[tuple[int, dict[str, nn.Module]]]]:
    """The federated cdcgan (``run_federation`` over every hospital's ClientApp), the optimiser
    steps each hospital reported over the run (the budget check), and the global model at
    ``cfg.curve_points`` rounds along the run (the learning curve), by round."""
    import json

    from bench.quality import KeptOptimizers
    from fedsynth.inprocess import run_inprocess
    from server.run_folder import load_checkpoint

    family = get_family("cdcgan")
    fcfg = replace(federation_config(cfg.preset, cfg.model(), cfg.train_config(), cfg.rounds),
                   data=data_config(), keep_checkpoints=cfg.rounds + 1,
                   class_weighted_aggregation=cfg.class_weighted)
    folder, _ = run_inprocess(fcfg, hospital_settings(cfg), app=KeptOptimizers())
    by_round = {int(p.stem.split("-")[1]): p for p in (folder / "checkpoints").glob("round-*.npz")}
    last = max(by_round)
    points = sorted({max(1, round(last * (i + 1) / max(1, cfg.curve_points)))
                     for i in range(cfg.curve_points)} & set(by_round))
    curve = []
    for r in points:
        nets_r = family.build(cfg.model())
        decode_into(nets_r, load_checkpoint(by_round[r])[0])
        curve.append((r, nets_r))
    arrays, _ = load_checkpoint(by_round[last])
    steps: dict[str, int] = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        for node, m in (json.loads(line).get("hospitals") or {}).items():
            steps[node] = steps.get(node, 0) + int(m.get("steps", 0))
    nets = family.build(cfg.model())
    decode_into(nets, arrays)
    return nets, sorted(steps.values()), curve


@torch.no_grad()
def synthesise(nets: Mapping[str, nn.Module], cfg: UtilityConfig, per_class: int,
               seed: int) -> dict[str, torch.Tensor]:
    """``per_class`` generated slices of every class, with their labels."""
    family = get_family("cdcgan")
    for net in nets.values():
        net.eval()
    gen = torch.Generator().manual_seed(seed + 4242)
    labels = class_balanced_labels(per_class, len(CLASSES))
    z = torch.randn(len(labels), cfg.model().latent_dim, generator=gen)
    images = family.sample(dict(nets), z, labels).float().clamp(-1, 1)
    return {"image": images, "label": labels}


# ----------------------------------------------------------------------------- classifier


def gan_quality(synthetic: Data, held: Data) -> dict[str, float]:
    return fidelity(held["image"], synthetic["image"])


def run_seed(cfg: UtilityConfig) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """The five rows for ``cfg.seed``, plus what the seed's data and GANs looked like."""
    t0 = time.perf_counter()
    train, held = load(cfg)
    small = train[small_index()]
    pooled = concat(*train)
    local_nets = local_gan(cfg, small)
    t_local = time.perf_counter() - t0
    fed_nets, fed_steps, checkpoints = federated_gan(cfg)
    t_fed = time.perf_counter() - t0 - t_local
    syn_local = synthesise(local_nets, cfg, cfg.synthetic_per_class, cfg.seed)
    syn_fed = synthesise(fed_nets, cfg, cfg.synthetic_per_class, cfg.seed)
    budget = ClassifierBudget(cfg.clf_steps, cfg.clf_batch, cfg.clf_lr)
    k, clf_seed = len(CLASSES), cfg.seed * 31 + 1
    # (e)'s classifier, trained on every hospital's real slices, also reads the synthetic ones
    reader = train_classifier(pooled, k, clf_seed, budget)
    rows = {"a": train_and_score(small, held, k, clf_seed, budget),
            "b": train_and_score(concat(small, syn_local), held, k, clf_seed, budget),
            "c": train_and_score(concat(small, syn_fed), held, k, clf_seed, budget),
            "d": train_and_score(syn_fed, held, k, clf_seed, budget),
            "e": score(reader, held, k)}
    intended = {"local": intended_class_accuracy(reader, syn_local, k),
                "federated": intended_class_accuracy(reader, syn_fed, k)}
    curve = []
    for r, nets_r in checkpoints:  # the learning curve: the same scores along the run
        if r == cfg.rounds:  # the final model: scored above
            curve.append({"round": r, "steps": r * cfg.local_steps,
                          "intended": intended["federated"][0], "tstr": rows["d"]["bacc"],
                          "augmented": rows["c"]["bacc"]})
            continue
        syn_r = synthesise(nets_r, cfg, cfg.synthetic_per_class, cfg.seed)
        curve.append({
            "round": r, "steps": r * cfg.local_steps,
            "intended": intended_class_accuracy(reader, syn_r, k)[0],
            "tstr": train_and_score(syn_r, held, k, clf_seed, budget)["bacc"],
            "augmented": train_and_score(concat(small, syn_r), held, k, clf_seed, budget)["bacc"]})
    info = {"train": [len(t["label"]) for t in train], "held": len(held["label"]),
            "a_bacc": rows["a"]["bacc"], "e_bacc": rows["e"]["bacc"],
            "held_classes": np.bincount(held["label"].numpy(), minlength=len(CLASSES)).tolist(),
            "local_gan": gan_quality(syn_local, held), "federated_gan": gan_quality(syn_fed, held),
            "intended": {n: {"accuracy": a, "per_class": per} for n, (a, per) in intended.items()},
            "curve": curve, "load": os.getloadavg(),
            "steps": {"federated_per_hospital": fed_steps, "local_gan": cfg.steps},
            "seconds": {"local_gan": t_local, "federated_gan": t_fed,
                        "total": time.perf_counter() - t0}}
    log.info("seed %d: %s %s", cfg.seed, rows, info)
    return rows, info


def run(cfg: UtilityConfig, seeds: Sequence[int]
        ) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Rows averaged over ``seeds`` (with their standard deviations), and each seed's info."""
    per_seed = [run_seed(replace(cfg, seed=s)) for s in seeds]
    rows: dict[str, dict[str, float]] = {}
    for k in ROWS:
        for m in ("bacc", "auc"):
            vals = [r[k][m] for r, _ in per_seed]
            rows.setdefault(k, {})[m] = float(np.mean(vals))
            rows[k][m + "_sd"] = float(np.std(vals))
    return rows, [i for _, i in per_seed]


def ratios(rows: Mapping[str, Mapping[str, float]]) -> tuple[float, float]:
    """(augmentation gain (c)-(a) in balanced accuracy, TSTR (d) / pooled (e))."""
    return (rows["c"]["bacc"] - rows["a"]["bacc"],
            rows["d"]["bacc"] / rows["e"]["bacc"] if rows["e"]["bacc"] > 0 else float("nan"))


def table(rows: Mapping[str, Mapping[str, float]]) -> str:
    lines = ["| training set | balanced accuracy | AUC (macro, one-vs-rest) |",
             "| --- | --- | --- |"]
    lines += [f"| {ROWS[k]} | {r['bacc']:.3f} ± {r['bacc_sd']:.3f} | "
              f"{r['auc']:.3f} ± {r['auc_sd']:.3f} |" for k, r in rows.items()]
    return "\n".join(lines)


def report(cfg: UtilityConfig, seeds: Sequence[int], rows: Mapping[str, Mapping[str, float]],
           infos: Sequence[Mapping[str, Any]], seconds: float) -> list[str]:
    gain, tstr = ratios(rows)
    modalities = ", ".join(s.modality for s in LESION_SITES)
    out = [f"cdcgan lesion utility: {len(LESION_SITES)} hospitals ({modalities}; "
           f"small = {LESION_SITES[small_index()].name}), {cfg.image_size}px, width {cfg.width}, "
           f"preset {cfg.preset}, augment {cfg.augment or 'off'}, conditioning "
           f"{cfg.conditioning}{' + class-balanced batches' if cfg.class_balanced else ''}"
           f"{', class-weighted aggregation' if cfg.class_weighted else ''}, "
           f"{cfg.rounds} rounds x {cfg.local_steps} local steps, batch "
           f"{cfg.batch}, lr {cfg.lr:g}; classifier {cfg.clf_steps} steps x {cfg.clf_batch}; "
           f"{cfg.synthetic_per_class} synthetic per class; seeds {list(seeds)} (mean ± sd), "
           f"{seconds:.0f} s",
           f"training slices per hospital {infos[0]['train']}, held out {infos[0]['held']} "
           f"(by class {infos[0]['held_classes']}) (seed {seeds[0]})"]
    for name in ("local_gan", "federated_gan"):
        frd = np.mean([i[name]["frd"] for i in infos])
        fr = np.mean([i[name]["frechet"] for i in infos])
        out.append(f"{name.replace('_', ' ')} synthetic vs held-out: FRD {frd:.2f}, Fréchet "
                   f"(FeatureNet) {fr:.3f}")
    out.append(table(rows))
    real = rows["e"]["bacc"]
    for name in ("local", "federated"):
        acc = np.mean([i["intended"][name]["accuracy"] for i in infos])
        per = np.mean([i["intended"][name]["per_class"] for i in infos], axis=0)
        out.append(f"intended-class accuracy, {name} cGAN (the (e) classifier reading its "
                   f"slices): {acc:.3f} = {acc / real:.3f} x its {real:.3f} on held-out real; "
                   "by class " + ", ".join(f"{c} {v:.2f}" for c, v in zip(CLASSES, per)))
    intended = np.mean([i["intended"]["federated"]["accuracy"] for i in infos]) / real
    out += curve_table(infos, real)
    aug_met = gain >= 0.05 and rows["c"]["bacc"] > rows["b"]["bacc"]
    out.append(f"bar TSTR >= 0.9 x pooled: {'met' if tstr >= 0.9 else 'NOT met'}; bar "
               f"augmentation >= +0.05 and > local-GAN augmentation: "
               f"{'met' if aug_met else 'NOT met'}; bar intended-class >= 0.9 x real: "
               f"{'met' if intended >= 0.9 else 'NOT met'} ({intended:.3f})")
    out.append(f"augmentation gain (c)-(a) = {gain:+.3f} balanced accuracy; TSTR / (e) = "
               f"{tstr:.3f}")
    return out


def curve_table(infos: Sequence[Mapping[str, Any]], real: float) -> list[str]:
    """The learning curve, averaged over seeds: scores of the global model along the run."""
    by_steps: dict[int, list[Mapping[str, float]]] = {}
    for info in infos:
        for p in info["curve"]:
            by_steps.setdefault(p["steps"], []).append(p)
    small = np.mean([i["a_bacc"] for i in infos])
    out = ["learning curve (global model along the run, mean over seeds):",
           "| steps per hospital | intended-class / real | TSTR / pooled | augmentation gain |",
           "| --- | --- | --- | --- |"]
    for steps, pts in sorted(by_steps.items()):
        out.append(f"| {steps} | {np.mean([p['intended'] for p in pts]) / real:.3f} | "
                   f"{np.mean([p['tstr'] for p in pts]) / real:.3f} | "
                   f"{np.mean([p['augmented'] for p in pts]) - small:+.3f} |")
    return out


def plot_curve(path: Path, infos: Sequence[Mapping[str, Any]], title: str) -> Path:
    from bench.plots import curve_png

    series: dict[str, list[tuple[float, float]]] = {
        "intended-class / real": [], "TSTR / pooled": [], "augmentation gain x 10": []}
    for info in infos:
        real = info["e_bacc"]
        for p in info["curve"]:
            series["intended-class / real"].append((p["steps"], p["intended"] / real))
            series["TSTR / pooled"].append((p["steps"], p["tstr"] / real))
            series["augmentation gain x 10"].append((p["steps"],
                                                     10 * (p["augmented"] - info["a_bacc"])))
    return curve_png(path, series, title=title, ylabel="ratio (gain x 10)",
                     bars={"0.9 bar": 0.9, "gain bar (+0.05)": 0.5})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = UtilityConfig()
    for name in ("image_size", "width", "rounds", "local_steps", "batch", "synthetic_per_class",
                 "clf_steps", "clf_batch"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "scale", "clf_lr"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    parser.add_argument("--preset", default=d.preset)
    parser.add_argument("--conditioning", default=d.conditioning,
                        help="projection[,multiscale][,acgan][,cbn] (bench/conditioning.py)")
    parser.add_argument("--class-balanced", action=argparse.BooleanOptionalAction,
                        default=d.class_balanced)
    parser.add_argument("--class-weighted", action=argparse.BooleanOptionalAction,
                        default=d.class_weighted,
                        help="class-weighted-aggregation: per-class weights for the class rows")
    parser.add_argument("--curve-points", type=int, default=d.curve_points)
    parser.add_argument("--plot", type=Path, default=Path("bench/results/utility-curve.png"),
                        help="the learning curve's PNG")
    parser.add_argument("--augment", default=d.augment,
                        help="DiffAugment policy of both GANs, e.g. translation,cutout")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    torch.set_num_threads(args.threads)
    cfg = UtilityConfig(**{k: getattr(args, k) for k in (
        "image_size", "width", "rounds", "local_steps", "batch", "synthetic_per_class",
        "clf_steps", "clf_batch", "lr", "scale", "clf_lr", "preset", "augment", "conditioning",
        "class_balanced", "curve_points", "class_weighted")})
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    rows, infos = run(cfg, args.seeds)
    plot_curve(args.plot, infos, f"cdcgan utility along the federated run ({cfg.conditioning}"
                                 f"{', class-weighted' if cfg.class_weighted else ''}, "
                                 f"{len(args.seeds)} seeds)")
    lines = report(cfg, args.seeds, rows, infos, time.perf_counter() - t0)
    lines.insert(1, f"load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at the end; "
                    f"learning curve: {args.plot}")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
