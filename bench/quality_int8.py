"""The int8 wire format's quality cost: the quality benchmark's federation, fp32 vs int8 replies.

Same data, model, preset, seeds and rounds as ``bench/quality.py`` (pix2pix T1w -> T2w on the
demo hospitals, ``run_federation`` over the in-process grid with the real ClientApp, so the int8
path is the hospital's ``client/wire.py`` and the coordinator's validation), the two rows side by
side in one run, only ``wire-dtype`` differs. Bar: int8's SSIM >= 0.99 x fp32's (seed-averaged).
``make bench-net`` runs it after the shaped links; alone: ``python -m bench.quality_int8``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from shared_models import get_family
from shared_models.codec import decode_into

from .quality import BenchConfig, federation_config, hospital_data, run_federated, score

PRESET = "local-d"  # the quality benchmark's default pix2pix row (= fedmed-gan)


def one(cfg: BenchConfig, wire: str) -> dict[str, float]:
    family = get_family("pix2pix")
    model = cfg.model()
    _, held = hospital_data(cfg)
    train = replace(cfg.train_config(), wire_dtype=wire)
    fcfg = federation_config(PRESET, model, train, cfg.rounds)
    arrays, _ = run_federated(fcfg, _settings(cfg), cfg.keep_optimizers)
    nets = family.build(model)
    decode_into(nets, arrays)
    return score(family, nets, held)


def _settings(cfg: BenchConfig):  # noqa: ANN202
    from .quality import hospital_settings

    return hospital_settings(cfg)


def main(argv: list[str] | None = None) -> int:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args(argv)
    rows: dict[str, list[dict[str, float]]] = {"float32": [], "int8": []}
    t0 = time.perf_counter()
    for seed in args.seeds:
        cfg = replace(d, rounds=args.rounds, seed=seed)
        for wire in rows:  # side by side, same seed
            rows[wire].append(one(cfg, wire))
            print(f"seed {seed} {wire}: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                      rows[wire][-1].items()), flush=True)
    mean = {w: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for w, rs in rows.items()}
    ratio = mean["int8"]["ssim"] / mean["float32"]["ssim"]
    print(f"int8_ssim_over_fp32_pix2pix: {ratio:.4f} (bar >= 0.99; SSIM fp32 "
          f"{mean['float32']['ssim']:.4f}, int8 {mean['int8']['ssim']:.4f}; {args.rounds} rounds, "
          f"seeds {args.seeds}; {time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
