"""``make bench-segmentation``: does federated synthetic image/mask data help a small hospital segment?

Phantom hospitals (``fedsynth.demo_data``) with a DICOM SEG per series (``fedsynth.mask_demo``:
the stand-in lesion is the brightest tenth of each slice's foreground), read by the hospital path
(``client.segmentation`` + the ``masked`` layout). Every hospital holds out a quarter of its
masked slices; the test set is all of them together (a held-out real set from every hospital).

The federation trains, in-process with the real ClientApp, the two-stage generator: ``aae``
(stage 1, masks from noise) and ``maskgan`` (stage 2, the image for a mask), on every hospital's
training slices. The coordinator then draws synthetic pairs from the global models alone (no
real mask or image leaves a hospital). A MONAI U-Net is trained, per seed, on:

  (a) the small hospital's real pairs only (``--small`` slices of hospital 0);
  (b) those plus the federated synthetic pairs;
  (c) the synthetic pairs only;
  (d) every hospital's real training pairs pooled (the centralised upper bound);

and scored by Dice on the held-out set. Every condition of a seed shares the seed and the step
budget, in one run; the last line prints ``segmentation gain (b)-(a)`` and
``synthetic-only / pooled`` (mean over seeds).

Learning curve (issue 21): the maskgan's global model is kept at every round, and at
``curve_points`` rounds along the run (the last included) the same synthetic masks are drawn
into images by that round's model and (b) and (c) are scored again, per seed, against the
maskgan's optimiser steps per hospital (rounds x local steps). The mask generator (aae) stays at
its final round at every point: the curve measures the image model alone, on identical masks.
The Markdown table is printed; ``--plot PATH`` writes it as a PNG (``bench.plots.curve_png``).
Each point also gets the checkerboard score (``shared_models.quality.checkerboard_score``: the
share of spectral power at the period-2 frequencies) of its synthetic images, beside the
held-out real slices' score.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean Dice over slices that hold lesion in the truth or the prediction (1 when both
    empty are left out)."""
    p, t = pred.reshape(len(pred), -1) > 0, truth.reshape(len(truth), -1) > 0
    inter, total = (p & t).sum(1), p.sum(1) + t.sum(1)
    keep = total > 0
    return float((2 * inter[keep] / total[keep]).mean()) if keep.any() else 1.0


