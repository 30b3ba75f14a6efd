"""Small local data: DiffAugment, R1 and generator EMA, off vs on, side by side (DCGAN / cDCGAN).

The hospitals are the demo's (``fedsynth.demo_data``: phantom T1w/T2w series with each hospital's
scanner profile plus the real clinical DICOM files that ship in packages), a few dozen slices
each; every 4th slice is held out. Every row is one federation through ``run_federation`` over
``fedsynth.inprocess``'s Grid to the real ClientApp (what ``fedsynth launch`` deploys, without the
transport), with the same budget (rounds x local steps x batch) and seed; only the small-data
settings differ. The score is the Fréchet distance (``shared_models.quality``: fixed random conv
features) between the final checkpoint's generator (the coordinator's moving average where
``server-ema-decay`` keeps one: ``load_checkpoint(ema=True)``, what ``fedsynth sample`` draws from)
and the pooled held-out real slices, with as many generated slices as there are real training
slices; "reference: real training slices" (real vs real, the same sizes) is the floor the
distance is biased to on so few slices. Rows are averaged over ``--seeds`` (the seed sets the
phantoms' jitter, the initial weights and the batches); no seed is picked.

The learning curve (issue 21): every run keeps each round's checkpoint, and the global generator
at ``--curve-points`` rounds along it is scored the same way (against steps per hospital = round x
local steps), averaged over seeds; printed as a table and drawn to ``--plot``.

Run: ``python -m bench.small_data`` (``make bench-small-data``; ``--family``, ``--seeds``,
``--rounds``...). Prints a Markdown table, the curve table and, last, each row's ratio to its
family's "off" (and, with several families, each family's "off" over dcgan's).
``--family`` takes several families, run side by side on the same data, seeds and budget; a
family skips the variants it refuses (lapgan and pgan take neither augment nor R1).
lapgan against dcgan at the same budget (issue 22 item 2; not yet recorded):
``python -m bench.small_data --family dcgan,lapgan --variants off --hospitals {1,3}``.
pgan against dcgan at 64 and 128 px (issue 22 item 1; not yet recorded; pgan at 64 px has 5
stages, so R = 1 reaches 64 px by round 9 and 128 px by round 11):
``python -m bench.small_data --family dcgan,pgan --variants off --image-size {64,128}
--rounds 12 --pgan-rounds-per-stage 1``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fedsynth.demo_data import build_demo_hospitals
from fedsynth.inprocess import run_inprocess
from server.federation import FederationConfig
from server.run_folder import load_checkpoint
from shared_models import ModelConfig, TrainConfig, get_family
from shared_models.codec import decode_into
from shared_models.quality import FeatureNet, frechet_distance

log = logging.getLogger("bench.small_data")

# row -> (train settings, coordinator's server-ema-decay); augment = DiffAugment's 4 grey ops,
# r1 = R1 at gamma 1, ema = generator EMA at decay 0.99 over local steps and 0.5 across rounds
VARIANTS: dict[str, tuple[dict[str, Any], float]] = {
    "off": ({}, 0.0),
    "augment": ({"augment": "translation,cutout,brightness,contrast"}, 0.0),
    "augment+r1": ({"augment": "translation,cutout,brightness,contrast", "r1_gamma": 1.0}, 0.0),
    # the demo's defaults: augment, EMA 0.95 over local steps, 0.5 across rounds
    "augment+ema": ({"augment": "translation,cutout,brightness,contrast", "ema_decay": 0.95},
                    0.5),
    "augment+r1+ema": (
        {"augment": "translation,cutout,brightness,contrast", "r1_gamma": 1.0,
         "ema_decay": 0.99}, 0.5),
}
FLOOR = "reference: real training slices"
FAMILIES = ("dcgan", "cdcgan", "lapgan", "pgan")
HOLDOUT_EVERY = 4


@dataclass(frozen=True)
class Config:
    family: str = "dcgan"
    hospitals: int = 3
    image_size: int = 32
    width: int = 8
    rounds: int = 4
    local_steps: int = 25
    batch: int = 16
    lr: float = 2e-4
    pgan_rounds_per_stage: int = 1


def hospitals(root: Path, cfg: Config, seed: int) -> list[dict[str, Any]]:
    data = root / f"data-seed{seed}"
    if not data.is_dir():
        build_demo_hospitals(data, cfg.hospitals, seed=seed, matrix=max(64, cfg.image_size))
    folders = sorted((p for p in data.iterdir() if p.is_dir() and p.name.startswith("hospital")),
                     key=lambda p: int(p.name.rsplit("-", 1)[-1]))
    return [{"data-dir": str(f), "cache-dir": str(root / "cache" / data.name / f.name),
             "device": "cpu", "holdout-every": HOLDOUT_EVERY} for f in folders]


def real_slices(settings: Sequence[Mapping[str, Any]], model: ModelConfig
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled training slices, pooled held-out slices) as the hospitals load them."""
    from client.datasets import local_data
    from client.settings import HospitalSettings

    loaded = [local_data(HospitalSettings.from_mapping(s), model) for s in settings]
    return (torch.cat([d.train["image"] for d in loaded]),
            torch.cat([d.holdout["image"] for d in loaded]))


