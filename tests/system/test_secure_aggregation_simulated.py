"""Secure aggregation through ``fedsynth simulate`` (issue 26 item 1): Flower's simulation engine,
the virtual hospitals in Ray actors.

The hospital's ``secaggplus_mod`` keeps its key pair, its shares and the stage it expects next in
``context.state``; Flower's mod refuses a stage out of order, so a round in which all three
hospitals finish all four stages shows that state surviving between stages (and rounds) under
Ray. Simulation node ids are random per run, and each hospital's seed includes its node id, so a
plain run would train different updates: the aggregate's equality with the plain run's is the
deployed test's (``tests/system/test_secure_aggregation_deployed.py``), where node ids are stable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.harness.deploy_helpers import metrics_rows, run


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_simulate_runs_secure_rounds(demo_hospitals: list[Path], tmp_path: Path) -> None:
    from server.run_folder import load_checkpoint
    from shared_models import ModelConfig, TrainConfig, encode, get_family

    run_file = tmp_path / "run.toml"
    run_file.write_text('[run]\nfamily = "dcgan"\nimage-size = 32\nwidth = 8\nlocal-steps = 2\n'
                        'batch-size = 4\nnum-server-rounds = 2\nevaluate-every = 10\n'
                        'min-hospitals = 3\nsecure-aggregation = true\nrun-id = "secure-sim"\n'
                        f'run-dir = "{tmp_path / "runs"}"\n')
    out = run(["simulate", str(run_file), *[a for h in demo_hospitals for a in
                                            ("--data-dir", str(h))],
               "--cache-dir", str(tmp_path / "cache")], tmp_path, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    folder = tmp_path / "runs" / "secure-sim"
    rows = metrics_rows(folder)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:  # every hospital finished every stage of every round
        assert row["replied"] == 3 and row["failed"] == 0, row
    torch.manual_seed(TrainConfig().seed)
    initial = encode(get_family("dcgan").build(ModelConfig(image_size=32, width=8)))
    final, _ = load_checkpoint(folder / "checkpoints" / "round-002.npz")
    moved = [k for k, v in initial.items() if v.dtype == np.float32
             and not np.array_equal(v, final[k])]
    assert any(k.startswith("generator.") for k in moved)
    assert any(k.startswith("discriminator.") for k in moved)
    assert all(np.isfinite(final[k]).all() for k in moved)
