"""``make docs-mask-grid``: the README's mask-conditioned sample grid, generated, never drawn.

Three phantom hospitals (``fedsynth.demo_data``) each get a DICOM SEG per series
(``fedsynth.mask_demo``: a stand-in lesion, the brightest tenth of each slice's foreground). Two
of them train ``maskgan`` in-process (``fedsynth.inprocess.run_inprocess``, the real ClientApp);
the third is held out. For the held-out site's masked slices the grid shows, row by row: the
mask, the real slice, the federated model's synthetic slice for that mask, and the synthetic
slice with the mask overlaid in red. It prints the measured MAE (whole slice and inside the
mask, images in [-1, 1]) of the trained model and of the untrained initial model on every
held-out masked slice, side by side. Reduced size for a CPU: 32 px, a few rounds.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _rgb(grey: np.ndarray) -> np.ndarray:
    g = np.clip((grey + 1.0) * 127.5, 0, 255).astype(np.uint8)
    return np.stack([g, g, g], -1)


def _overlay(grey: np.ndarray, mask: np.ndarray) -> np.ndarray:
    rgb = _rgb(grey).astype(np.float32)
    m = mask > 0
    rgb[m] = 0.55 * rgb[m] + 0.45 * np.array([255.0, 0.0, 0.0])
    return rgb.astype(np.uint8)


def grid(masks: np.ndarray, real: np.ndarray, fake: np.ndarray, scale: int = 4,
         pad: int = 2) -> np.ndarray:
    """Rows of mask | real | synthetic | overlay (masks (N, K, H, W), images (N, 1, H, W))."""
    union = masks.max(1)
    rows = []
    for u, r, f in zip(union, real[:, 0], fake[:, 0]):
        tiles = [_rgb(u * 2.0 - 1.0), _rgb(r), _rgb(f), _overlay(f, u)]
        tiles = [np.kron(t, np.ones((scale, scale, 1), dtype=np.uint8)) for t in tiles]
        h = tiles[0].shape[0]
        gap = np.zeros((h, pad, 3), dtype=np.uint8)
        rows.append(np.concatenate(sum(([t, gap] for t in tiles), [])[:-1], 1))
    gap = np.zeros((pad, rows[0].shape[1], 3), dtype=np.uint8)
    return np.concatenate(sum(([r, gap] for r in rows), [])[:-1], 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("docs/img/maskgan-grid.png"))
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--local-steps", type=int, default=25)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch
    from PIL import Image

    from client.datasets import build_tensors
    from client.dicom import DicomSettings, scan_folder
    from client.segmentation import LabelRule, load_masks
    from fedsynth.generation import load_generator, translate
    from fedsynth.demo_data import build_demo_hospitals
    from fedsynth.inprocess import run_inprocess
    from fedsynth.mask_demo import add_phantom_segs
    from server.federation import FederationConfig
    from shared_models import DataConfig, ModelConfig, TrainConfig, get_family

    torch.manual_seed(args.seed)
    size = 32
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = build_demo_hospitals(root / "data", 3, matrix=size, include_real=False,
                                       seed=args.seed)
        for f in folders:
            add_phantom_segs(f)
        train_sites, held_site = folders[:2], folders[2]
        cfg = FederationConfig(
            model=ModelConfig(family="maskgan", image_size=size, width=16),
            train=TrainConfig(local_steps=args.local_steps, batch_size=8, lesion_weight=3.0,
                              seed=args.seed),
            data=DataConfig(mask_labels="lesion"), preset="fedgan",
            run_dir=str(root / "runs"), run_id="mask-grid", num_samples=4, rounds=args.rounds)
        hospitals = [{"data-dir": str(f), "cache-dir": str(root / "cache" / f.name),
                      "device": "cpu", "holdout-every": 4} for f in train_sites]
        t0 = time.perf_counter()
        folder, _ = run_inprocess(cfg, hospitals)
        seconds = time.perf_counter() - t0
        ckpt = sorted((folder / "checkpoints").glob("round-*.npz"))[-1]
        family, nets, meta = load_generator(ckpt)
        model = meta["_config"]

        settings = DicomSettings(image_size=size)
        slices = scan_folder(held_site, settings)
        masks = load_masks(held_site, slices, settings, LabelRule.from_config("lesion"))
        images = np.asarray(slices.images, dtype=np.float32)
        data, _ = build_tensors(images, slices.meta, "masked", model, 0, masks=masks)
        m, real = data["mask"].numpy(), data["image"].numpy()
        lit = np.flatnonzero(m.reshape(len(m), -1).max(1) > 0)
        m, real = m[lit], real[lit]
        fake = translate(family, nets, m)
        untrained = translate(family, get_family("maskgan").build(model), m)

    def mae(x: np.ndarray) -> tuple[float, float]:
        err = np.abs(x - real)
        inside = m.max(1, keepdims=True) > 0
        return float(err.mean()), float(err[inside].mean())

    trained_mae, untrained_mae = mae(fake), mae(untrained)
    pick = np.unique(np.linspace(0, len(m) - 1, min(args.rows, len(m))).round().astype(int))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid(m[pick], real[pick], fake[pick])).save(args.out)
    print(f"maskgan, 2 phantom hospitals, {args.rounds} rounds x {args.local_steps} local steps, "
          f"{size} px, CPU: {seconds:.0f} s")
    print(f"held-out hospital, {len(m)} masked slices, MAE (images in [-1, 1]) whole / in mask: "
          f"trained {trained_mae[0]:.3f} / {trained_mae[1]:.3f}, untrained "
          f"{untrained_mae[0]:.3f} / {untrained_mae[1]:.3f}")
    print(f"grid (mask | real | synthetic | overlay) of {len(pick)} slices: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