def features(x: torch.Tensor) -> np.ndarray:
    return FeatureNet(1)(x.float()).numpy()


@torch.no_grad()
def generated(family_name: str, model: ModelConfig, arrays: Mapping[str, np.ndarray], n: int,
              seed: int, server_round: int | None = None) -> torch.Tensor:
    family = get_family(family_name)
    nets = family.build(model)
    decode_into(nets, arrays)
    if server_round is not None:  # pgan: the stage the checkpoint's round reached
        family.at_round(nets, model, server_round)
    gen = torch.Generator().manual_seed(10_000 + seed)
    noise = torch.randn(n, model.latent_dim, generator=gen)
    labels = torch.arange(n) % model.num_classes if model.num_classes else None
    return family.sample(nets, noise, labels).float()


def supported(family_name: str, variant: str) -> bool:
    """Whether ``family_name`` takes ``variant``'s settings (lapgan and pgan refuse augment and
    R1: their runs would be refused before the first round)."""
    from shared_models.capabilities import AUGMENT, R1

    over, _ = VARIANTS[variant]
    supports = get_family(family_name).supports
    return ((not over.get("augment") or AUGMENT in supports)
            and (not over.get("r1_gamma") or R1 in supports))


def curve_rounds(rounds: int, points: int) -> list[int]:
    """``points`` rounds spread evenly along the run, the last always among them."""
    return sorted({max(1, round(rounds * (i + 1) / max(1, points))) for i in range(points)})


def run_variant(cfg: Config, root: Path, seed: int, train_over: Mapping[str, Any],
                server_ema: float, n: int, held_feats: np.ndarray, curve_points: int = 0
                ) -> tuple[float, float, list[tuple[int, float]]]:
    """(final Fréchet distance, seconds of the federation, [(steps per hospital, distance)] of
    the global generator at ``curve_points`` rounds along the run: the learning curve)."""
    model = ModelConfig(family=cfg.family, image_size=cfg.image_size, width=cfg.width,
                        pgan_rounds_per_stage=cfg.pgan_rounds_per_stage)
    train = TrainConfig(local_steps=cfg.local_steps, batch_size=cfg.batch, lr_g=cfg.lr,
                        lr_d=cfg.lr, seed=seed, **train_over)
    fcfg = FederationConfig(model=model, train=train, rounds=cfg.rounds, preset="fedgan",
                            evaluate_every=cfg.rounds, run_dir=str(root / "runs"),
                            run_id=f"run-{time.time_ns()}", num_samples=4,
                            keep_checkpoints=cfg.rounds + 1, server_ema_decay=server_ema)
    t0 = time.perf_counter()
    folder, _ = run_inprocess(fcfg, hospitals(root, cfg, seed))
    seconds = time.perf_counter() - t0
    by_round = {int(p.stem.split("-")[1]): p for p in (folder / "checkpoints").glob("round-*.npz")}
    curve = []
    for r in sorted(set(curve_rounds(cfg.rounds, curve_points)) | {max(by_round)}):
        arrays, _ = load_checkpoint(by_round[r], ema=True)
        fake = generated(cfg.family, fcfg.model, arrays, n, seed, r)
        curve.append((r * cfg.local_steps, frechet_distance(features(fake), held_feats)))
    shutil.rmtree(folder, ignore_errors=True)  # every round's checkpoint: scored, not kept
    return curve[-1][1], seconds, curve


