"""Quality benchmark: federated presets vs centralized vs each hospital alone (pix2pix T1w -> T2w).

Data: the demo hospitals' phantom T1w/T2w DICOM series (``fedsynth.demo_data``, no real files),
``hospitals`` of them with different scanner profiles (field strength, TR/TE, noise, field of view,
rotation: a non-IID split), as each hospital's ClientApp loads them (``client.datasets``: per-slice
percentile scaling, pairs by study and slice position). Every 4th pair is held out
(``holdout-every = 4``); the pooled held-out pairs are the one test set, and every row trains on
exactly the hospitals' training pairs.

Same compute budget ("optimiser steps x images"), with ``S = rounds x local_steps``:

- each federated hospital takes ``S`` optimiser steps (generator and discriminator) at ``batch``
  images, so the federation processes ``hospitals x S x batch`` images in ``S`` sequential steps;
- centralized training takes the same ``S`` steps on the pooled data at ``hospitals x batch``
  images: the same images processed, the same number of sequential steps;
- a hospital alone takes its own share, ``S`` steps at ``batch`` images, on its own data only
  (what it spends inside the federation, without the others).

The federation is the deployed one without its transport: ``server.federation.run_federation``
(the ServerApp's round loop: strategy, validation, run folder) over ``fedsynth.inprocess``'s Grid,
which hands every message to the real ClientApp (``client.app.app``) of each virtual hospital.
Hospitals keep their Adam state between rounds (``keep_optimizers``: ``KeptOptimizers`` wraps the
ClientApp; only weights are averaged, standard FedAvg practice); the row "local-d, fresh
optimisers each round" is the ClientApp as it is (``client/trainer.py`` builds them every round).
``ua-gan`` is not run: pix2pix's discriminator is conditioned on a real input image, which
UA-GAN's coordinator does not have.

FedBN models keep per-hospital norm layers, so FedBN is scored as the mean over the hospitals' own
models (each hospital's kept weights with the last model it received) on the held-out set. Metrics
on [0, 1] intensities: SSIM (MONAI, 7x7 Gaussian), PSNR, MAE. Two reference rows bound the scale:
the input T1w scored as if it were the T2w, and the untrained generator. A seed sets the scanner
profiles' jitter, the phantom noise, the network initialisations and the batches; ``--seeds``
(default 0 and 1) are averaged row by row, no seed is picked. The last line prints the two ratios
the issue asks for, computed from the seed-averaged rows, over every federated row (the presets
with kept optimisers, local-d with fresh ones, and local-d with FedAvgM on the coordinator).

``--client-dp-epsilon 8 1`` (issue 26 item 3) runs, instead of the preset rows, ``fedgan`` without
DP and ``fedgan`` with client-level DP on the aggregate (``server/client_dp.py``) at each target
epsilon over the run's rounds (all hospitals train: sampling rate 1; the noise multiplier from
Opacus' RDP accountant, ``server.client_dp.noise_for_epsilon``, at delta 1e-5), each hospital's
update clipped to ``--client-dp-clip``; the last line prints each arm's SSIM over no DP's.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from flwr.app import Context, Message

from fedsynth.demo_data import build_demo_hospitals
from fedsynth.inprocess import InProcessGrid, run_inprocess
from protocol import records as protocol
from server.federation import FederationConfig
from server.run_folder import load_checkpoint
from shared_models import DataConfig, ModelConfig, StepContext, TrainConfig, get_family
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
    curve_points: int = 0  # rounds along the run scored for the learning curve (0: none)

    @property
    def steps(self) -> int:
        """Optimiser steps per hospital, and of centralized and hospital-alone training."""
        return self.rounds * self.local_steps

    def model(self) -> ModelConfig:
        return ModelConfig(family="pix2pix", image_size=self.image_size, width=self.width)

    def curve_rounds(self) -> list[int]:
        """``curve_points`` rounds spread evenly along the run, the last among them."""
        n = self.curve_points
        return sorted({max(1, round(self.rounds * (i + 1) / n)) for i in range(n)}) if n else []

    def train_config(self) -> TrainConfig:
        return TrainConfig(local_steps=self.local_steps, batch_size=self.batch, lr_g=self.lr,
                           lr_d=self.lr, seed=self.seed)


HOLDOUT_EVERY = 4  # every 4th pair (slice, for generation families) of a hospital is held out
_WORK: dict[str, Path] = {}


def work_dir() -> Path:
    """This process's scratch folder (demo DICOM, slice caches, run folders); gone at exit."""
    if "root" not in _WORK:
        _WORK["root"] = Path(tempfile.mkdtemp(prefix="fedsynth-bench-quality-"))
        atexit.register(shutil.rmtree, _WORK["root"], True)
    return _WORK["root"]