def train_unet(x: np.ndarray, y: np.ndarray, steps: int, seed: int, batch: int = 16):
    """A small MONAI U-Net (1 -> 1 channel, Dice + BCE loss) trained for ``steps`` steps."""
    import torch
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    net = UNet(2, 1, 1, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    loss_fn = DiceCELoss(sigmoid=True)
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(xt), (min(batch, len(xt)),), generator=gen)
        loss = loss_fn(net(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    return net


def predict(net, x: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    import torch

    with torch.no_grad():
        return (net(torch.from_numpy(x).float()) > 0).float().numpy()


def hospital_pairs(folder: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, masks) of a hospital's masked slices, read as the hospital reads them."""
    from client.datasets import build_tensors
    from client.dicom import DicomSettings, scan_folder
    from client.segmentation import LabelRule, load_masks
    from shared_models import ModelConfig

    settings = DicomSettings(image_size=size)
    slices = scan_folder(folder, settings)
    masks = load_masks(folder, slices, settings, LabelRule.from_config("lesion"))
    data, _ = build_tensors(np.asarray(slices.images, dtype=np.float32), slices.meta, "masked",
                            ModelConfig(image_size=size), 0, masks=masks)
    return data["image"].numpy(), data["mask"].numpy()


def curve_rounds(rounds: list[int], points: int) -> list[int]:
    """``points`` kept rounds spread evenly along the run, the last one included."""
    last = max(rounds)
    want = {max(1, round(last * (i + 1) / max(1, points))) for i in range(points)}
    return sorted(want & set(rounds)) or [last]


def run(hospitals: int = 3, size: int = 32, rounds: int = 3, local_steps: int = 20,
        small: int = 6, synthetic: int = 96, unet_steps: int = 150, seeds: int = 3,
        width: int = 8, aae_rounds: int = 10, aae_local_steps: int = 30, curve_points: int = 4,
        log=print) -> dict:  # type: ignore[no-untyped-def]
    import torch

    from fedsynth.generation import generate, load_generator, translate
    from fedsynth.demo_data import build_demo_hospitals
    from fedsynth.inprocess import run_inprocess
    from fedsynth.mask_demo import add_phantom_segs
    from server.federation import FederationConfig
    from shared_models import DataConfig, ModelConfig, TrainConfig
    from shared_models.quality import checkerboard_score

    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = build_demo_hospitals(root / "data", hospitals, matrix=size, include_real=False)
        for f in folders:
            add_phantom_segs(f)
        train, test = [], []
        for f in folders:
            x, y = hospital_pairs(f, size)
            held = np.arange(len(x)) % 4 == 0
            train.append((x[~held], y[~held]))
            test.append((x[held], y[held]))
        sites = [{"data-dir": str(f), "cache-dir": str(root / "cache" / f.name), "device": "cpu",
                  "holdout-every": 4} for f in folders]
        ckpts: dict[str, dict[int, Path]] = {}
        seconds: dict[str, float] = {}
        for family in ("aae", "maskgan"):
            # the autoencoder is cheap and needs more steps than the image model (an
            # under-trained decoder draws empty masks: the lesion is 8 % of a slice)
            n_rounds, n_steps = ((aae_rounds, aae_local_steps) if family == "aae"
                                 else (rounds, local_steps))
            cfg = FederationConfig(
                model=ModelConfig(family=family, image_size=size, width=width, latent_dim=16),
                train=TrainConfig(local_steps=n_steps, batch_size=8, lr_g=1e-3 if family ==
                                  "aae" else 2e-4, lesion_weight=3.0 if family == "maskgan"
                                  else 1.0),
                data=DataConfig(mask_labels="lesion"), preset="fedgan",
                run_dir=str(root / "runs"), run_id=f"seg-{family}", num_samples=2,
                rounds=n_rounds, keep_checkpoints=n_rounds + 1)  # every round: the curve
            t_family = time.perf_counter()
            folder, _ = run_inprocess(cfg, sites)
            seconds[family] = time.perf_counter() - t_family
            ckpts[family] = {int(p.stem.split("-")[1]): p
                             for p in (folder / "checkpoints").glob("round-*.npz")}
        fed_seconds = time.perf_counter() - t0
        aae, aae_nets, aae_meta = load_generator(ckpts["aae"][max(ckpts["aae"])])
        syn_masks = generate(aae, aae_nets, aae_meta["_config"], synthetic, seed=123)
        points = curve_rounds(list(ckpts["maskgan"]), curve_points)
        images_at: dict[int, np.ndarray] = {}
        for r in points:  # the same masks, drawn by the maskgan of round r
            mg, mg_nets, _ = load_generator(ckpts["maskgan"][r])
            images_at[r] = translate(mg, mg_nets, syn_masks)
    last = points[-1]
    syn_images = images_at[last]
    test_x = np.concatenate([t[0] for t in test])
    test_y = np.concatenate([t[1] for t in test])
    small_x, small_y = train[0][0][:small], train[0][1][:small]
    pooled_x = np.concatenate([t[0] for t in train])
    pooled_y = np.concatenate([t[1] for t in train])

    def augmented(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate([small_x, images]), np.concatenate([small_y, syn_masks])

    conditions = {
        "(a) small hospital real": (small_x, small_y),
        "(b) small real + federated synthetic": augmented(syn_images),
        "(c) federated synthetic only": (syn_images, syn_masks),
        "(d) all hospitals real, pooled": (pooled_x, pooled_y),
    }
    mg_steps = rounds * local_steps
    per_step = seconds["maskgan"] / max(1, mg_steps)
    log(f"{hospitals} phantom hospitals, {size} px; federated aae {aae_rounds} rounds x "
        f"{aae_local_steps} local steps ({seconds['aae']:.0f} s), maskgan {rounds} rounds x "
        f"{local_steps} local steps ({seconds['maskgan']:.0f} s, {per_step:.2f} s per local "
        f"step); federation {fed_seconds:.0f} s; synthetic pairs {len(syn_images)} "
        f"(lesion in {float((syn_masks.reshape(len(syn_masks), -1).max(1) > 0).mean()):.0%}); "
        f"small hospital {len(small_x)} real pairs; pooled {len(pooled_x)}; held-out "
        f"{len(test_x)} real slices from every hospital; U-Net {unet_steps} steps per condition")
    scores: dict[str, list[float]] = {k: [] for k in conditions}
    curve: dict[int, dict[str, list[float]]] = {r: {"b": [], "c": []} for r in points}
    t_unet = time.perf_counter()
    for seed in range(seeds):
        for name, (x, y) in conditions.items():
            net = train_unet(x, y, unet_steps, seed)
            scores[name].append(dice(predict(net, test_x), test_y))
        curve[last]["b"].append(scores["(b) small real + federated synthetic"][-1])
        curve[last]["c"].append(scores["(c) federated synthetic only"][-1])
        for r in points[:-1]:  # the final round is scored above
            for key, (x, y) in (("b", augmented(images_at[r])), ("c", (images_at[r], syn_masks))):
                curve[r][key].append(dice(predict(train_unet(x, y, unet_steps, seed), test_x),
                                          test_y))
    unet_seconds = time.perf_counter() - t_unet
    for name, vals in scores.items():
        log(f"{name:40s} Dice {np.mean(vals):.3f} +- {np.std(vals):.3f}  "
            f"(seeds: {', '.join(f'{v:.3f}' for v in vals)})")
    mean = {k: float(np.mean(v)) for k, v in scores.items()}
    keys = list(conditions)
    real_board = checkerboard_score(test_x)
    boards = {r: checkerboard_score(images_at[r]) for r in points}
    log(f"checkerboard score (share of spectral power at the Nyquist row/column): maskgan "
        f"synthetic {boards[last]:.4f}, held-out real {real_board:.4f} "
        f"({boards[last] / real_board if real_board > 0 else float('nan'):.2f} x real)")
    table = curve_table(points, local_steps, curve, boards, mean[keys[0]], mean[keys[3]],
                        real_board, seeds)
    for line in table:
        log(line)
    log(f"U-Nets: {unet_seconds:.0f} s for {seeds} seeds x ({len(conditions)} conditions + "
        f"{2 * (len(points) - 1)} curve points)")
    gain = mean[keys[1]] - mean[keys[0]]
    ratio = mean[keys[2]] / mean[keys[3]] if mean[keys[3]] > 0 else float("nan")
    log(f"segmentation gain (b)-(a) {gain:+.3f} Dice; synthetic-only / pooled {ratio:.3f} "
        f"({seeds} seeds, {time.perf_counter() - t0:.0f} s in all)")
    return {"scores": scores, "gain": gain, "ratio": ratio, "mean": mean,
            "checkerboard": {"synthetic": boards[last], "real": real_board},
            "curve": [{"round": r, "steps": r * local_steps, "b": curve[r]["b"],
                       "c": curve[r]["c"], "checkerboard": boards[r]} for r in points],
            "table": table}


def curve_table(points: list[int], local_steps: int, curve: dict[int, dict[str, list[float]]],
                boards: dict[int, float], small: float, pooled: float, real_board: float,
                seeds: int) -> list[str]:
    """The learning curve as Markdown: Dice of (b) and (c) by the maskgan's steps per hospital."""
    out = [f"learning curve (maskgan global model along the run, aae at its final round; mean "
           f"over {seeds} seeds; (a) {small:.3f}, (d) {pooled:.3f}; real checkerboard "
           f"{real_board:.4f}):",
           "| maskgan steps per hospital | (b) Dice | gain (b)-(a) | (c) Dice | (c) / (d) | "
           "checkerboard |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in points:
        b, c = float(np.mean(curve[r]["b"])), float(np.mean(curve[r]["c"]))
        ratio = f"{c / pooled:.3f}" if pooled > 0 else "nan"
        out.append(f"| {r * local_steps} | {b:.3f} | {b - small:+.3f} | {c:.3f} | {ratio} | "
                   f"{boards[r]:.4f} |")
    return out


def plot_curve(path: Path, out: dict, title: str) -> Path:
    from bench.plots import curve_png

    series: dict[str, list[tuple[float, float]]] = {"(b) small real + synthetic": [],
                                                     "(c) synthetic only": []}
    for p in out["curve"]:
        series["(b) small real + synthetic"] += [(p["steps"], v) for v in p["b"]]
        series["(c) synthetic only"] += [(p["steps"], v) for v in p["c"]]
    mean = out["mean"]
    return curve_png(path, series, title=title, xlabel="maskgan optimiser steps per hospital",
                     ylabel="Dice on held-out real slices",
                     bars={"(a) small hospital real": mean["(a) small hospital real"],
                           "(d) pooled real": mean["(d) all hospitals real, pooled"]})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="maskgan rounds")
    p.add_argument("--aae-rounds", type=int, default=10)
    p.add_argument("--unet-steps", type=int, default=150)
    p.add_argument("--local-steps", type=int, default=20, help="maskgan local steps per round")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--curve-points", type=int, default=4,
                   help="maskgan rounds along the run scored for the learning curve")
    p.add_argument("--plot", type=Path, default=Path("bench/results/segmentation-curve.png"),
                   help="the learning curve's PNG")
    args = p.parse_args(argv)
    print(f"learning curve PNG: {args.plot}")  # first: the last line stays the figures
    out = run(seeds=args.seeds, rounds=args.rounds, local_steps=args.local_steps,
              unet_steps=args.unet_steps, size=args.size, aae_rounds=args.aae_rounds,
              curve_points=args.curve_points, log=lambda line: print(line, flush=True))
    plot_curve(args.plot, out, f"maskgan synthetic data for segmentation along the federated "
                               f"run ({args.seeds} seeds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
