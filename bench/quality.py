"""Quality benchmark: federated presets vs centralized vs each hospital alone (pix2pix T1w -> T2w).

Data: phantom T1w/T2w pairs (``fedsynth.demo_data.phantom_pair``) from 4 hospitals with different
scanner profiles (field strength, TR/TE, noise, field of view, rotation: a non-IID split). Every
4th slice of every hospital is held out; the pooled held-out pairs are the one test set.

Same compute budget ("optimiser steps x images"), with ``S = rounds x local_steps``:

- each federated hospital takes ``S`` optimiser steps (generator and discriminator) at ``batch``
  images, so the federation processes ``hospitals x S x batch`` images in ``S`` sequential steps;
- centralized training takes the same ``S`` steps on the pooled data at ``hospitals x batch``
  images: the same images processed, the same number of sequential steps;
- a hospital alone takes its own share, ``S`` steps at ``batch`` images, on its own data only
  (what it spends inside the federation, without the others).

The federation runs in-process, without Flower's transport: the real ``GanStrategy`` builds the
round's messages and aggregates real ``Message`` replies built by ``protocol.train_reply`` (under a
task identity, as in the unit tests), and each hospital runs the family's ``train_step`` and
answers with ``client.ua_gan.reply_plan``. Hospitals keep their Adam state between rounds
(``keep_optimizers``; only weights are averaged, standard FedAvg practice); the row "local-d,
fresh optimisers each round" rebuilds them every round instead, as ``client/trainer.py`` does
today. ``ua-gan`` is not run: pix2pix's discriminator is conditioned on a real input image, which
UA-GAN's coordinator does not have.

FedBN models keep per-hospital norm layers, so FedBN is scored as the mean over the hospitals'
own models on the held-out set. Metrics on [0, 1] intensities: SSIM (MONAI, 7x7 Gaussian), PSNR,
MAE. Two reference rows bound the scale: the input T1w scored as if it were the T2w, and the
untrained generator. A seed sets the scanner profiles' jitter, the phantom noise, the network
initialisations and the batches; ``--seeds`` (default 0 and 1) are averaged row by row, no seed is
picked. The last line prints the two ratios the issue asks for, computed from the seed-averaged
rows, over every federated row (the presets with kept optimisers, local-d with fresh ones, and
local-d with FedAvgM on the coordinator).
"""

from __future__ import annotations

import argparse
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from flwr.app import ConfigRecord, Message
from flwr.supercore.task_identity import TaskIdentity

from client.ua_gan import reply_plan
from protocol import records as protocol
from fedsynth.demo_data import default_profiles, phantom_pair
from server.aggregation import norm_state_keys
from server.presets import make_strategy
from shared_models import ModelConfig, StepContext, TrainConfig, encode, get_family
from shared_models.codec import decode_into

log = logging.getLogger("bench.quality")

PRESETS = ("fedgan", "local-d", "fedbn")  # fedmed-gan has local-d's policy for pix2pix
# Federated rows: row name -> (preset, policy overrides of the shared components, whether the
# hospitals keep their optimiser state between rounds). The last row is today's client trainer.
Variant = tuple[str, dict[str, Any], bool]
VARIANTS: dict[str, Variant] = {
    "fedgan": ("fedgan", {}, True),
    "local-d (= fedmed-gan)": ("local-d", {}, True),
    "fedbn": ("fedbn", {}, True),
    "local-d, fresh optimisers each round": ("local-d", {}, False),
    # FedAvgM (Hsu et al. 2019) on the shared generator; beta 0.5 (0.9 was worse on seed 0)
    "local-d + FedAvgM (beta 0.5)": ("local-d", {"server_opt": "avgm", "server_momentum": 0.5},
                                     True),
}
REFERENCE_ROWS = ("reference: input T1w as is", "reference: untrained generator")
Data = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class BenchConfig:
    hospitals: int = 4
    image_size: int = 32
    width: int = 8
    rounds: int = 24
    local_steps: int = 5
    batch: int = 4
    lr: float = 1e-3
    keep_optimizers: bool = True  # hospitals keep their Adam state between rounds (federated())
    seed: int = 0

    @property
    def steps(self) -> int:
        """Optimiser steps per hospital, and of centralized and hospital-alone training."""
        return self.rounds * self.local_steps

    def model(self) -> ModelConfig:
        return ModelConfig(family="pix2pix", image_size=self.image_size, width=self.width)

    def train_config(self) -> TrainConfig:
        return TrainConfig(local_steps=self.local_steps, batch_size=self.batch, lr_g=self.lr,
                           lr_d=self.lr, seed=self.seed)