def label(family_name: str, variant: str, families: Sequence[str]) -> str:
    return variant if len(families) == 1 else f"{family_name} {variant}"


def run(cfg: Config, seeds: Sequence[int], variants: Sequence[str],
        families: Sequence[str] | None = None, curve_points: int = 0
        ) -> dict[str, dict[str, Any]]:
    """Rows (one per family and variant the family takes, plus the floor) averaged over seeds:
    frechet, frechet-sd, seconds, and the seed-averaged curve [(steps, distance)]."""
    families = list(families or [cfg.family])
    root = Path(tempfile.mkdtemp(prefix="fedsynth-bench-small-data-"))
    try:
        per: dict[str, list[tuple[float, float]]] = {FLOOR: []}
        curves: dict[str, list[list[tuple[int, float]]]] = {}
        for seed in seeds:
            model = FederationConfig(model=ModelConfig(family=families[0],
                                                       image_size=cfg.image_size)).model
            train_real, held = real_slices(hospitals(root, cfg, seed), model)
            held_feats = features(held)
            per[FLOOR].append((frechet_distance(features(train_real), held_feats), 0.0))
            for fam in families:
                for name in variants:
                    if not supported(fam, name):
                        log.info("%s refuses %s: row skipped", fam, name)
                        continue
                    over, server_ema = VARIANTS[name]
                    fd, secs, curve = run_variant(replace(cfg, family=fam), root, seed, over,
                                                  server_ema, len(train_real), held_feats,
                                                  curve_points)
                    row = label(fam, name, families)
                    per.setdefault(row, []).append((fd, secs))
                    curves.setdefault(row, []).append(curve)
                    log.info("seed %d %-45s FD %.3f (%.0f s)", seed, row, fd, secs)
        out: dict[str, dict[str, Any]] = {
            k: {"frechet": float(np.mean([f for f, _ in v])),
                "frechet-sd": float(np.std([f for f, _ in v])),
                "seconds": float(np.mean([s for _, s in v]))} for k, v in per.items()}
        for row, cs in curves.items():
            out[row]["curve"] = [(steps, float(np.mean([c[i][1] for c in cs])))
                                 for i, (steps, _) in enumerate(cs[0])]
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def off_of(name: str) -> str:
    """The row a row is compared with: its own family's "off"."""
    return "off" if " " not in name else name.split(" ", 1)[0] + " off"


def table(rows: Mapping[str, Mapping[str, Any]], seeds: Sequence[int]) -> str:
    dcgan = rows.get("dcgan off", {}).get("frechet")
    extra = dcgan is not None  # several families (rows named by family): issue 22's comparison
    lines = [f"| row ({len(seeds)} seeds) | Fréchet distance (mean ± sd) | vs off | "
             + ("vs dcgan off | " if extra else "") + "seconds per run |",
             "|---|---|---|" + ("---|" if extra else "") + "---|"]
    for name, r in rows.items():
        off = rows.get(off_of(name), {}).get("frechet", float("nan"))
        ratio = "" if name == FLOOR else f"{r['frechet'] / off:.2f}"
        vs_dcgan = ("" if name == FLOOR else f"{r['frechet'] / dcgan:.2f}") if extra else None
        secs = "" if name == FLOOR else f"{r['seconds']:.0f}"
        lines.append(f"| {name} | {r['frechet']:.3f} ± {r['frechet-sd']:.3f} | {ratio} | "
                     + (f"{vs_dcgan} | " if extra else "") + f"{secs} |")
    return "\n".join(lines)


