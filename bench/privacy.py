"""``make bench-privacy``: membership inference against one hospital's DCGAN, without DP and at
epsilon 8 and 1, with the utility beside it, measured side by side in one run.

Setting: one hospital's slices (phantom MR slices from ``shared_models.phantoms``: several
scanner profiles, T1w and T2w, random slice positions and fresh Rician noise per slice) split
into members (the training set) and as many non-members from the same distribution. The
hospital's own trainer (``client.trainer.LocalTrainer``, the code a round runs) trains a DCGAN
on the members for ``--steps`` local steps (one round of many steps: the attack sees the final
weights, which is what a curious coordinator sees), with ``model.norm = group`` in every arm so
that the arms differ only in DP. The noise multiplier of each DP arm is the smallest that
Opacus's RDP accountant gives for the target epsilon at delta = ``--delta`` over the run's
releases (``opacus.accountants.utils.get_noise_multiplier``); the epsilon printed is the one the
hospital's own accountant (``shared_models.dp.Accountant``) then reports.

Attacks (ROC AUC of members vs non-members; 0.5 = chance):
* LOGAN white-box (Hayes et al. 2019): the discriminator's logit on each query slice.
* GAN-Leaks full black-box (Chen et al. 2020): minus the distance of the query to its nearest of
  ``--generated`` generated samples (pixel L2).

Utility: the Fréchet distance between generated samples and the non-members on the fixed
``shared_models.quality.FeatureNet`` features (lower is better; the utility issue's FRD and TSTR
are not on this branch), and its ratio "no-DP FD / arm FD" (1 = as good as no DP).

The last line prints the attack AUCs at epsilon 8 and the utility ratio to no DP.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ARMS = (("no DP", None), ("eps=8", 8.0), ("eps=1", 1.0))


def phantom_slices(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` phantom slices (N, 1, size, size) in [-1, 1], each with its own noise draw."""
    from shared_models.phantoms import default_profiles, phantom_pair

    rng = np.random.default_rng(seed)
    profiles = default_profiles(4, seed=seed)
    out = []
    for _ in range(n):
        p = profiles[int(rng.integers(len(profiles)))]
        t1, t2 = phantom_pair(p, int(rng.integers(p.slices)), size, rng)
        img = t1 if rng.random() < 0.5 else t2
        out.append(img / max(float(img.max()), 1e-6) * 2 - 1)
    return torch.from_numpy(np.stack(out)[:, None]).float()


def _auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    return float(roc_auc_score(y, np.r_[members, nonmembers]))


