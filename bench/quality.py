"""Quality benchmark: federated presets vs centralized vs each hospital alone (pix2pix T1w -> T2w).

Data: phantom T1w/T2w pairs (``fedsynth.demo_data.phantom_pair``) from 4 hospitals with different
scanner profiles (field strength, TR/TE, noise, field of view, rotation: a non-IID split). Every
4th slice of every hospital is held out; the pooled held-out pairs are the one test set.

Same compute budget for everyone: ``rounds x local_steps`` optimiser steps per hospital at
``batch`` images; centralized training takes the same number of steps on the pooled data with
``4 x batch`` images (the images the four hospitals process together); a hospital alone takes
``rounds x local_steps`` steps on its own data.

The federation runs in-process, without Flower's transport: the real ``GanStrategy`` builds the
round's messages and aggregates real ``Message`` replies built by ``protocol.train_reply`` (under a
task identity, as in the unit tests), and each hospital runs the family's ``train_step`` and
answers with ``client.ua_gan.reply_plan``. ``ua-gan`` is not run: pix2pix's discriminator is
conditioned on a real input image, which UA-GAN's coordinator does not have.

FedBN models keep per-hospital norm layers, so FedBN is scored as the mean over the hospitals'
own models on the held-out set. Metrics on [0, 1] intensities: SSIM (MONAI, 7x7 Gaussian), PSNR,
MAE. The last line prints the two ratios the issue asks for.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from flwr.app import ConfigRecord, Message
from flwr.supercore.task_identity import TaskIdentity

from client.ua_gan import reply_plan
from fedsynth import protocol
from fedsynth.demo_data import default_profiles, phantom_pair
from server.aggregation import norm_state_keys
from server.presets import make_strategy
from shared_models import ModelConfig, StepContext, TrainConfig, encode, get_family
from shared_models.codec import decode_into

log = logging.getLogger("bench.quality")

PRESETS = ("fedgan", "local-d", "fedbn")  # fedmed-gan has local-d's policy for pix2pix


@dataclass(frozen=True)
class BenchConfig:
    hospitals: int = 4
    image_size: int = 32
    width: int = 4
    rounds: int = 10
    local_steps: int = 10
    batch: int = 4
    seed: int = 0


def _norm(x: np.ndarray) -> np.ndarray:
    """Per-image scaling to [-1, 1] (MR has no absolute units)."""
    return (2 * x / max(float(x.max()), 1e-6) - 1).astype(np.float32)


def hospital_data(cfg: BenchConfig) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Per-hospital training pairs and the pooled held-out pairs (every 4th slice)."""
    train, held_a, held_b = [], [], []
    for i, profile in enumerate(default_profiles(cfg.hospitals, cfg.seed)):
        rng = np.random.default_rng([cfg.seed, i])
        a_list, b_list = [], []
        for s in range(profile.slices):
            t1, t2 = phantom_pair(profile, s, cfg.image_size, rng)
            (held_a if s % 4 == 3 else a_list).append(_norm(t1)[None])
            (held_b if s % 4 == 3 else b_list).append(_norm(t2)[None])
        train.append({"a": torch.from_numpy(np.stack(a_list)),
                      "b": torch.from_numpy(np.stack(b_list))})
    held = {"a": torch.from_numpy(np.stack(held_a)), "b": torch.from_numpy(np.stack(held_b))}
    return train, held


def _train(family, nets, data: Mapping[str, torch.Tensor], steps: int, batch: int,  # noqa: ANN001
           train_cfg: TrainConfig) -> None:
    opts = family.optimizers(nets, train_cfg)
    ctx = StepContext()
    n = len(data["a"])
    for _ in range(steps):
        idx = torch.randint(n, (min(batch, n),))
        family.train_step({k: v[idx] for k, v in data.items()}, nets, opts, ctx)