def hospital_settings(cfg: BenchConfig) -> list[dict[str, Any]]:
    """Each virtual hospital's settings (its node config): the demo phantom DICOM of ``cfg.seed``
    at ``cfg.image_size``, written once per process, a slice cache, CPU, 1 in 4 held out."""
    root = work_dir() / f"data-{cfg.hospitals}h-seed{cfg.seed}-{cfg.image_size}px"
    if not root.is_dir():
        tmp = root.with_name(root.name + ".tmp")
        build_demo_hospitals(tmp, cfg.hospitals, seed=cfg.seed, matrix=cfg.image_size,
                             include_real=False)
        tmp.rename(root)
    folders = sorted((p for p in root.iterdir() if p.is_dir()),
                     key=lambda p: int(p.name.rsplit("-", 1)[-1]))
    return [{"data-dir": str(f), "cache-dir": str(work_dir() / "cache" / root.name / f.name),
             "name": f"hospital-{i + 1}", "device": "cpu", "holdout-every": HOLDOUT_EVERY}
            for i, f in enumerate(folders)]


def load_hospital(settings: Mapping[str, Any], model: ModelConfig,
                  data: DataConfig | None = None) -> tuple[dict[str, torch.Tensor],
                                                          dict[str, torch.Tensor]]:
    """(train, held out) tensors of ``model``'s family, exactly as the hospital's ClientApp
    loads them (``client.datasets.local_data``)."""
    from client.datasets import local_data
    from client.settings import HospitalSettings

    loaded = local_data(HospitalSettings.from_mapping(settings), model, data)
    return ({k: v.clone() for k, v in loaded.train.items()},
            {k: v.clone() for k, v in loaded.holdout.items()})


