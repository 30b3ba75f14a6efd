"""#16 item 5: Flower's simulation engine on a multi-node Ray cluster, through the documented
command (``fedsynth simulate --ray-address``): a head and a worker node started as separate
``ray start`` processes stand in for two machines, and hospital actors run on both."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.ray_cluster import BIN, actors_per_node, ray_cluster, write_run_file
from tests.harness.deploy_helpers import free_port

pytestmark = pytest.mark.slow


def test_virtual_hospitals_run_on_both_nodes_of_a_ray_cluster(demo_hospitals: list[Path],
                                                               tmp_path: Path) -> None:
    run_file = write_run_file(tmp_path / "run.toml", rounds=2)
    with ray_cluster(free_port()) as cluster:
        seen: list[int] = []
        cmd = [str(BIN / "fedsynth"), "simulate", str(run_file),
               *sum((["--data-dir", str(d)] for d in demo_hospitals), []),
               "--virtual-hospitals", "6", "--ray-address", cluster.address,
               "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "runs")]
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            while child.poll() is None:
                counts = actors_per_node(cluster)
                if sum(counts) > sum(seen):
                    seen = counts
                try:
                    child.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    pass
            out = child.stdout.read().decode(errors="replace") if child.stdout else ""
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == 0, out[-3000:]
        assert "6 virtual hospitals, 2 rounds" in out
    rows = [json.loads(line) for line in
            next((tmp_path / "runs").glob("*/metrics.jsonl")).read_text().splitlines()]
    assert [r["replied"] for r in rows] == [6, 6]
    assert len(seen) == 2 and all(c >= 1 for c in seen), f"actors per node: {seen}"


def test_simulate_names_an_unreachable_cluster(demo_hospitals: list[Path], tmp_path: Path) -> None:
    run_file = write_run_file(tmp_path / "run.toml", rounds=1)
    proc = subprocess.run([sys.executable, "-m", "fedsynth.cli", "simulate", str(run_file),
                           "--data-dir", str(demo_hospitals[0]), "--ray-address",
                           f"127.0.0.1:{free_port()}", "--run-dir", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no Ray cluster answers at 127.0.0.1:" in proc.stderr.splitlines()[-1]
