"""The demo's learning curve: ``fedsynth demo``'s Fréchet distance x the floor at every round.

Each configuration is the demo's (``fedsynth.commands.demo.DEMO`` and its other defaults: dcgan,
fedgan, 3 demo hospitals, 64 px, batch 16, Adam at ``TrainConfig``'s learning rates) with the
overrides it names, run through ``run_federation`` to the real ClientApp, every round's checkpoint
kept. Every checkpoint is scored with the demo's own last word (``fedsynth.demo_quality.
frechet_vs_floor``: generated slices vs one half of the real slices, over the real-vs-real floor
of the two halves), so the last row of the "demo" configuration is what ``make demo`` prints.

``--engine simulation`` runs on Flower's simulation engine exactly as ``fedsynth demo`` does (the
hospitals train in parallel Ray workers: the seconds are ``make demo``'s); ``inprocess`` (the
default) runs them one after the other in this process (``fedsynth.inprocess``: the same
ClientApp and round loop without Ray), so its seconds are the sum over the hospitals.

The bar (issue 21 item 3): ``make demo`` at <= 5x the floor in <= 5 minutes, ventricles visible in
the last grid (``--run-dir`` keeps the run folders and their sample grids to look at).

Run: ``python -m bench.demo_curve [--configs demo "lr=5e-4" "rounds=12 local_steps=100"]``; each
configuration is space-separated ``key=value`` overrides of: ``CONFIG_KEYS``. Prints one table of
(configuration, round, steps per hospital, distance, x floor, seconds), writes ``--plot``, and,
last, each configuration's final factor and whether it meets the bar.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

BAR_FACTOR = 5.0
BAR_SECONDS = 300.0
# what a configuration may override, with the demo's values (fedsynth/commands/demo.py)
CONFIG_KEYS = ("rounds", "local_steps", "width", "batch_size", "image_size", "lr_g", "lr_d", "lr",
               "augment", "r1_gamma", "ema_decay", "server_ema_decay", "hospitals", "family")


def demo_defaults() -> dict[str, Any]:
    """The demo's settings, read from its argument parser (so the bench follows its defaults)."""
    from fedsynth.commands import demo
    from shared_models import TrainConfig

    parser = argparse.ArgumentParser()
    demo.register(parser.add_subparsers())
    args = vars(parser.parse_args(["demo"]))
    t = TrainConfig()
    return {"rounds": args["rounds"], "local_steps": args["local_steps"], "width": args["width"],
            "batch_size": args["batch_size"], "image_size": args["image_size"],
            "lr_g": t.lr_g, "lr_d": t.lr_d, "augment": args["augment"],
            "r1_gamma": args["r1_gamma"], "ema_decay": args["ema_decay"],
            "server_ema_decay": args["server_ema_decay"], "hospitals": args["hospitals"],
            "family": args["family"], "preset": args["preset"]}