def _norm(x: np.ndarray) -> np.ndarray:
    """Per-image scaling to [-1, 1] (MR has no absolute units)."""
    return (2 * x / max(float(x.max()), 1e-6) - 1).astype(np.float32)


def hospital_data(cfg: BenchConfig
                  ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
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


def _train(family, nets, opts, data: Data, steps: int, batch: int) -> None:  # noqa: ANN001
    ctx = StepContext()
    n = len(data["a"])
    for _ in range(steps):
        idx = torch.randint(n, (min(batch, n),))
        family.train_step({k: v[idx] for k, v in data.items()}, nets, opts, ctx)


def _metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """SSIM, PSNR (dB), MAE of ``pred`` against ``target``, both in [-1, 1], mapped to [0, 1]."""
    from monai.metrics import SSIMMetric

    pred = (pred.float().clamp(-1, 1) + 1) / 2
    target = (target.float() + 1) / 2
    ssim = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=7)(pred, target).mean().item()
    mse = ((pred - target) ** 2).flatten(1).mean(1)
    psnr = (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean().item()
    mae = (pred - target).abs().mean().item()
    return {"ssim": ssim, "psnr": psnr, "mae": mae}


@torch.no_grad()
def score(family, nets, held: Data) -> dict[str, float]:  # noqa: ANN001
    """SSIM, PSNR (dB), MAE of G(a) against b on the held-out set."""
    return _metrics(family.sample(nets, held["a"]), held["b"])


def references(cfg: BenchConfig, held: Data) -> dict[str, dict[str, float]]:
    """What no training gets: the T1w input taken as the T2w, and the untrained generator."""
    family = get_family("pix2pix")
    torch.manual_seed(cfg.seed)
    nets = family.build(cfg.model())
    return {REFERENCE_ROWS[0]: _metrics(held["a"], held["b"]),
            REFERENCE_ROWS[1]: score(family, nets, held)}


class _Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def run_rounds(family: Any, strategy: Any, sites: list, site_opts: list, train: Sequence[Data],
               arrays: dict[str, np.ndarray], model: Any, train_cfg: Any, cfg: "BenchConfig",
               keep_optimizers: bool = True, local_train: Any = None) -> dict[str, np.ndarray]:
    """``cfg.rounds`` rounds through ``strategy``: every hospital decodes its message, trains
    ``cfg.local_steps`` steps, replies as ``client.app`` would; after aggregation the evaluate
    message updates each hospital's copy. Returns the global arrays. ``local_train`` (default:
    this module's paired-batch ``_train``) is one hospital's local work."""
    local_train = local_train or _train
    grid = _Grid(list(range(1, len(sites) + 1)))
    for rnd in range(1, cfg.rounds + 1):
        msgs = list(strategy.configure_train(rnd, protocol.to_record(arrays),
                                             protocol.train_config(model, train_cfg, rnd), grid))
        replies = []
        for msg in msgs:
            i = msg.metadata.dst_node_id - 1
            nets = sites[i]
            decode_into(nets, protocol.from_record(msg.content[protocol.ARRAYS]))
            if not keep_optimizers:
                site_opts[i] = family.optimizers(nets, train_cfg)
            torch.manual_seed(cfg.seed * 1009 + rnd * 31 + i)
            local_train(family, nets, site_opts[i], train[i], cfg.local_steps, cfg.batch)
            comps, include = reply_plan(msg.content[protocol.CONFIG], nets, family.components)
            examples = family.examples(train[i])
            metrics = {protocol.NUM_EXAMPLES: max(examples.values()),
                       **{protocol.examples_key(c): n for c, n in examples.items()}}
            replies.append(Message(protocol.train_reply(encode(nets, comps, include=include),
                                                        metrics), reply_to=msg))
        record, _ = strategy.aggregate_train(rnd, replies)
        if record is not None:
            arrays = protocol.from_record(record)
        # what a hospital receives after aggregation (the evaluate message) updates its copy
        for msg in strategy.configure_evaluate(rnd, protocol.to_record(arrays),
                                               ConfigRecord({}), grid):
            decode_into(sites[msg.metadata.dst_node_id - 1],
                        protocol.from_record(msg.content[protocol.ARRAYS]))
    return arrays


def federated(preset: str, cfg: BenchConfig, train: Sequence[Data], held: Data,
              overrides: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Train ``preset`` (with policy ``overrides``) in-process through the real strategy."""
    family = get_family("pix2pix")
    model, train_cfg = cfg.model(), cfg.train_config()
    torch.manual_seed(cfg.seed)
    global_nets = family.build(model)
    arrays = encode(global_nets)
    sites = []
    for i in range(cfg.hospitals):  # each hospital builds its own nets (its own init)
        torch.manual_seed(cfg.seed * 100 + i + 1)
        sites.append(family.build(model))
    # decode_into copies into the parameters in place, so optimisers built once stay attached
    site_opts = [family.optimizers(nets, train_cfg) for nets in sites]
    strategy = make_strategy(preset, family.components, overrides=overrides or None,
                             norm_keys=norm_state_keys(global_nets))
    arrays = run_rounds(family, strategy, sites, site_opts, train, arrays, model, train_cfg,
                        cfg, keep_optimizers=cfg.keep_optimizers)
    if preset == "fedbn":  # personalised norm layers: score every hospital's own model
        scores = [score(family, nets, held) for nets in sites]
        return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
    decode_into(global_nets, arrays)
    return score(family, global_nets, held)


def _solo(cfg: BenchConfig, data: Data, batch: int, held: Data) -> dict[str, float]:
    family = get_family("pix2pix")
    torch.manual_seed(cfg.seed)
    nets = family.build(cfg.model())
    opts = family.optimizers(nets, cfg.train_config())
    torch.manual_seed(cfg.seed * 1009 + 7)
    _train(family, nets, opts, data, cfg.steps, batch)
    return score(family, nets, held)


def centralized(cfg: BenchConfig, train: Sequence[Data], held: Data) -> dict[str, float]:
    """``steps`` steps on the pooled data at ``hospitals x batch`` images."""
    pooled = {k: torch.cat([t[k] for t in train]) for k in ("a", "b")}
    return _solo(cfg, pooled, cfg.batch * cfg.hospitals, held)


def alone(i: int, cfg: BenchConfig, train: Sequence[Data], held: Data) -> dict[str, float]:
    """``steps`` steps on hospital ``i``'s own data at ``batch`` images."""
    return _solo(cfg, train[i], cfg.batch, held)


def alone_rows(cfg: BenchConfig) -> list[str]:
    return [f"hospital-{i + 1} alone" for i in range(cfg.hospitals)]


@contextmanager
def task_identity() -> Iterator[None]:
    """A task identity, as in the unit tests: ``Message`` needs one outside a Flower run."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def run_seed(cfg: BenchConfig, variants: Mapping[str, Variant] = VARIANTS
             ) -> dict[str, dict[str, float]]:
    """All rows of the table for ``cfg.seed``."""
    with task_identity():
        train, held = hospital_data(cfg)
        rows = references(cfg, held)
        t0 = time.perf_counter()
        rows["centralized"] = centralized(cfg, train, held)
        log.info("seed %d centralized %s (%.0f s)", cfg.seed, rows["centralized"],
                 time.perf_counter() - t0)
        for i, name in enumerate(alone_rows(cfg)):
            rows[name] = alone(i, cfg, train, held)
        log.info("alone done (%.0f s)", time.perf_counter() - t0)
        for name, (preset, overrides, keep) in variants.items():
            rows[name] = federated(preset, replace(cfg, keep_optimizers=keep), train, held,
                                   overrides)
            log.info("%s %s (%.0f s)", name, rows[name], time.perf_counter() - t0)
    return rows


def mean_rows(per_seed: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """Row-by-row, metric-by-metric mean over seeds."""
    return {name: {k: float(np.mean([r[name][k] for r in per_seed])) for k in per_seed[0][name]}
            for name in per_seed[0]}


def ratios(rows: Mapping[str, Mapping[str, float]], federated_rows: Sequence[str],
           alone_names: Sequence[str]) -> tuple[str, float, float]:
    """(best federated row, its SSIM / centralized SSIM, mean hospital-alone SSIM / centralized)."""
    c = rows["centralized"]["ssim"]
    best = max(federated_rows, key=lambda n: rows[n]["ssim"])
    mean_alone = float(np.mean([rows[n]["ssim"] for n in alone_names]))
    return best, rows[best]["ssim"] / c, mean_alone / c


def run(cfg: BenchConfig, seeds: Sequence[int] | None = None,
        variants: Mapping[str, Variant] = VARIANTS
        ) -> tuple[dict[str, dict[str, float]], float, float]:
    """Seed-averaged rows, plus (best federated / centralized, mean alone / centralized) SSIM."""
    per_seed = [run_seed(replace(cfg, seed=s), variants) for s in (seeds or [cfg.seed])]
    rows = mean_rows(per_seed)
    _, fed, solo = ratios(rows, list(variants), alone_rows(cfg))
    return rows, fed, solo


def table(rows: Mapping[str, Mapping[str, float]]) -> str:
    lines = ["| training | SSIM | PSNR (dB) | MAE |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {r['ssim']:.4f} | {r['psnr']:.2f} | {r['mae']:.4f} |"
              for name, r in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = BenchConfig()
    parser.add_argument("--rounds", type=int, default=d.rounds)
    parser.add_argument("--local-steps", type=int, default=d.local_steps)
    parser.add_argument("--width", type=int, default=d.width)
    parser.add_argument("--batch", type=int, default=d.batch)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    torch.set_num_threads(args.threads)
    cfg = BenchConfig(rounds=args.rounds, local_steps=args.local_steps, width=args.width,
                      batch=args.batch, lr=args.lr)
    t0 = time.perf_counter()
    rows, fed_ratio, alone_ratio = run(cfg, args.seeds)
    best, _, _ = ratios(rows, list(VARIANTS), alone_rows(cfg))
    print(f"pix2pix T1w->T2w, {cfg.hospitals} hospitals, {cfg.image_size}px, width {cfg.width}, "
          f"{cfg.rounds} rounds x {cfg.local_steps} local steps, batch {cfg.batch}, lr {cfg.lr:g}, "
          f"seeds {args.seeds} (mean), {time.perf_counter() - t0:.0f} s")
    print(table(rows))
    mean_alone = alone_ratio * rows["centralized"]["ssim"]
    met = fed_ratio >= 0.95 and rows[best]["ssim"] > mean_alone
    print(f"bar (best federated >= 0.95 x centralized and > mean alone): "
          f"{'met' if met else 'NOT met'} (best federated: {best})")
    print(f"best federated SSIM / centralized SSIM = {fed_ratio:.3f}; "
          f"mean hospital-alone SSIM / centralized SSIM = {alone_ratio:.3f}")


if __name__ == "__main__":
    main()