def one_arm(members: torch.Tensor, nonmembers: torch.Tensor, sigma: float, args: argparse.Namespace,
            seed: int) -> dict[str, float]:
    from client.trainer import LocalTrainer
    from shared_models import ModelConfig, TrainConfig
    from shared_models.dp import Accountant, sample_rate
    from shared_models.quality import FeatureNet, frechet_distance

    model = ModelConfig(image_size=args.size, width=args.width, latent_dim=args.latent,
                        norm="group")
    trainer = LocalTrainer(model, torch.device("cpu"), "off")
    trainer.reset(seed)
    train = TrainConfig(local_steps=args.steps, batch_size=args.batch, lr_g=args.lr, lr_d=args.lr,
                        dp_noise_multiplier=sigma, dp_max_grad_norm=args.clip, seed=seed)
    t0 = time.perf_counter()
    result = trainer.fit({"image": members}, train, seed=seed)
    seconds = time.perf_counter() - t0
    eps = (Accountant([(sigma, result.dp_sample_rate, result.dp_releases)]).epsilon(args.delta)
           if sigma > 0 else math.inf)
    d, g = trainer.nets["discriminator"], trainer.nets["generator"]
    d.eval()
    with torch.no_grad():
        logan = _auc(d(members).numpy(), d(nonmembers).numpy())
        gen = torch.Generator().manual_seed(10_000 + seed)
        fakes = trainer.family.sample(trainer.nets, torch.randn(args.generated, args.latent,
                                                                generator=gen)).float()
        flat = fakes.flatten(1)
        leak_m = -torch.cdist(members.flatten(1), flat).min(1).values.numpy()
        leak_n = -torch.cdist(nonmembers.flatten(1), flat).min(1).values.numpy()
        feat = FeatureNet(1)
        fd = frechet_distance(feat(nonmembers).numpy(), feat(fakes).numpy())
    del g
    assert sigma == 0 or abs(result.dp_sample_rate - sample_rate(args.batch, len(members))) < 1e-12
    return {"epsilon": eps, "sigma": sigma, "logan_auc": logan,
            "ganleaks_auc": _auc(leak_m, leak_n), "frechet": fd, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--members", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--generated", type=int, default=256)
    p.add_argument("--json", type=Path, help="also write the per-seed results here")
    args = p.parse_args(argv)
    from opacus.accountants.utils import get_noise_multiplier

    torch.set_num_threads(max(1, torch.get_num_threads()))
    q = min(1.0, args.batch / args.members)
    sigmas = {name: (0.0 if eps is None else float(get_noise_multiplier(
        target_epsilon=eps, target_delta=args.delta, sample_rate=q, steps=args.steps,
        accountant="rdp"))) for name, eps in ARMS}
    print(f"DCGAN {args.size}px width {args.width}, {args.members} members / {args.members} "
          f"non-members, {args.steps} steps of batch {args.batch} (q = {q:.3g}), clip "
          f"{args.clip}, delta {args.delta:g}, {args.seeds} seeds; noise multipliers: "
          + ", ".join(f"{k} {v:.3g}" for k, v in sigmas.items()))
    rows: dict[str, list[dict[str, float]]] = {name: [] for name, _ in ARMS}
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        data = phantom_slices(2 * args.members, args.size, seed)
        members, nonmembers = data[:args.members], data[args.members:]
        for name, _ in ARMS:
            rows[name].append(one_arm(members, nonmembers, sigmas[name], args, seed))
            r = rows[name][-1]
            print(f"  seed {seed} {name:6s}: eps {r['epsilon']:.3g}  LOGAN {r['logan_auc']:.3f}  "
                  f"GAN-Leaks {r['ganleaks_auc']:.3f}  FD {r['frechet']:.4g}  "
                  f"({r['seconds']:.0f} s)", flush=True)
    base_fd = np.array([r["frechet"] for r in rows["no DP"]])
    print(f"\n{'arm':8s} {'epsilon':>8s} {'LOGAN AUC':>16s} {'GAN-Leaks AUC':>16s} "
          f"{'FD':>10s} {'utility ratio':>14s}")
    summary = {}
    for name, _ in ARMS:
        rs = rows[name]
        arr = {k: np.array([r[k] for r in rs]) for k in rs[0]}
        ratio = base_fd / arr["frechet"]  # per seed, side by side: no-DP FD / arm FD
        summary[name] = {k: float(v.mean()) for k, v in arr.items()} | {
            "utility_ratio": float(ratio.mean()), "logan_sd": float(arr["logan_auc"].std()),
            "ganleaks_sd": float(arr["ganleaks_auc"].std())}
        s = summary[name]
        print(f"{name:8s} {s['epsilon']:>8.3g} {s['logan_auc']:>9.3f} ± {s['logan_sd']:.3f} "
              f"{s['ganleaks_auc']:>9.3f} ± {s['ganleaks_sd']:.3f} {s['frechet']:>10.4g} "
              f"{s['utility_ratio']:>14.3f}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "rows": rows, "summary": summary}, indent=2))
    e8 = summary["eps=8"]
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    print(f"at eps=8: LOGAN AUC {e8['logan_auc']:.3f}, GAN-Leaks AUC {e8['ganleaks_auc']:.3f}, "
          f"utility ratio to no DP {e8['utility_ratio']:.3f} (bar: AUC <= 0.60, ratio >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