def parse_config(text: str, defaults: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``"demo"`` or space-separated ``key=value`` overrides -> (name, settings); ``lr`` sets
    both learning rates."""
    settings = dict(defaults)
    text = text.strip()
    if text in ("", "demo"):
        return "demo", settings
    for item in text.split():
        key, sep, value = item.partition("=")
        key = key.replace("-", "_")
        if not sep or key not in CONFIG_KEYS:
            raise ValueError(f"{item!r}: expected key=value with key one of {', '.join(CONFIG_KEYS)}")
        if key in ("augment", "family"):
            settings[key] = value
        elif key in ("rounds", "local_steps", "width", "batch_size", "image_size", "hospitals"):
            settings[key] = int(value)
        elif key == "lr":
            settings["lr_g"] = settings["lr_d"] = float(value)
        else:
            settings[key] = float(value)
    return text, settings


def federation_config(s: Mapping[str, Any], run_dir: Path, seed: int) -> Any:
    """The demo's run configuration (``fedsynth.commands.demo.run``) with every checkpoint kept."""
    from server.federation import FederationConfig
    from shared_models import ModelConfig, TrainConfig

    family = str(s["family"])
    return FederationConfig(
        model=ModelConfig(family=family, image_size=int(s["image_size"]), width=int(s["width"]),
                          num_classes=2 if family == "cdcgan" else 0),
        train=TrainConfig(local_steps=int(s["local_steps"]), batch_size=int(s["batch_size"]),
                          lr_g=float(s["lr_g"]), lr_d=float(s["lr_d"]), augment=str(s["augment"]),
                          r1_gamma=float(s["r1_gamma"]), ema_decay=float(s["ema_decay"]),
                          seed=seed),
        rounds=int(s["rounds"]), run_dir=str(run_dir), run_id=f"demo-curve-{time.time_ns()}",
        preset=str(s["preset"]), server_ema_decay=float(s["server_ema_decay"]),
        keep_checkpoints=int(s["rounds"]) + 1)


def hospitals(data_root: Path, n: int, seed: int) -> list[dict[str, Any]]:
    """The demo's hospitals (``build_demo_hospitals`` at its defaults), written once per seed."""
    from fedsynth.demo_data import build_demo_hospitals

    data = data_root / f"demo-data-{n}h-seed{seed}"
    if not data.is_dir():
        build_demo_hospitals(data, n, seed=seed)
    folders = sorted((p for p in data.iterdir() if p.is_dir() and p.name.startswith("hospital")),
                     key=lambda p: int(p.name.rsplit("-", 1)[-1]))
    return [{"data-dir": str(f.resolve()), "cache-dir": str((data / ".cache" / f.name).resolve()),
             "threads": 1} for f in folders]


def run_config(name: str, s: Mapping[str, Any], root: Path, seed: int, engine: str
               ) -> list[dict[str, Any]]:
    """One federation of configuration ``s``; a point per round: steps, distance, factor,
    cumulative seconds (the rounds' own, from metrics.jsonl), and the run's wall seconds."""
    from fedsynth.demo_quality import frechet_vs_floor

    fcfg = federation_config(s, root / "runs", seed)
    sites = hospitals(root, int(s["hospitals"]), seed)
    t0 = time.perf_counter()
    if engine == "simulation":
        from fedsynth.simulation import run_simulated_federation

        folder = run_simulated_federation(fcfg, sites)
    else:
        from fedsynth.inprocess import run_inprocess

        folder, _ = run_inprocess(fcfg, sites)
    wall = time.perf_counter() - t0
    seconds: dict[int, float] = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        seconds[int(row["round"])] = float(row["seconds"])
    points, elapsed = [], 0.0
    for ckpt in sorted((folder / "checkpoints").glob("round-*.npz")):
        r = int(ckpt.stem.split("-")[1])
        elapsed = sum(v for k, v in seconds.items() if k <= r)
        q = frechet_vs_floor(ckpt, sites)
        points.append({"config": name, "seed": seed, "round": r,
                       "steps": r * int(s["local_steps"]), "frechet": q["frechet"],
                       "floor": q["floor"], "factor": q["factor"], "seconds": elapsed,
                       "wall": wall, "run": str(folder)})
        logging.getLogger("bench.demo_curve").info("%s seed %d round %d: %.1fx the floor", name,
                                                   seed, r, q["factor"])
    return points


def mean_points(points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Points of the same configuration and round averaged over seeds, in first-seen order."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for p in points:
        groups.setdefault((str(p["config"]), int(p["round"])), []).append(p)
    out = []
    for (name, r), ps in groups.items():
        avg = {k: sum(float(p[k]) for p in ps) / len(ps)
               for k in ("frechet", "floor", "factor", "seconds", "wall")}
        out.append({"config": name, "round": r, "steps": ps[0]["steps"], "seeds": len(ps), **avg})
    return out


def table(points: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| configuration | round | steps per hospital | Fréchet distance | x floor | "
             "seconds |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {p['config']} | {p['round']} | {p['steps']} | {p['frechet']:.4f} | "
              f"{p['factor']:.1f} | {p['seconds']:.0f} |" for p in points]
    return "\n".join(lines)


def verdicts(points: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each configuration's last round against the bar (<= 5x the floor within 5 minutes)."""
    last: dict[str, Mapping[str, Any]] = {}
    for p in points:
        if p["config"] not in last or p["round"] > last[p["config"]]["round"]:
            last[p["config"]] = p
    out = []
    for name, p in last.items():
        met = p["factor"] <= BAR_FACTOR and p["wall"] <= BAR_SECONDS
        out.append(f"{name}: {p['factor']:.1f}x the floor at {p['steps']} steps in "
                   f"{p['wall']:.0f} s ({'met' if met else 'NOT met'})")
    return out


def plot(path: Path, points: Sequence[Mapping[str, Any]], title: str) -> Path:
    from bench.plots import curve_png

    series: dict[str, list[tuple[float, float]]] = {}
    for p in points:
        series.setdefault(str(p["config"]), []).append((p["steps"], p["factor"]))
    return curve_png(path, series, title=title, ylabel="Fréchet distance / real-vs-real floor",
                     bars={f"bar ({BAR_FACTOR:g}x)": BAR_FACTOR}, logy=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=["demo"],
                   help="each: 'demo' or space-separated key=value overrides of the demo's "
                        "settings, keys: " + ", ".join(CONFIG_KEYS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="seeds of the demo data and the training (the demo's is 0)")
    p.add_argument("--engine", choices=("inprocess", "simulation"), default="inprocess")
    p.add_argument("--plot", type=Path, default=Path("bench/results/demo-curve.png"))
    p.add_argument("--run-dir", type=Path, default=None,
                   help="keep the data and run folders (sample grids) here; default: a temporary "
                        "folder, removed at the end")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("flwr", "server", "client", "fedsynth"):
        logging.getLogger(name).setLevel(logging.WARNING)
    defaults = demo_defaults()
    try:
        configs = [parse_config(c, defaults) for c in a.configs]
    except ValueError as exc:
        p.error(str(exc))
    root = a.run_dir or Path(tempfile.mkdtemp(prefix="fedsynth-bench-demo-curve-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        points = [pt for seed in a.seeds for name, s in configs
                  for pt in run_config(name, s, root, seed, a.engine)]
    finally:
        if a.run_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    rows = mean_points(points)
    plot(a.plot, rows, f"fedsynth demo: Fréchet distance x floor along the run ({a.engine}, "
                       f"seeds {a.seeds})")
    print(f"\nfedsynth demo learning curve ({a.engine}; seeds {a.seeds}, mean); demo settings "
          f"{defaults}; {time.perf_counter() - t0:.0f} s in all; plot {a.plot}"
          + (f"; run folders under {root / 'runs'}" if a.run_dir else "") + "\n")
    print(table(rows))
    print("\nbar (<= 5x the floor in <= 5 minutes; seconds: the whole run, "
          f"{'as make demo' if a.engine == 'simulation' else 'hospitals one after the other'}): "
          + "; ".join(verdicts(rows)))


if __name__ == "__main__":
    main()
