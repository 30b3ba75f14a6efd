"""A real federation inside the test suite: 3 virtual hospitals on Flower's simulation engine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedsynth.simulation import run_simulated_federation
from server.federation import FederationConfig
from server.run_folder import load_checkpoint
from shared_models import ModelConfig, TrainConfig, encode, get_family

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def three_round_run(demo_hospitals: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    cfg = FederationConfig(model=ModelConfig(image_size=32),
                           train=TrainConfig(local_steps=3, batch_size=4),
                           rounds=3, evaluate_every=2, run_dir=str(runs), run_id="sim-test")
    hospitals = [{"data-dir": str(h), "cache-dir": str(runs / "cache" / h.name)}
                 for h in demo_hospitals]
    return run_simulated_federation(cfg, hospitals)


def test_two_rounds_move_the_global_weights(three_round_run: Path) -> None:
    torch.manual_seed(TrainConfig().seed)  # the coordinator's initial model
    initial = encode(get_family("dcgan").build(ModelConfig(image_size=32)))
    final, meta = load_checkpoint(three_round_run / "checkpoints" / "round-003.npz")
    assert meta["round"] == 3 and set(final) == set(initial)
    for component in ("generator", "discriminator"):
        moved = [k for k in initial if k.startswith(component + ".") and
                 initial[k].dtype == np.float32 and not np.array_equal(initial[k], final[k])]
        assert moved, f"no {component} weight changed"


def test_metrics_report_generator_and_discriminator_losses(three_round_run: Path) -> None:
    rows = [json.loads(x) for x in (three_round_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["replied"] == 3 and row["failed"] == 0 and row["rejected"] == 0
        for key in ("loss-g", "loss-d"):
            assert math.isfinite(row["train"][key]) and row["train"][key] > 0
        assert row["train"]["num-examples"] > 0
        assert len(row["hospitals"]) == 3
        for phase in ("train-phase", "aggregate", "evaluate-phase", "samples"):
            assert row["server"][f"{phase}-seconds"] >= 0
    # evaluate-every = 2: rounds 2 and 3 (the last) evaluate; round 1 sends no evaluate message.
    # Round 2's evaluation rides in round 3's train message (no evaluate round trip of its own);
    # only the last round sends an evaluate message.
    assert rows[0]["evaluate"] == {} and rows[0]["evaluated"] == {}
    assert rows[1]["server"]["evaluate-phase-seconds"] < 0.05 < \
        rows[2]["server"]["evaluate-phase-seconds"]
    for row in rows[1:]:
        assert math.isfinite(row["evaluate"]["eval-frechet"])
        assert len(row["evaluated"]) == 3
        assert all(m["eval-seconds"] > 0 for m in row["evaluated"].values())
    config = json.loads((three_round_run / "config.json").read_text())
    assert config["rounds"] == 3 and config["model"]["image_size"] == 32


def test_sample_grids_written_and_last_differs_from_first(three_round_run: Path) -> None:
    grids = sorted((three_round_run / "samples").glob("round-*.png"))
    assert [g.name for g in grids] == [f"round-00{i}.png" for i in range(4)]
    first = np.asarray(Image.open(grids[0]), dtype=np.float64)
    last = np.asarray(Image.open(grids[-1]), dtype=np.float64)
    assert first.shape == last.shape
    assert np.abs(first - last).mean() > 0.1  # an unchanged global model gives exactly 0
