"""Quality rows of issue 22's loss settings, each against the plain family at the same budget.

- ``gradient``: 3D MR -> CT pix2pix on the demo's paired series (``build_mr_ct_hospitals``:
  the site with both modalities pairs them by study), ``gradient-loss`` = ``--weight`` against
  0; SSIM / PSNR / MAE of G(MR) against the held-out CT volumes (``bench.quality._metrics``).
- ``cascade``: the ``gradient`` setup (3D MR -> CT pix2pix) with ``cascade`` = ``--weight``
  stages (default 2; ``--cascade-training`` end-to-end or stagewise, ``--stage-rounds``) against
  the single stage (cascade 1) at the same rounds and local steps; the same figures.
- ``lesion``: 2D T1w -> T2w CycleGAN on the demo hospitals with phantom lesion SEGs
  (``fedsynth.mask_demo``), ``lesion-cycle-weight`` = ``--weight`` against 0; MAE of G(T1w)
  against the held-out T2w over the slice and inside the lesion masks.

Each row is ``run_federation`` over ``fedsynth.inprocess`` (the real ClientApp, fedgan), the last
checkpoint scored on the pooled held-out pairs as the hospitals load them; ``--seeds`` reruns.
Run alone on the machine: ``python -m bench.canon gradient --seeds 0 1 2`` (and ``lesion``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from bench.quality import _metrics
from client.datasets import DataSelectionError, clear_local_data, local_data
from client.settings import HospitalSettings
from fedsynth.inprocess import run_inprocess
from server.federation import FederationConfig
from server.run_folder import load_checkpoint
from shared_models import DataConfig, ModelConfig, TrainConfig, get_family
from shared_models.codec import decode_into
from shared_models.losses import masked_l1

BENCHES = ("gradient", "cascade", "lesion")


def _setup(bench: str, root: Path, size: int, width: int, weight: float, rounds: int,
           steps: int, seed: int, cascade_training: str = "end-to-end", stage_rounds: int = 5
           ) -> tuple[FederationConfig, list[dict]]:
    if bench in ("gradient", "cascade"):
        from fedsynth.demo_data import build_mr_ct_hospitals

        folders = build_mr_ct_hospitals(root / "data", matrix=size, include_real=False)
        stages = int(weight) if bench == "cascade" else 1
        model = ModelConfig(family="pix2pix", image_size=size, width=width, spatial_dims=3,
                            cascade=stages)
        data = DataConfig(domain_attribute="modality", domain_a="MR", domain_b="CT",
                          domain_a_pattern="^MR$", domain_b_pattern="^CT$")
        train = TrainConfig(local_steps=steps, batch_size=2, seed=seed,
                            gradient_loss=weight if bench == "gradient" else 0.0,
                            cascade_training=cascade_training, cascade_stage_rounds=stage_rounds)
    else:
        from fedsynth.demo_data import build_demo_hospitals
        from fedsynth.mask_demo import add_phantom_segs

        folders = build_demo_hospitals(root / "data", 3, matrix=size, include_real=False)
        for f in folders:
            add_phantom_segs(f)
        model = ModelConfig(family="cyclegan", image_size=size, width=width)
        data = DataConfig()
        train = TrainConfig(local_steps=steps, batch_size=4, seed=seed, lesion_cycle_weight=weight)
    hospitals = [{"data-dir": str(f), "cache-dir": str(root / "cache" / f.name), "device": "cpu",
                  "holdout-every": 4} for f in folders]
    return (FederationConfig(model=model, train=train, data=data, rounds=rounds,
                             run_dir=str(root / "runs"), run_id=f"w{weight:g}-s{seed}",
                             num_samples=2), hospitals)


def _held(cfg: FederationConfig, hospitals: Sequence[dict]) -> dict[str, torch.Tensor]:
    """The pooled held-out pairs of the hospitals holding any (with masks for ``lesion``)."""
    parts = []
    for h in hospitals:
        try:
            parts.append(local_data(HospitalSettings.from_mapping(h), cfg.model, cfg.data,
                                    lesion_masks=cfg.model.family == "cyclegan").holdout)
        except DataSelectionError:
            continue
    parts = [p for p in parts if "a" in p and len(p["a"])]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def row(bench: str, weight: float, seed: int, size: int, width: int, rounds: int,
        steps: int, cascade_training: str = "end-to-end", stage_rounds: int = 5
        ) -> dict[str, float]:
    """One federated run, scored on the held-out pairs."""
    with tempfile.TemporaryDirectory(prefix="fedsynth-canon-") as tmp:
        cfg, hospitals = _setup(bench, Path(tmp), size, width, weight, rounds, steps, seed,
                                cascade_training, stage_rounds)
        clear_local_data()
        folder, _ = run_inprocess(cfg, hospitals)
        arrays, _ = load_checkpoint(sorted((folder / "checkpoints").glob("round-*.npz"))[-1])
        family = get_family(cfg.model.family)
        nets = family.build(cfg.model)
        decode_into(nets, arrays)
        held = _held(cfg, hospitals)
        pred = family.sample(nets, held["a"])  # eval mode, no gradients
        if bench in ("gradient", "cascade"):  # SSIM of the middle slices (bench.quality._metrics is 2D)
            mid = pred.shape[2] // 2
            out = _metrics(pred[:, :, mid], held["b"][:, :, mid])
            out["mae-3d"] = ((pred.clamp(-1, 1) - held["b"]).abs().mean() / 2).item()
            return out
        out = _metrics(pred, held["b"])
        # MAE on [0, 1] inside the union of the T2w slice's lesion masks
        out["mae-lesion"] = masked_l1(pred.clamp(-1, 1), held["b"], held["mask_b"]).item() / 2
        return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench", choices=BENCHES)
    p.add_argument("--weight", type=float, default=None,
                   help="the setting's value (default: 1.0 gradient, 2 cascade stages, 10.0 "
                   "lesion)")
    p.add_argument("--cascade-training", choices=("end-to-end", "stagewise"),
                   default="end-to-end", help="cascade: how the stages train")
    p.add_argument("--stage-rounds", type=int, default=5,
                   help="cascade stagewise: cascade-stage-rounds")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    default = {"gradient": 1.0, "cascade": 2.0, "lesion": 10.0}[args.bench]
    weight = args.weight if args.weight is not None else default
    key = {"gradient": "gradient-loss", "cascade": "cascade",
           "lesion": "lesion-cycle-weight"}[args.bench]
    baseline = 1.0 if args.bench == "cascade" else 0.0  # the single stage; the setting off
    t0 = time.perf_counter()
    for w in (baseline, weight):
        rows = [row(args.bench, w, s, args.size, args.width, args.rounds, args.local_steps,
                    args.cascade_training, args.stage_rounds)
                for s in args.seeds]
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        print(f"| {key} = {w:g} | " + " | ".join(f"{k} {v:.4f}" for k, v in mean.items())
              + f" | seeds {args.seeds} |", flush=True)
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