def curve_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Steps per hospital down, one column per row: the seed-averaged Fréchet distance of the
    global generator along the run (the floor is the last column)."""
    names = [n for n, r in rows.items() if r.get("curve")]
    steps = sorted({s for n in names for s, _ in rows[n]["curve"]})
    lines = ["| steps per hospital | " + " | ".join(names) + " | floor |",
             "|---|" + "---|" * (len(names) + 1)]
    for st in steps:
        cells = [next((f"{fd:.3f}" for s, fd in rows[n]["curve"] if s == st), "") for n in names]
        lines.append(f"| {st} | " + " | ".join(cells) + f" | {rows[FLOOR]['frechet']:.3f} |")
    return "\n".join(lines)


def plot(path: Path, rows: Mapping[str, Mapping[str, Any]], title: str) -> Path:
    from bench.plots import curve_png

    return curve_png(path, {n: r["curve"] for n, r in rows.items() if r.get("curve")},
                     title=title, ylabel="Fréchet distance to held-out real",
                     bars={FLOOR: rows[FLOOR]["frechet"]}, logy=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = Config()
    p.add_argument("--family", default=d.family,
                   help="comma-separated families of dcgan, cdcgan, lapgan, pgan, run side by side "
                        "at the same budget (lapgan / pgan against dcgan: issue 22 items 2 / 1); "
                        "lapgan and pgan refuse augment and r1-gamma, so they run off only")
    p.add_argument("--pgan-rounds-per-stage", type=int, default=d.pgan_rounds_per_stage,
                   help="pgan: rounds of fade-in and of stable training per resolution")
    p.add_argument("--hospitals", type=int, default=d.hospitals,
                   help="demo hospitals: 1 for the small-site row, 3 for the federation")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--local-steps", type=int, default=d.local_steps)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated rows of: " + ", ".join(VARIANTS))
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: no spinning threads on a shared machine)")
    p.add_argument("--curve-points", type=int, default=d.rounds,
                   help="rounds along each run whose global generator is scored (the curve)")
    p.add_argument("--plot", type=Path, default=Path("bench/results/small-data-curve.png"),
                   help="the learning curve's PNG")
    a = p.parse_args(argv)
    families = [f.strip() for f in a.family.split(",") if f.strip()]
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        p.error(f"unknown family {bad}; known: {', '.join(FAMILIES)}")
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("flwr", "server", "client", "fedsynth"):
        logging.getLogger(name).setLevel(logging.WARNING)
    cfg = replace(d, family=families[0], hospitals=a.hospitals, rounds=a.rounds, local_steps=a.local_steps,
                  image_size=a.image_size, width=a.width,
                  pgan_rounds_per_stage=a.pgan_rounds_per_stage)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    t0 = time.perf_counter()
    rows = run(cfg, seeds, variants, families, a.curve_points)
    plot(a.plot, rows, f"small data: {', '.join(families)}, {cfg.hospitals} demo hospitals, "
                       f"{cfg.image_size} px ({len(seeds)} seeds)")
    print(f"\n{', '.join(families)}, {cfg.hospitals} demo hospitals, {cfg.image_size} px, width "
          f"{cfg.width}, {cfg.rounds} rounds x {cfg.local_steps} local steps x batch "
          f"{cfg.batch}, fedgan; {time.perf_counter() - t0:.0f} s in all\n")
    print(table(rows, seeds))
    print(f"\nlearning curve (global generator along the run, mean over seeds; {a.plot}):\n")
    print(curve_table(rows))
    ratios = [f"{n} / {off_of(n)} = {r['frechet'] / rows[off_of(n)]['frechet']:.2f}"
              for n, r in rows.items() if n != FLOOR and off_of(n) in rows and n != off_of(n)]
    if "dcgan off" in rows:
        ratios += [f"{n} / dcgan off = {r['frechet'] / rows['dcgan off']['frechet']:.2f}"
                   for n, r in rows.items() if n.endswith(" off") and n != "dcgan off"]
    print("\n" + "; ".join(ratios))


if __name__ == "__main__":
    main()
