"""Flower's simulation engine with many virtual hospitals: seconds per round and peak memory vs N.

Each N runs in a fresh child process (``python -m bench.scale --one N``) so Ray starts clean and the
parent can sample the memory of the child's whole process tree (Ray's GCS, raylet and worker actors
included) from /proc: the sum of PSS (proportional set size, so pages shared between Ray workers
are not counted twice) and, for reference, the sum of RSS. Rounds are timed by the coordinator
itself (``metrics.jsonl``); round 1 carries the actors' start and each hospital's first data load,
so the steady figure is the last round's.

The hospitals share three demo DICOM folders and one slice cache (built once, before timing).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PAGE = os.sysconf("SC_PAGE_SIZE")


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name is in parentheses and may hold spaces: split after the last ')'
        ppid = int(stat[stat.rfind(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants that are alive now."""
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def tree_memory(root: int) -> tuple[int, int]:
    """(PSS, RSS) bytes summed over ``root``'s process tree; vanished processes count 0."""
    pss = rss = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
        except OSError:
            try:
                with open(f"/proc/{pid}/statm") as f:
                    rss += int(f.read().split()[1]) * PAGE
            except OSError:
                continue
    return pss, rss


@dataclass
class ScalePoint:
    hospitals: int
    round_seconds: list[float]
    peak_pss: int
    peak_rss: int
    wall_seconds: float
    replied: list[int] = field(default_factory=list)

    @property
    def steady_seconds(self) -> float:
        return self.round_seconds[-1]


def _prepare_data(root: Path) -> tuple[list[Path], Path]:
    """Three demo hospitals (32² slices) and their slice caches, built once and shared."""
    from client.cache import load_slices
    from client.dicom import DicomSettings
    from fedsynth.demo_data import build_demo_hospitals

    folders = build_demo_hospitals(root / "data", 3, matrix=32, include_real=False)
    cache = root / "cache"
    for folder in folders:
        load_slices(folder, DicomSettings(image_size=32), cache)
    return folders, cache


def _run_one(n: int, root: Path, rounds: int) -> dict:
    """Child side: one simulated federation of ``n`` hospitals; returns the per-round figures."""
    from fedsynth.simulation import run_simulated_federation
    from server.federation import FederationConfig
    from shared_models import ModelConfig, TrainConfig

    folders = sorted(p for p in (root / "data").iterdir() if p.is_dir())
    hospitals = [{"data-dir": str(folders[i % len(folders)]), "cache-dir": str(root / "cache"),
                  "name": f"hospital-{i + 1}", "threads": 1} for i in range(n)]
    cfg = FederationConfig(model=ModelConfig(image_size=32, width=8),
                           train=TrainConfig(local_steps=1, batch_size=4), rounds=rounds,
                           run_dir=str(root / "runs"), run_id=f"scale-{n}", num_samples=4,
                           keep_checkpoints=1)
    run = run_simulated_federation(cfg, hospitals)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"round_seconds": [r["seconds"] for r in rows], "replied": [r["replied"] for r in rows]}


def measure(n: int, root: Path, rounds: int = 2, timeout: float = 600.0,
            interval: float = 0.2) -> ScalePoint:
    """Run ``n`` hospitals in a child process while sampling its process tree's memory."""
    out = root / f"result-{n}.json"
    cmd = [sys.executable, "-m", "bench.scale", "--one", str(n), "--root", str(root),
           "--rounds", str(rounds), "--out", str(out)]
    t0 = time.monotonic()
    child = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True)
    peak = [0, 0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            pss, rss = tree_memory(child.pid)
            peak[0], peak[1] = max(peak[0], pss), max(peak[1], rss)
            stop.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        _, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the child's own session: only what we started
        child.wait()
        raise RuntimeError(f"{n} hospitals: no result within {timeout:.0f} s")
    finally:
        stop.set()
        sampler.join()
        try:  # Ray helpers left in the child's session, if any
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if child.returncode != 0 or not out.exists():
        tail = err.decode(errors="replace")[-2000:]
        raise RuntimeError(f"{n} hospitals: child failed (exit {child.returncode}):\n{tail}")
    res = json.loads(out.read_text())
    return ScalePoint(n, res["round_seconds"], peak[0], peak[1], time.monotonic() - t0,
                      res["replied"])


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope)."""
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(intercept), float(slope)


def run_scale(ns: tuple[int, ...] = (10, 50, 100), rounds: int = 2,
              budget_s: float = 420.0) -> list[ScalePoint]:
    """Measure each N in turn; stops early (logged) when the next N would overrun ``budget_s``."""
    points: list[ScalePoint] = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedsynth-scale-") as tmp:
        root = Path(tmp)
        _prepare_data(root)
        for n in ns:
            spent = time.monotonic() - t0
            if points:
                last = points[-1]
                fixed = last.wall_seconds - last.steady_seconds * len(last.round_seconds)
                guess = fixed + last.steady_seconds * len(last.round_seconds) * n / last.hospitals
                if spent + guess > budget_s:
                    log.warning("skipping %d hospitals: about %.0f s more would overrun the "
                                "%.0f s budget", n, guess, budget_s)
                    break
            points.append(measure(n, root, rounds))
            p = points[-1]
            log.info("%d hospitals: rounds %s s, peak PSS %.0f MB", n,
                     [round(s, 2) for s in p.round_seconds], p.peak_pss / 2**20)
    return points


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--hospitals", default="10,50,100", help="comma-separated N values")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all N together")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.one is not None:
        logging.getLogger().setLevel(logging.WARNING)
        args.out.write_text(json.dumps(_run_one(args.one, args.root, args.rounds)))
        return 0
    points = run_scale(tuple(int(x) for x in args.hospitals.split(",")), args.rounds,
                       args.budget)
    for pt in points:
        print(f"scale_round_seconds_{pt.hospitals}: {pt.steady_seconds:.2f}")
        print(f"scale_peak_mb_{pt.hospitals}: {pt.peak_pss / 2**20:.0f}")
    if len(points) >= 2:
        xs = [pt.hospitals for pt in points]
        print("scale_seconds_per_hospital: "
              f"{fit_line(xs, [pt.steady_seconds for pt in points])[1]:.4f}")
        print(f"scale_mb_per_hospital: {fit_line(xs, [pt.peak_pss / 2**20 for pt in points])[1]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