def hospital_data(cfg: BenchConfig
                  ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Per-hospital training pairs and the pooled held-out pairs (every 4th pair)."""
    loaded = [load_hospital(h, cfg.model()) for h in hospital_settings(cfg)]
    held = {k: torch.cat([h[k] for _, h in loaded]) for k in ("a", "b")}
    return [t for t, _ in loaded], held


# A learning curve: (optimiser steps per hospital, SSIM/PSNR/MAE) points, appended to as a row trains
Curve = list[tuple[int, dict[str, float]]]


def _train(family, nets, opts, data: Data, steps: int, batch: int,  # noqa: ANN001
           every: Sequence[int] = (), on_step: Callable[[int], None] | None = None) -> None:
    """``steps`` steps; ``on_step(step)`` after each step in ``every`` (it must not draw from
    torch's RNG, or the batches after it would differ from a run without the curve)."""
    ctx = StepContext()
    n = len(data["a"])
    marks = set(every)
    for step in range(1, steps + 1):
        idx = torch.randint(n, (min(batch, n),))
        family.train_step({k: v[idx] for k, v in data.items()}, nets, opts, ctx)
        if on_step is not None and step in marks:
            with torch.random.fork_rng(devices=[]):
                on_step(step)


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


ClientAppFn = Callable[[Message, Context], Message]
_MISSING = object()


class KeptOptimizers:
    """The ClientApp, with each hospital keeping its optimisers (Adam state) between rounds.

    ``client/trainer.py`` builds fresh optimisers every round (``LocalTrainer.fit``), and nothing
    in ``run_federation`` can change that: it happens at the hospital. This wrapper lets the
    hospital's family hand back, during that hospital's train messages, the optimisers it built
    for the hospital in its first round. They stay attached: the in-process hospitals share a
    warm trainer (``client.run_state.trainer_for``) whose parameters are loaded in place every round.
    """

    def __init__(self, app: ClientAppFn | None = None) -> None:
        if app is None:
            from client.app import app as client_app

            app = client_app
        self.app = app
        self.kept: dict[int, dict[str, torch.optim.Optimizer]] = {}

    def __call__(self, msg: Message, context: Context) -> Message:
        if str(msg.metadata.message_type) != "train":
            return self.app(msg, context)
        model, _, _ = protocol.parse_train_config(msg.content[protocol.CONFIG])
        cls = type(get_family(model.family))
        own = cls.__dict__.get("optimizers", _MISSING)
        build = cls.optimizers
        kept, node = self.kept, int(context.node_id)

        def optimizers(family, nets, train):  # noqa: ANN001, ANN202
            opts = kept.get(node)
            params = {id(p) for net in nets.values() for p in net.parameters()}
            if opts is None or any(id(p) not in params for o in opts.values()
                                   for g in o.param_groups for p in g["params"]):
                opts = kept[node] = build(family, nets, train)
            return opts

        cls.optimizers = optimizers
        try:
            return self.app(msg, context)
        finally:
            if own is _MISSING:
                del cls.optimizers
            else:
                cls.optimizers = own


@dataclass(frozen=True)
class BenchFederationConfig(FederationConfig):
    """A run configuration with policy overrides the run settings do not have (FedAvgM's
    ``server_momentum``); ``run_federation`` reads them through ``policy_overrides``."""

    extra_overrides: tuple[tuple[str, Any], ...] = ()

    def policy_overrides(self) -> dict[str, Any]:
        return {**super().policy_overrides(), **dict(self.extra_overrides)}


RUN_SETTINGS = ("reducer", "server_opt", "server_lr", "sync_every",  # overrides with a setting
                "client_dp_noise_multiplier", "client_dp_clip")
CLIENT_DP_DELTA = 1e-5


def client_dp_variants(epsilons: Sequence[float], rounds: int, clip: float
                       ) -> dict[str, Variant]:
    """``fedgan`` without DP, then ``fedgan`` with client-level DP calibrated to each target
    epsilon over ``rounds`` releases at sampling rate 1 (every hospital trains each round)."""
    from server.client_dp import noise_for_epsilon

    out: dict[str, Variant] = {"fedgan": VARIANTS["fedgan"]}
    for eps in epsilons:
        z = noise_for_epsilon(eps, rounds, 1.0, CLIENT_DP_DELTA)
        out[f"fedgan, client-level DP eps={eps:g} (z {z:.2f}, C {clip:g})"] = (
            "fedgan", {"client_dp_noise_multiplier": z, "client_dp_clip": clip}, True)
    return out


def federation_config(preset: str, model: ModelConfig, train: TrainConfig, rounds: int,
                      overrides: Mapping[str, Any] | None = None) -> FederationConfig:
    """The run: ``preset`` with ``overrides``; hospitals evaluate in the last round only; 4-image
    sample grids; one checkpoint; in this process's scratch folder."""
    overrides = dict(overrides or {})
    fields = {k: overrides.pop(k) for k in RUN_SETTINGS if k in overrides}
    return BenchFederationConfig(
        model=model, train=train, rounds=rounds, preset=preset, evaluate_every=rounds,
        run_dir=str(work_dir() / "runs"), run_id=f"{preset}-{time.time_ns()}", num_samples=4,
        keep_checkpoints=1, extra_overrides=tuple(sorted(overrides.items())), **fields)


def run_federated(fcfg: FederationConfig, hospitals: Sequence[Mapping[str, Any]],
                  keep_optimizers: bool = True) -> tuple[dict[str, np.ndarray], InProcessGrid]:
    """``run_federation`` over the in-process grid of ``hospitals``: the final global arrays
    (the last checkpoint) and the grid (each hospital's context)."""
    app = KeptOptimizers() if keep_optimizers else None
    folder, grid = run_inprocess(fcfg, hospitals, app=app)
    arrays, _ = load_checkpoint(sorted((folder / "checkpoints").glob("round-*.npz"))[-1])
    return arrays, grid


def hospital_nets(family: Any, model: ModelConfig, grid: InProcessGrid) -> list[dict]:
    """Each hospital's own model (personalised presets: FedBN's norm layers stay local)."""
    out = []
    for node in grid.node_ids:
        nets = family.build(model)
        decode_into(nets, grid.local_arrays(node))
        out.append(nets)
    return out


def federated(preset: str, cfg: BenchConfig, train: Sequence[Data], held: Data,
              overrides: Mapping[str, Any] | None = None, curve: Curve | None = None
              ) -> dict[str, float]:
    """Train ``preset`` (with policy ``overrides``) through ``run_federation`` and the real
    ClientApp; ``train`` is what the hospitals load themselves (``hospital_data``). With
    ``curve`` (and ``cfg.curve_points``), the learning curve's points are appended to it."""
    family = get_family("pix2pix")
    model = cfg.model()
    fcfg = federation_config(preset, model, cfg.train_config(), cfg.rounds, overrides)
    if curve is not None and cfg.curve_points:
        from bench.quality_curve import federated_curve

        final, points = federated_curve(family, cfg, fcfg, held, personal=preset == "fedbn")
        curve.extend(points)
        return final
    arrays, grid = run_federated(fcfg, hospital_settings(cfg), cfg.keep_optimizers)
    if preset == "fedbn":  # personalised norm layers: score every hospital's own model
        scores = [score(family, nets, held) for nets in hospital_nets(family, model, grid)]
        return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
    nets = family.build(model)
    decode_into(nets, arrays)
    return score(family, nets, held)


def _solo(cfg: BenchConfig, data: Data, batch: int, held: Data, curve: Curve | None = None
          ) -> dict[str, float]:
    family = get_family("pix2pix")
    torch.manual_seed(cfg.seed)
    nets = family.build(cfg.model())
    opts = family.optimizers(nets, cfg.train_config())
    torch.manual_seed(cfg.seed * 1009 + 7)
    marks = [r * cfg.local_steps for r in cfg.curve_rounds()] if curve is not None else []
    _train(family, nets, opts, data, cfg.steps, batch, marks,
           lambda step: curve.append((step, score(family, nets, held))))  # type: ignore[union-attr]
    return score(family, nets, held)


def centralized(cfg: BenchConfig, train: Sequence[Data], held: Data, curve: Curve | None = None
                ) -> dict[str, float]:
    """``steps`` steps on the pooled data at ``hospitals x batch`` images."""
    pooled = {k: torch.cat([t[k] for t in train]) for k in ("a", "b")}
    return _solo(cfg, pooled, cfg.batch * cfg.hospitals, held, curve)


def alone(i: int, cfg: BenchConfig, train: Sequence[Data], held: Data,
          curve: Curve | None = None) -> dict[str, float]:
    """``steps`` steps on hospital ``i``'s own data at ``batch`` images."""
    return _solo(cfg, train[i], cfg.batch, held, curve)


def alone_rows(cfg: BenchConfig) -> list[str]:
    return [f"hospital-{i + 1} alone" for i in range(cfg.hospitals)]


def run_seed(cfg: BenchConfig, variants: Mapping[str, Variant] = VARIANTS,
             curves: dict[str, Curve] | None = None) -> dict[str, dict[str, float]]:
    """All rows of the table for ``cfg.seed``; with ``curves``, each row's learning curve points
    (``cfg.curve_points`` of them) are appended to ``curves[row]``."""
    train, held = hospital_data(cfg)
    rows = references(cfg, held)
    t0 = time.perf_counter()

    def curve(name: str) -> Curve | None:
        return None if curves is None else curves.setdefault(name, [])

    rows["centralized"] = centralized(cfg, train, held, curve("centralized"))
    log.info("seed %d centralized %s (%.0f s)", cfg.seed, rows["centralized"],
             time.perf_counter() - t0)
    for i, name in enumerate(alone_rows(cfg)):
        rows[name] = alone(i, cfg, train, held, curve(name))
    log.info("alone done (%.0f s)", time.perf_counter() - t0)
    for name, (preset, overrides, keep) in variants.items():
        rows[name] = federated(preset, replace(cfg, keep_optimizers=keep), train, held,
                               overrides, curve(name))
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
        variants: Mapping[str, Variant] = VARIANTS, curves: dict[str, Curve] | None = None
        ) -> tuple[dict[str, dict[str, float]], float, float]:
    """Seed-averaged rows, plus (best federated / centralized, mean alone / centralized) SSIM;
    ``curves`` collects every seed's learning-curve points by row."""
    per_seed = [run_seed(replace(cfg, seed=s), variants, curves) for s in (seeds or [cfg.seed])]
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
    parser.add_argument("--client-dp-epsilon", type=float, nargs="+", default=[],
                        help="rows: fedgan without DP and with client-level DP at these epsilons")
    parser.add_argument("--client-dp-clip", type=float, default=0.5,
                        help="client-level DP: each hospital's update norm bound")
    parser.add_argument("--curve-points", type=int, default=6,
                        help="rounds along the run (and the same steps of the solo rows) scored "
                             "for the learning curve; 0: none")
    parser.add_argument("--plot", type=Path, default=Path("bench/results/quality-curve.png"),
                        help="the learning curve's PNG")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    torch.set_num_threads(args.threads)
    cfg = BenchConfig(rounds=args.rounds, local_steps=args.local_steps, width=args.width,
                      batch=args.batch, lr=args.lr, curve_points=args.curve_points)
    t0 = time.perf_counter()
    curves: dict[str, Curve] = {}
    variants = (client_dp_variants(args.client_dp_epsilon, cfg.rounds, args.client_dp_clip)
                if args.client_dp_epsilon else VARIANTS)
    rows, fed_ratio, alone_ratio = run(cfg, args.seeds, variants, curves)
    best, _, _ = ratios(rows, list(variants), alone_rows(cfg))
    print(f"pix2pix T1w->T2w, {cfg.hospitals} hospitals, {cfg.image_size}px, width {cfg.width}, "
          f"{cfg.rounds} rounds x {cfg.local_steps} local steps, batch {cfg.batch}, lr {cfg.lr:g}, "
          f"seeds {args.seeds} (mean), {time.perf_counter() - t0:.0f} s")
    print(table(rows))
    if cfg.curve_points:
        from bench.quality_curve import curve_table, plot_curve

        plot_curve(args.plot, curves, rows, f"pix2pix T1w->T2w SSIM along the run "
                                            f"({len(args.seeds)} seeds)")
        print(f"learning curve: held-out SSIM (mean over seeds) at steps per hospital; "
              f"{args.plot}")
        print(curve_table(curves))
    mean_alone = alone_ratio * rows["centralized"]["ssim"]
    met = fed_ratio >= 0.95 and rows[best]["ssim"] > mean_alone
    print(f"bar (best federated >= 0.95 x centralized and > mean alone): "
          f"{'met' if met else 'NOT met'} (best federated: {best})")
    print(f"best federated SSIM / centralized SSIM = {fed_ratio:.3f}; "
          f"mean hospital-alone SSIM / centralized SSIM = {alone_ratio:.3f}")
    if args.client_dp_epsilon:
        print("client-level DP SSIM / no-DP SSIM: " + "; ".join(
            f"{name.split(' (')[0].split(', ')[1]}: {rows[name]['ssim'] / rows['fedgan']['ssim']:.3f}"
            for name in list(variants)[1:]))


if __name__ == "__main__":
    main()
