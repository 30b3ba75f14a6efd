"""``make bench-privacy``: membership inference against one hospital's conditional GAN at a
hospital's real size, without DP and at epsilon 8 and 1, with its utility (FRD and TSTR) beside
it and a learning curve along the training, measured side by side in one run.

Model and data: TSTR needs classes, so the model is the conditional family ``cdcgan``
(projection discriminator) on the labelled lesion slices of ``fedsynth.lesion_data``: one
hospital (``hospital-1`` of ``LESION_SITES``: 1.5 T MR, its class mix 50 / 30 / 20 % cyst /
metastasis / haemangioma), ``2 x --members`` slices per seed made in memory with ``lesion_slice``
(phantom or packaged real background, one inserted lesion, ~3 ms a slice: 2,000 slices take
seconds, no cache is needed), stored as the DICOM writer stores them (12-bit) and normalised as
the hospital's loader normalises MR (``client.dicom.preprocess.normalise``). Half are members
(the training set), half non-members from the same distribution. The lesion data rather than a
T1w/T2w label on the phantoms: its classes differ in what a classifier must learn (shape, size,
texture), which is what synthetic data is for, and ``make bench-utility`` uses the same classes.

Training: the hospital's own trainer (``client.trainer.LocalTrainer``) trains the cdcgan on the
members for ``--steps`` local steps of Poisson batches of ``--batch`` (q = batch / members:
0.032 at the default 1,000 members), ``model.norm = group`` in every arm so that the arms differ
only in DP. The steps run as ``--curve-points`` consecutive ``fit`` calls that keep their Adam
state (one round of many steps, cut to look at it along the way; the attack sees the final
weights, which is what a curious coordinator sees). The noise multiplier of each DP arm is the
smallest that Opacus's RDP accountant gives for the target epsilon at delta = ``--delta`` over all
steps (``opacus.accountants.utils.get_noise_multiplier``); the epsilon printed is the one the
hospital's own accountant (``shared_models.dp.Accountant``) reports for the releases made so far.

Attacks (ROC AUC of members vs non-members; 0.5 = chance):
* LOGAN white-box (Hayes et al. 2019): the discriminator's logit on each query slice and its label.
* GAN-Leaks full black-box (Chen et al. 2020): minus the pixel L2 distance of the query to its
  nearest of ``--generated`` generated samples of the query's class.

Utility (on the non-members, never trained on):
* FRD (``shared_models.quality``, radiomic features; ~10 ms an image on an idle core, so at most
  ``--frd-images`` non-members against as many generated slices with the same labels);
* TSTR: the lesion classifier (``shared_models.downstream``, a small MONAI DenseNet) trained on
  ``--synthetic-per-class`` class-balanced generated slices only, its balanced accuracy on the
  non-members, over the same classifier trained on the real members (same steps and batch).
Each arm's utility ratio is to no DP of the same seed: TSTR / no-DP TSTR and no-DP FRD / FRD
(1 = as good as no DP); the bar takes the lower of the two. FeatureNet's Fréchet distance is
printed too. A reference row scores the members themselves (FRD members vs non-members).

Budget: each (seed, arm) is one task on one thread; ``--jobs`` tasks run at once (default 2, one
per core of the 2-core box). Default 3 seeds x 3 arms of 1,500 steps at width 16, chosen from a
40-step smoke run at the defaults on the 2-core box (load 0.7 -> 4): 0.07 s a step without DP,
0.09-0.16 s with, ~30 s to score one curve point (FRD, TSTR classifier, attacks), ~20-25 minutes
in all; every task prints its seconds a step, so a full run shows what it really cost.
The last line prints the attack AUCs
at epsilon 8 and the utility ratio to no DP; the line before it, the same at epsilon 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

ARMS = (("no DP", None), ("eps=8", 8.0), ("eps=1", 1.0))
REAL = "real members"  # the reference task: the classifier (and FRD) of the members themselves
BAR_AUC, BAR_RATIO = 0.60, 0.9


def lesion_slices(n: int, size: int, seed: int) -> dict[str, torch.Tensor]:
    """``n`` labelled lesion slices of hospital-1 (``image`` (n, 1, size, size) in [-1, 1],
    ``label`` int64), in its class mix, shuffled."""
    from client.dicom.preprocess import normalise
    from client.dicom.types import DicomSettings
    from fedsynth.lesion_data import CLASSES, LESION_SITES, class_counts, lesion_slice, real_pool
    from shared_models.phantoms import default_profiles

    site = LESION_SITES[0]
    profile = default_profiles(3, seed)[site.archetype]
    rng = np.random.default_rng([seed, 0x9121])
    labels = np.repeat(np.arange(len(CLASSES)), class_counts(site, n))[:n]
    labels = labels[rng.permutation(len(labels))]
    pool = real_pool(site.modality)
    frames = np.stack([lesion_slice(site, profile, CLASSES[k], size, rng, pool).image
                       for k in labels])
    stored = np.clip(np.rint(frames * 4095), 0, 4095).astype(np.float32)  # the DICOM writer's
    images = normalise(stored, site.modality, DicomSettings())
    return {"image": torch.from_numpy(images[:, None]).float(),
            "label": torch.from_numpy(labels).long()}


def _auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    return float(roc_auc_score(y, np.r_[members, nonmembers]))


def _budget(args: argparse.Namespace):  # noqa: ANN202 - ClassifierBudget
    from shared_models.downstream import ClassifierBudget

    return ClassifierBudget(args.clf_steps, args.clf_batch, args.clf_lr)


def _classes() -> int:
    from fedsynth.lesion_data import CLASSES

    return len(CLASSES)


@torch.no_grad()
def _logits(d: torch.nn.Module, data: dict[str, torch.Tensor], chunk: int = 256) -> np.ndarray:
    return torch.cat([d(data["image"][i:i + chunk], data["label"][i:i + chunk]).float().flatten()
                      for i in range(0, len(data["label"]), chunk)]).numpy()


def _nearest(query: dict[str, torch.Tensor], fakes: dict[str, torch.Tensor]) -> np.ndarray:
    """Pixel L2 distance of each query slice to its nearest generated slice of its class."""
    out = torch.full((len(query["label"]),), math.inf)
    for k in fakes["label"].unique():
        q, f = query["label"] == k, fakes["label"] == k
        if q.any():
            out[q] = torch.cdist(query["image"][q].flatten(1),
                                 fakes["image"][f].flatten(1)).min(1).values
    return out.numpy()


@torch.no_grad()
def _sample(trainer, labels: torch.Tensor, latent: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(len(labels), latent, generator=gen)
    images = torch.cat([trainer.family.sample(trainer.nets, z[i:i + 256], labels[i:i + 256])
                        for i in range(0, len(labels), 256)]).float().clamp(-1, 1)
    return {"image": images, "label": labels}


def score_point(trainer, members: dict[str, torch.Tensor], nonmembers: dict[str, torch.Tensor],
                real_radiomics: np.ndarray, args: argparse.Namespace, seed: int
                ) -> dict[str, float]:
    """Attack AUCs and utility of the trainer's current nets."""
    from fedsynth.utility import class_balanced_labels
    from shared_models.downstream import train_and_score
    from shared_models.quality import (FeatureNet, frechet_distance, frechet_radiomics_distance,
                                       radiomics_features)

    k = _classes()
    for net in trainer.nets.values():
        net.eval()
    d = trainer.nets["discriminator"]
    logan = _auc(_logits(d, members), _logits(d, nonmembers))
    fakes = _sample(trainer, class_balanced_labels(max(1, args.generated // k), k), args.latent,
                    10_000 + seed)
    leaks = _auc(-_nearest(members, fakes), -_nearest(nonmembers, fakes))
    like = _sample(trainer, nonmembers["label"][:args.frd_images], args.latent, 20_000 + seed)
    frd = frechet_radiomics_distance(real_radiomics, radiomics_features(like["image"]))
    feat = FeatureNet(1)
    fd = frechet_distance(feat(nonmembers["image"][:args.frd_images]).numpy(),
                          feat(like["image"]).numpy())
    syn = _sample(trainer, class_balanced_labels(args.synthetic_per_class, k), args.latent,
                  30_000 + seed)
    tstr = train_and_score(syn, nonmembers, k, seed * 31 + 1, _budget(args))
    return {"logan_auc": logan, "ganleaks_auc": leaks, "frd": frd, "frechet": fd,
            "tstr_bacc": tstr["bacc"], "tstr_auc": tstr["auc"]}


def run_task(name: str, sigma: float, seed: int, data: dict[str, torch.Tensor],
             args: argparse.Namespace) -> dict[str, Any]:
    """One (seed, arm): train in ``curve_points`` pieces, score after each; or, for ``REAL``,
    the classifier trained on the members and FRD of members vs non-members."""
    from shared_models.downstream import train_and_score
    from shared_models.quality import frechet_radiomics_distance, radiomics_features

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    members = {k: v[:args.members] for k, v in data.items()}
    nonmembers = {k: v[args.members:] for k, v in data.items()}
    real_radiomics = radiomics_features(nonmembers["image"][:args.frd_images])
    if name == REAL:
        real = train_and_score(members, nonmembers, _classes(), seed * 31 + 1,
                               _budget(args))
        frd = frechet_radiomics_distance(
            radiomics_features(members["image"][:args.frd_images]), real_radiomics)
        return {"bacc": real["bacc"], "auc": real["auc"], "frd": frd,
                "seconds": time.perf_counter() - t0}
    from client.trainer import LocalTrainer
    from shared_models import ModelConfig, TrainConfig
    from shared_models.dp import Accountant, sample_rate

    model = ModelConfig(family="cdcgan", image_size=args.size, width=args.width,
                        latent_dim=args.latent, norm="group", num_classes=_classes())
    trainer = LocalTrainer(model, torch.device("cpu"), "off")
    trainer.reset(seed)
    build, kept = trainer.family.optimizers, {}

    def optimizers(nets, train):  # noqa: ANN001, ANN202 - one round cut in pieces: Adam kept
        if "opts" not in kept:
            kept["opts"] = build(nets, train)
        return kept["opts"]

    trainer.family.optimizers = optimizers  # this trainer's own family instance only
    bounds = sorted({round(args.steps * (i + 1) / args.curve_points)
                     for i in range(args.curve_points)} - {0})
    curve, done, releases, train_s = [], 0, 0, 0.0
    for piece, end in enumerate(bounds):
        train = TrainConfig(local_steps=end - done, batch_size=args.batch, lr_g=args.lr,
                            lr_d=args.lr, dp_noise_multiplier=sigma, dp_max_grad_norm=args.clip,
                            seed=seed)
        t1 = time.perf_counter()
        result = trainer.fit(members, train, seed=seed * 1009 + piece)
        train_s += time.perf_counter() - t1
        done = end
        releases += result.dp_releases
        if sigma > 0:
            assert abs(result.dp_sample_rate - sample_rate(args.batch, args.members)) < 1e-12
        eps = (Accountant([(sigma, result.dp_sample_rate, releases)]).epsilon(args.delta)
               if sigma > 0 else math.inf)
        curve.append({"steps": done, "epsilon": eps} | score_point(
            trainer, members, nonmembers, real_radiomics, args, seed))
    return curve[-1] | {"sigma": sigma, "curve": curve, "train_seconds": train_s,
                        "seconds_per_step": train_s / args.steps,
                        "seconds": time.perf_counter() - t0}


def _ratios(arm: dict[str, float], base: dict[str, float], real: dict[str, float]
            ) -> dict[str, float]:
    """TSTR (over the real-members classifier) and the two utility ratios to no DP."""
    out = {"tstr": arm["tstr_bacc"] / real["bacc"] if real["bacc"] > 0 else math.nan,
           "tstr_ratio": (arm["tstr_bacc"] / base["tstr_bacc"] if base["tstr_bacc"] > 0
                          else math.nan),
           "frd_ratio": base["frd"] / arm["frd"] if arm["frd"] > 0 else math.nan}
    return out | {"utility_ratio": min(out["tstr_ratio"], out["frd_ratio"])}


def summarise(rows: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per arm: the final scores and ratios, mean over seeds, and the AUCs' standard deviation."""
    summary = {}
    for name, _ in ARMS:
        per_seed = [r | _ratios(r, b, real) for r, b, real in
                    zip(rows[name], rows["no DP"], rows[REAL])]
        keys = [k for k, v in per_seed[0].items() if isinstance(v, (int, float))]
        s = {k: float(np.mean([r[k] for r in per_seed])) for k in keys}
        for k in ("logan_auc", "ganleaks_auc", "tstr", "frd"):
            s[k + "_sd"] = float(np.std([r[k] for r in per_seed]))
        summary[name] = s
    return summary


def curve_rows(rows: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The learning curve: per arm and step count, scores and ratios averaged over seeds."""
    out = []
    for name, _ in ARMS:
        for i, point in enumerate(rows[name][0]["curve"]):
            pts = [r["curve"][i] | _ratios(r["curve"][i], b["curve"][i], real)
                   for r, b, real in zip(rows[name], rows["no DP"], rows[REAL])]
            out.append({"arm": name, "steps": point["steps"]} | {
                k: float(np.mean([p[k] for p in pts])) for k in
                ("epsilon", "logan_auc", "ganleaks_auc", "frd", "tstr", "utility_ratio")})
    return out


def plot_curve(path: Path, curve: list[dict[str, Any]], title: str) -> Path:
    from bench.plots import curve_png

    series: dict[str, list[tuple[float, float]]] = {}
    for p in curve:
        series.setdefault(f"{p['arm']} attack AUC (max)", []).append(
            (p["steps"], max(p["logan_auc"], p["ganleaks_auc"])))
        series.setdefault(f"{p['arm']} TSTR", []).append((p["steps"], p["tstr"]))
    return curve_png(path, series, title=title, xlabel="optimiser steps at the hospital",
                     ylabel="ROC AUC / TSTR", bars={"AUC bar 0.60": BAR_AUC})


def _verdict(name: str, s: dict[str, float]) -> str:
    met = max(s["logan_auc"], s["ganleaks_auc"]) <= BAR_AUC and s["utility_ratio"] >= BAR_RATIO
    return (f"at {name}: LOGAN AUC {s['logan_auc']:.3f}, GAN-Leaks AUC {s['ganleaks_auc']:.3f}, "
            f"utility ratio to no DP {s['utility_ratio']:.3f} (TSTR {s['tstr_ratio']:.3f}, FRD "
            f"{s['frd_ratio']:.3f}; the lower) (bar: AUC <= {BAR_AUC:.2f}, ratio >= {BAR_RATIO}: "
            f"{'met' if met else 'NOT met'})")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--members", type=int, default=1000)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--generated", type=int, default=1024, help="GAN-Leaks' generated samples")
    p.add_argument("--frd-images", type=int, default=192,
                   help="non-members and generated slices in each FRD")
    p.add_argument("--synthetic-per-class", type=int, default=128, help="TSTR's training set")
    p.add_argument("--clf-steps", type=int, default=200)
    p.add_argument("--clf-batch", type=int, default=32)
    p.add_argument("--clf-lr", type=float, default=2e-3)
    p.add_argument("--curve-points", type=int, default=4)
    p.add_argument("--jobs", type=int, default=2, help="tasks at once (processes); 1: inline")
    p.add_argument("--threads", type=int, default=1, help="torch threads per task")
    p.add_argument("--plot", type=Path, default=Path("bench/results/privacy-curve.png"))
    p.add_argument("--json", type=Path, help="also write the per-seed results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from opacus.accountants.utils import get_noise_multiplier

    q = min(1.0, args.batch / args.members)
    sigmas = {name: (0.0 if eps is None else float(get_noise_multiplier(
        target_epsilon=eps, target_delta=args.delta, sample_rate=q, steps=args.steps,
        accountant="rdp"))) for name, eps in ARMS}
    load0 = os.getloadavg()[0]
    print(f"cdcgan {args.size}px width {args.width} on hospital-1's lesion slices, "
          f"{args.members} members / {args.members} non-members, {args.steps} steps of batch "
          f"{args.batch} (q = {q:.3g}), clip {args.clip}, delta {args.delta:g}, {args.seeds} "
          f"seeds, {args.jobs} jobs x {args.threads} thread(s), load {load0:.2f}; TSTR classifier "
          f"{args.clf_steps} x {args.clf_batch} on {args.synthetic_per_class} per class, FRD on "
          f"{args.frd_images}; noise multipliers: "
          + ", ".join(f"{k} {v:.3g}" for k, v in sigmas.items()), flush=True)
    t0 = time.perf_counter()
    data = {seed: lesion_slices(2 * args.members, args.size, seed) for seed in range(args.seeds)}
    print(f"  lesion slices: {time.perf_counter() - t0:.1f} s", flush=True)
    tasks = [(name, sigmas.get(name, 0.0), seed) for seed in range(args.seeds)
             for name in [n for n, _ in ARMS] + [REAL]]
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in ARMS} | {REAL: []}

    def record(name: str, seed: int, r: dict[str, Any]) -> None:
        rows[name].append(r | {"seed": seed})
        if name == REAL:
            print(f"  seed {seed} {name}: classifier bacc {r['bacc']:.3f}, FRD members vs "
                  f"non-members {r['frd']:.3g} ({r['seconds']:.0f} s)", flush=True)
            return
        print(f"  seed {seed} {name:6s}: eps {r['epsilon']:.3g}  LOGAN {r['logan_auc']:.3f}  "
              f"GAN-Leaks {r['ganleaks_auc']:.3f}  FRD {r['frd']:.4g}  TSTR bacc "
              f"{r['tstr_bacc']:.3f}  ({r['seconds']:.0f} s, {r['seconds_per_step']:.3f} s a "
              f"step)", flush=True)

    if args.jobs <= 1:
        for name, sigma, seed in tasks:
            record(name, seed, run_task(name, sigma, seed, data[seed], args))
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            futures = [(name, seed, pool.submit(run_task, name, sigma, seed, data[seed], args))
                       for name, sigma, seed in tasks]
            for name, seed, fut in futures:
                record(name, seed, fut.result())
    for name in rows:
        rows[name].sort(key=lambda r: r["seed"])
    summary, curve = summarise(rows), curve_rows(rows)
    real = rows[REAL]
    print(f"\nreal members: classifier bacc {np.mean([r['bacc'] for r in real]):.3f} on the "
          f"non-members (TSTR's denominator), FRD members vs non-members "
          f"{np.mean([r['frd'] for r in real]):.3g}")
    print(f"{'arm':8s} {'epsilon':>8s} {'LOGAN AUC':>15s} {'GAN-Leaks AUC':>15s} {'FRD':>16s} "
          f"{'TSTR':>15s} {'TSTR ratio':>10s} {'FRD ratio':>9s}")
    for name, _ in ARMS:
        s = summary[name]
        print(f"{name:8s} {s['epsilon']:>8.3g} {s['logan_auc']:>7.3f} ± {s['logan_auc_sd']:.3f} "
              f"{s['ganleaks_auc']:>7.3f} ± {s['ganleaks_auc_sd']:.3f} {s['frd']:>8.4g} ± "
              f"{s['frd_sd']:<5.3g} {s['tstr']:>7.3f} ± {s['tstr_sd']:.3f} "
              f"{s['tstr_ratio']:>10.3f} {s['frd_ratio']:>9.3f}")
    print("\nlearning curve (mean over seeds):\n| arm | steps | epsilon | LOGAN AUC | "
          "GAN-Leaks AUC | FRD | TSTR | utility ratio |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")
    for p in curve:
        print(f"| {p['arm']} | {p['steps']} | {p['epsilon']:.3g} | {p['logan_auc']:.3f} | "
              f"{p['ganleaks_auc']:.3f} | {p['frd']:.4g} | {p['tstr']:.3f} | "
              f"{p['utility_ratio']:.3f} |")
    plot_curve(args.plot, curve, f"cdcgan at one hospital, {args.members} members, "
                                 f"{args.seeds} seeds")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v
                                                  for k, v in vars(args).items()},
                                         "rows": rows, "summary": summary, "curve": curve},
                                        indent=2))
    print(f"\nlearning curve: {args.plot}; total {time.perf_counter() - t0:.0f} s, load "
          f"{load0:.2f} at start, {os.getloadavg()[0]:.2f} at the end")
    print(_verdict("eps=1", summary["eps=1"]))
    print(_verdict("eps=8", summary["eps=8"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
