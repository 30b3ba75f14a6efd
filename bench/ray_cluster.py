"""Flower's simulation engine on a multi-node Ray cluster: seconds per round and memory vs N.

A Ray head and a Ray worker are started as separate ``ray start`` processes on this machine (each
its own raylet with its own CPUs: they stand in for two machines), then ``fedsynth simulate
--ray-address`` runs N virtual hospitals on them. Each N runs in a fresh driver. Rounds are timed
by the coordinator (``metrics.jsonl``); round 1 carries the actors' start and each hospital's first
data load, so the steady figure is the last round's. Memory is the peak of the summed PSS of the
driver's process tree and every process of the cluster (GCS, raylets, workers), sampled from /proc;
which node each hospital actor ran on is read from the actors' parent raylets.

    python -m bench.ray_cluster --hospitals 100,300,1000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from bench.scale import process_tree, tree_memory

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@dataclass
class Cluster:
    address: str
    temp_dir: Path

    def processes(self) -> list[int]:
        """PIDs of this cluster's processes (their command lines name its session folder)."""
        marker = str(self.temp_dir).encode()
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker in f.read():
                        out.append(int(entry))
            except OSError:
                continue
        return out

    def raylets(self) -> list[int]:
        out = []
        for pid in self.processes():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == "raylet":
                        out.append(pid)
            except OSError:
                continue
        return sorted(out)


def _ray(*args: str, env: dict[str, str]) -> None:
    proc = subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, timeout=180,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"ray {' '.join(args)} failed: {proc.stderr[-1500:]}")


@contextmanager
def ray_cluster(port: int, cpus_per_node: int = 1) -> Iterator[Cluster]:
    """A head and one worker node on this machine; both stopped (only them) on exit."""
    temp_dir = Path(tempfile.mkdtemp(prefix="fsray-", dir="/tmp"))  # Ray's socket paths are short
    env = {**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    address = f"127.0.0.1:{port}"
    cluster = Cluster(address, temp_dir)
    try:
        _ray("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--num-cpus", str(cpus_per_node), "--include-dashboard=false",
             "--temp-dir", str(temp_dir), "--disable-usage-stats", env=env)
        _ray("start", "--address", address, "--node-ip-address", "127.0.0.1",
             "--num-cpus", str(cpus_per_node), "--disable-usage-stats", env=env)
        deadline = time.monotonic() + 60
        while len(cluster.raylets()) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the Ray worker node did not join the head")
            time.sleep(0.5)
        yield cluster
    finally:
        # `ray stop` would stop every Ray on the machine; kill only this cluster's processes
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in cluster.processes():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(1.0)
        shutil.rmtree(temp_dir, ignore_errors=True)


def actors_per_node(cluster: Cluster) -> list[int]:
    """How many ClientApp actor processes each raylet (node) runs now."""
    counts = []
    for raylet in cluster.raylets():
        n = 0
        for pid in process_tree(raylet)[1:]:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"ClientAppActor" in f.read():
                        n += 1
            except OSError:
                continue
        counts.append(n)
    return counts


def write_run_file(path: Path, rounds: int) -> Path:
    path.write_text("[run]\n"
                    f"num-server-rounds = {rounds}\n"
                    "image-size = 32\nwidth = 8\nlocal-steps = 1\nbatch-size = 4\n"
                    "num-samples = 4\nkeep-checkpoints = 1\n")
    return path


def simulate(cluster: Cluster, n: int, root: Path, folders: list[Path], rounds: int,
             timeout: float) -> dict:
    """``fedsynth simulate`` with ``n`` hospitals on the cluster, memory sampled meanwhile."""
    run_dir = root / f"runs-{n}"
    cmd = [str(BIN / "fedsynth"), "simulate", str(write_run_file(root / "run.toml", rounds)),
           *sum((["--data-dir", str(f)] for f in folders), []), "--virtual-hospitals", str(n),
           "--ray-address", cluster.address, "--cache-dir", str(root / "cache"),
           "--run-dir", str(run_dir)]
    t0 = time.monotonic()
    child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True,
                             env={**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"})
    peak = [0]
    nodes: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            pss = tree_memory(child.pid)[0] + sum(tree_memory(p)[0] for p in cluster.processes()
                                                  if p not in process_tree(child.pid))
            peak[0] = max(peak[0], pss)
            counts = actors_per_node(cluster)
            if sum(counts) > sum(nodes):
                nodes[:] = counts
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        _, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        raise RuntimeError(f"{n} hospitals: no result within {timeout:.0f} s") from None
    finally:
        stop.set()
        sampler.join()
    if child.returncode != 0:
        raise RuntimeError(f"{n} hospitals: fedsynth simulate failed (exit {child.returncode}):"
                           f"\n{err.decode(errors='replace')[-2000:]}")
    metrics = next(run_dir.glob("*/metrics.jsonl"))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {"hospitals": n, "round_seconds": [r["seconds"] for r in rows],
            "replied": [r["replied"] for r in rows], "peak_pss_mb": peak[0] / 2**20,
            "actors_per_node": nodes, "wall_seconds": time.monotonic() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hospitals", default="100,300,1000")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--port", type=int, default=6390)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per N")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from bench.scale import _prepare_data

    results = []
    with tempfile.TemporaryDirectory(prefix="fedsynth-ray-") as tmp:
        root = Path(tmp)
        folders, _ = _prepare_data(root)
        with ray_cluster(args.port) as cluster:
            for n in (int(x) for x in args.hospitals.split(",")):
                res = simulate(cluster, n, root, folders, args.rounds, args.timeout)
                results.append(res)
                log.info("%s", json.dumps(res))
    for r in results:
        n = r["hospitals"]
        print(f"ray_round_seconds_{n}: {r['round_seconds'][-1]:.2f}  (rounds "
              f"{[round(s, 1) for s in r['round_seconds']]}, replied {r['replied']}, actors per "
              f"node {r['actors_per_node']})")
        print(f"ray_peak_mb_{n}: {r['peak_pss_mb']:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
