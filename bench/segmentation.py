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


def run(hospitals: int = 3, size: int = 32, rounds: int = 3, local_steps: int = 20,
        small: int = 6, synthetic: int = 96, unet_steps: int = 150, seeds: int = 3,
        width: int = 8, aae_rounds: int = 10, aae_local_steps: int = 30,
        log=print) -> dict:  # type: ignore[no-untyped-def]
    import torch

    from fedsynth.generation import generate, load_generator, translate
    from fedsynth.demo_data import build_demo_hospitals
    from fedsynth.inprocess import run_inprocess
    from fedsynth.mask_demo import add_phantom_segs
    from server.federation import FederationConfig
    from shared_models import DataConfig, ModelConfig, TrainConfig

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
        ckpts = {}
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
                rounds=n_rounds)
            folder, _ = run_inprocess(cfg, sites)
            ckpts[family] = sorted((folder / "checkpoints").glob("round-*.npz"))[-1]
        fed_seconds = time.perf_counter() - t0
        aae, aae_nets, aae_meta = load_generator(ckpts["aae"])
        mg, mg_nets, _ = load_generator(ckpts["maskgan"])
        syn_masks = generate(aae, aae_nets, aae_meta["_config"], synthetic, seed=123)
        syn_images = translate(mg, mg_nets, syn_masks)
    test_x = np.concatenate([t[0] for t in test])
    test_y = np.concatenate([t[1] for t in test])
    small_x, small_y = train[0][0][:small], train[0][1][:small]
    pooled_x = np.concatenate([t[0] for t in train])
    pooled_y = np.concatenate([t[1] for t in train])
    conditions = {
        "(a) small hospital real": (small_x, small_y),
        "(b) small real + federated synthetic": (np.concatenate([small_x, syn_images]),
                                                 np.concatenate([small_y, syn_masks])),
        "(c) federated synthetic only": (syn_images, syn_masks),
        "(d) all hospitals real, pooled": (pooled_x, pooled_y),
    }
    log(f"{hospitals} phantom hospitals, {size} px; federated aae {aae_rounds} rounds x "
        f"{aae_local_steps} local steps, maskgan {rounds} rounds x {local_steps} local steps "
        f"({fed_seconds:.0f} s); synthetic pairs {len(syn_images)} "
        f"(lesion in {float((syn_masks.reshape(len(syn_masks), -1).max(1) > 0).mean()):.0%}); "
        f"small hospital {len(small_x)} real pairs; pooled {len(pooled_x)}; held-out "
        f"{len(test_x)} real slices from every hospital; U-Net {unet_steps} steps per condition")
    scores: dict[str, list[float]] = {k: [] for k in conditions}
    for seed in range(seeds):
        for name, (x, y) in conditions.items():
            net = train_unet(x, y, unet_steps, seed)
            scores[name].append(dice(predict(net, test_x), test_y))
    for name, vals in scores.items():
        log(f"{name:40s} Dice {np.mean(vals):.3f} +- {np.std(vals):.3f}  "
            f"(seeds: {', '.join(f'{v:.3f}' for v in vals)})")
    mean = {k: float(np.mean(v)) for k, v in scores.items()}
    keys = list(conditions)
    gain = mean[keys[1]] - mean[keys[0]]
    ratio = mean[keys[2]] / mean[keys[3]] if mean[keys[3]] > 0 else float("nan")
    log(f"segmentation gain (b)-(a) {gain:+.3f} Dice; synthetic-only / pooled {ratio:.3f} "
        f"({seeds} seeds, {time.perf_counter() - t0:.0f} s in all)")
    return {"scores": scores, "gain": gain, "ratio": ratio}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="maskgan rounds")
    p.add_argument("--aae-rounds", type=int, default=10)
    p.add_argument("--unet-steps", type=int, default=150)
    p.add_argument("--size", type=int, default=32)
    args = p.parse_args(argv)
    run(seeds=args.seeds, rounds=args.rounds, unet_steps=args.unet_steps, size=args.size,
        aae_rounds=args.aae_rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