@torch.no_grad()
def score(family, nets, held: Mapping[str, torch.Tensor]) -> dict[str, float]:  # noqa: ANN001
    """SSIM, PSNR (dB), MAE of G(a) against b, both mapped to [0, 1]."""
    from monai.metrics import SSIMMetric

    pred = (family.sample(nets, held["a"]).float().clamp(-1, 1) + 1) / 2
    target = (held["b"].float() + 1) / 2
    ssim = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=7)(pred, target).mean().item()
    mse = ((pred - target) ** 2).flatten(1).mean(1)
    psnr = (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean().item()
    mae = (pred - target).abs().mean().item()
    return {"ssim": ssim, "psnr": psnr, "mae": mae}


def federated(preset: str, cfg: BenchConfig, train: list[dict[str, torch.Tensor]],
              held: Mapping[str, torch.Tensor]) -> dict[str, float]:
    family = get_family("pix2pix")
    model = ModelConfig(family="pix2pix", image_size=cfg.image_size, width=cfg.width)
    train_cfg = TrainConfig(local_steps=cfg.local_steps, batch_size=cfg.batch, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    global_nets = family.build(model)
    arrays = encode(global_nets)
    sites = []
    for i in range(cfg.hospitals):  # each hospital builds its own nets (its own init)
        torch.manual_seed(cfg.seed * 100 + i + 1)
        sites.append(family.build(model))
    strategy = make_strategy(preset, family.components, norm_keys=norm_state_keys(global_nets))
    grid = _Grid(list(range(1, cfg.hospitals + 1)))
    for rnd in range(1, cfg.rounds + 1):
        msgs = list(strategy.configure_train(rnd, protocol.to_record(arrays),
                                             protocol.train_config(model, train_cfg, rnd), grid))
        replies = []
        for msg in msgs:
            i = msg.metadata.dst_node_id - 1
            nets = sites[i]
            decode_into(nets, protocol.from_record(msg.content[protocol.ARRAYS]))
            torch.manual_seed(cfg.seed * 1009 + rnd * 31 + i)
            _train(family, nets, train[i], cfg.local_steps, cfg.batch, train_cfg)
            comps, include = reply_plan(msg.content[protocol.CONFIG], nets, family.components)
            out = encode(nets, comps, include=include)
            metrics = {protocol.NUM_EXAMPLES: len(train[i]["a"]),
                       **{protocol.examples_key(c): len(train[i]["a"])
                          for c in family.components}}
            replies.append(Message(protocol.train_reply(out, metrics), reply_to=msg))
        record, _ = strategy.aggregate_train(rnd, replies)
        if record is not None:
            arrays = protocol.from_record(record)
        # what a hospital receives after aggregation (the evaluate message) updates its copy
        for i, msg in enumerate(strategy.configure_evaluate(rnd, protocol.to_record(arrays),
                                                            ConfigRecord({}), grid)):
            decode_into(sites[msg.metadata.dst_node_id - 1],
                        protocol.from_record(msg.content[protocol.ARRAYS]))
    if preset == "fedbn":  # personalised norm layers: score every hospital's own model
        scores = [score(family, nets, held) for nets in sites]
        return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
    decode_into(global_nets, arrays)
    return score(family, global_nets, held)


class _Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def centralized(cfg: BenchConfig, train: list[dict[str, torch.Tensor]],
                held: Mapping[str, torch.Tensor]) -> dict[str, float]:
    family = get_family("pix2pix")
    model = ModelConfig(family="pix2pix", image_size=cfg.image_size, width=cfg.width)
    torch.manual_seed(cfg.seed)
    nets = family.build(model)
    pooled = {k: torch.cat([t[k] for t in train]) for k in ("a", "b")}
    _train(family, nets, pooled, cfg.rounds * cfg.local_steps, cfg.batch * cfg.hospitals,
           TrainConfig(batch_size=cfg.batch, seed=cfg.seed))
    return score(family, nets, held)


def alone(i: int, cfg: BenchConfig, train: list[dict[str, torch.Tensor]],
          held: Mapping[str, torch.Tensor]) -> dict[str, float]:
    family = get_family("pix2pix")
    model = ModelConfig(family="pix2pix", image_size=cfg.image_size, width=cfg.width)
    torch.manual_seed(cfg.seed)
    nets = family.build(model)
    _train(family, nets, train[i], cfg.rounds * cfg.local_steps, cfg.batch,
           TrainConfig(batch_size=cfg.batch, seed=cfg.seed))
    return score(family, nets, held)


def run(cfg: BenchConfig) -> tuple[dict[str, dict[str, float]], float, float]:
    """All rows of the table, plus (best federated / centralized, mean alone / centralized) SSIM."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        train, held = hospital_data(cfg)
        rows: dict[str, dict[str, float]] = {}
        t0 = time.perf_counter()
        rows["centralized"] = centralized(cfg, train, held)
        log.info("centralized %s (%.0f s)", rows["centralized"], time.perf_counter() - t0)
        for i in range(cfg.hospitals):
            rows[f"hospital-{i + 1} alone"] = alone(i, cfg, train, held)
        log.info("alone done (%.0f s)", time.perf_counter() - t0)
        for preset in PRESETS:
            rows[preset] = federated(preset, cfg, train, held)
            log.info("%s %s (%.0f s)", preset, rows[preset], time.perf_counter() - t0)
        log.info("benchmark took %.0f s", time.perf_counter() - t0)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    c = rows["centralized"]["ssim"]
    best = max(rows[p]["ssim"] for p in PRESETS)
    mean_alone = float(np.mean([rows[f"hospital-{i + 1} alone"]["ssim"]
                                for i in range(cfg.hospitals)]))
    return rows, best / c, mean_alone / c


def table(rows: Mapping[str, Mapping[str, float]]) -> str:
    lines = ["| training | SSIM | PSNR (dB) | MAE |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {r['ssim']:.4f} | {r['psnr']:.2f} | {r['mae']:.4f} |"
              for name, r in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=BenchConfig.rounds)
    parser.add_argument("--local-steps", type=int, default=BenchConfig.local_steps)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    torch.set_num_threads(args.threads)
    cfg = BenchConfig(rounds=args.rounds, local_steps=args.local_steps)
    rows, fed_ratio, alone_ratio = run(cfg)
    print(f"pix2pix T1w->T2w, {cfg.hospitals} hospitals, {cfg.image_size}px, width {cfg.width}, "
          f"{cfg.rounds} rounds x {cfg.local_steps} local steps, batch {cfg.batch}")
    print(table(rows))
    print(f"best federated SSIM / centralized SSIM = {fed_ratio:.3f}; "
          f"mean hospital-alone SSIM / centralized SSIM = {alone_ratio:.3f}")


if __name__ == "__main__":
    main()
