"""pgan (progressive growing): the round's schedule, fade-in, inactive blocks, a tiny federation."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from shared_models import ModelConfig, StepContext, TrainConfig, get_family
from shared_models.dp import PrivateSteps
from shared_models.pgan import _up, minibatch_stddev, schedule


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _nets(size: int = 16, r: int = 1):
    fam = get_family("pgan")
    cfg = ModelConfig(family="pgan", image_size=size, width=4, latent_dim=8,
                      pgan_rounds_per_stage=r)
    return fam, cfg, fam.build(cfg)


def test_stage_and_alpha_from_the_round() -> None:
    # R = 2 at 16 px: 2 rounds at 4 px, then 2 fade-in + 2 stable rounds at 8 px and at 16 px
    got = [schedule(rnd, 2, 16) for rnd in range(1, 13)]
    third = 1 / 3
    assert got == [(0, 1.0), (0, 1.0), (1, third), (1, 2 * third), (1, 1.0), (1, 1.0),
                   (2, third), (2, 2 * third), (2, 1.0), (2, 1.0), (2, 1.0), (2, 1.0)]
    assert schedule(1, 1, 16) == (0, 1.0) and schedule(2, 1, 16) == (1, 0.5)
    assert schedule(0, 1, 64) == (0, 1.0)  # the initial grid: round 1's stage
    fam, cfg, nets = _nets(16, 2)
    fam.at_round(nets, cfg, 4)
    assert (nets["generator"].stage, nets["generator"].alpha) == (1, 2 * third)
    assert (nets["discriminator"].stage, nets["discriminator"].alpha) == (1, 2 * third)


def test_fade_in_alpha_zero_is_the_upsampled_previous_output() -> None:
    torch.manual_seed(0)
    fam, cfg, nets = _nets(16)
    g = nets["generator"]
    z = torch.randn(3, cfg.latent_dim)
    g.stage, g.alpha = 1, 1.0
    g.eval()
    with torch.no_grad():
        g.stage = 0
        previous = g(z)
        assert previous.shape == (3, 1, 4, 4)
        g.stage, g.alpha = 1, 0.0
        assert torch.equal(g(z), _up(previous))
        g.alpha = 1.0
        new = g(z)
        g.alpha = 0.25
        assert torch.allclose(g(z), 0.25 * new + 0.75 * _up(previous))
    # sampling at a stage below the last: upsampled to the run's size
    assert fam.sample(nets, z).shape == (3, 1, 16, 16)


def test_minibatch_stddev_adds_one_feature_of_the_group_spread() -> None:
    x = torch.zeros(8, 3, 4, 4)
    assert minibatch_stddev(x).shape == (8, 4, 4, 4)
    assert minibatch_stddev(x)[:, 3].max() < 1e-3  # identical records: no spread
    y = torch.randn(8, 3, 4, 4)
    assert minibatch_stddev(y)[:, 3].min() > 0.1


@pytest.mark.parametrize("rnd,stage,alpha", [(1, 0, 1.0), (2, 1, 0.5), (3, 1, 1.0)])
def test_a_step_leaves_the_inactive_blocks_untouched(rnd: int, stage: int, alpha: float) -> None:
    torch.manual_seed(0)
    fam, cfg, nets = _nets(16)
    fam.at_round(nets, cfg, rnd)
    assert (nets["generator"].stage, nets["generator"].alpha) == (stage, alpha)
    before = {c: copy.deepcopy(n.state_dict()) for c, n in nets.items()}
    opts = fam.optimizers(nets, TrainConfig(lr_g=1e-3, lr_d=1e-3))
    fam.train_step(fam.draw({"image": torch.rand(8, 1, 16, 16) * 2 - 1}, 4), nets, opts,
                   StepContext())
    changed = {f"{c}.{k}" for c, n in nets.items() for k, v in n.state_dict().items()
               if not torch.equal(before[c][k], v)}
    prefixes = {k.rsplit(".", 1)[0] for k in changed}
    # G: the active stage's blocks (and to_rgb of the previous stage during a fade-in)
    rgb = {f"generator.to_rgb.{stage}"} | ({f"generator.to_rgb.{stage - 1}"}
                                           if alpha < 1 else set())
    frgb = {f"discriminator.from_rgb.{stage}"} | ({f"discriminator.from_rgb.{stage - 1}"}
                                                  if alpha < 1 else set())
    assert {p for p in prefixes if ".to_rgb." in p} == rgb
    assert {p for p in prefixes if ".from_rgb." in p} == frgb
    for later in range(stage + 1, 3):  # blocks of stages not reached yet: untouched
        assert not any(f".blocks.{later}." in k for k in changed), later
    assert any("generator.first" in k for k in changed)
    assert any("discriminator.out" in k for k in changed)


def test_dp_step_releases_once_and_trains_both() -> None:
    torch.manual_seed(0)
    fam, cfg, nets = _nets(16)
    fam.at_round(nets, cfg, 2)  # a fade-in round
    data = {"image": torch.rand(12, 1, 16, 16) * 2 - 1}
    q, per_step = fam.dp_plan(data, 4)
    assert (q, per_step) == (4 / 12, 1)
    dp = PrivateSteps(data, 4, q, 1.0, 1.0, torch.device("cpu"))
    before = {c: copy.deepcopy(n.state_dict()) for c, n in nets.items()}
    out = fam.train_step({}, nets, fam.optimizers(nets, TrainConfig()), StepContext(dp=dp))
    assert dp.releases == per_step and set(out) == {"loss-g", "d-fake"}
    for c, n in nets.items():
        assert any(not torch.equal(before[c][k], v) for k, v in n.state_dict().items()), c
    assert nets["discriminator"].group == 4  # restored after the DP step


def test_launch_accepts_pgan_and_refuses_what_it_cannot_do() -> None:
    from server.run_config import from_flat

    cfg = from_flat({"family": "pgan", "image-size": 64, "pgan-rounds-per-stage": 2})
    assert cfg.model.family == "pgan" and cfg.model.pgan_rounds_per_stage == 2
    from_flat({"family": "pgan", "dp-noise-multiplier": 1.0})  # DP: supported
    for extra, says in (({"preset": "ua-gan"}, "preset 'ua-gan' is for"),
                        ({"augment": "translation"}, "augment is for"),
                        ({"r1-gamma": 1.0}, "r1-gamma is for"),
                        ({"image-size": 24}, "power of two"),
                        ({"pgan-rounds-per-stage": 0}, "pgan_rounds_per_stage")):
        with pytest.raises(ValueError, match=says):
            from_flat({"family": "pgan", **extra})
    assert "pgan-rounds-per-stage" in (Path(__file__).parents[3] / "examples"
                                       / "run.toml").read_text()


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files if k != "__meta__"}


def _same(a: dict, b: dict, part: str) -> bool:
    keys = [k for k in a if part in k]
    assert keys, part
    return all(np.array_equal(a[k], b[k]) for k in keys)


@pytest.mark.slow
def test_a_tiny_federation_grows_resumes_at_its_stage_and_samples(tmp_path: Path) -> None:
    from fedsynth.cli import main
    from fedsynth.demo_data import build_demo_hospitals
    from fedsynth.inprocess import run_inprocess
    from server.federation import FederationConfig

    folders = build_demo_hospitals(tmp_path / "data", 2, matrix=16, include_real=False)
    hospitals = [{"data-dir": str(f), "cache-dir": str(tmp_path / "cache" / f.name),
                  "device": "cpu", "holdout-every": 4} for f in folders]
    # R = 1 at 16 px: round 1 at 4 px, round 2 fades 8 px in (alpha 0.5), round 3 stable 8 px
    cfg = FederationConfig(model=ModelConfig(family="pgan", image_size=16, width=4,
                                             latent_dim=8, pgan_rounds_per_stage=1),
                           train=TrainConfig(local_steps=2, batch_size=4),
                           run_dir=str(tmp_path / "runs"), run_id="pg", num_samples=4,
                           rounds=2, keep_checkpoints=5)
    folder, _ = run_inprocess(cfg, hospitals)
    folder, _ = run_inprocess(replace(cfg, rounds=3, resume=True), hospitals)  # resumed
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all((r["replied"], r["failed"], r["rejected"]) == (2, 0, 0) for r in rows), rows
    assert (folder / "samples" / "round-003.png").is_file()
    from tests.harness.report_checks import assert_report_scores

    assert assert_report_scores(folder)
    ck = {n: _arrays(folder / "checkpoints" / f"round-{n:03d}.npz") for n in (1, 2, 3)}
    # the 16 px blocks are never trained in these three rounds (stage 2 is not reached)
    assert _same(ck[1], ck[3], "generator.blocks.2.")
    assert _same(ck[1], ck[3], "discriminator.blocks.2.")
    assert not _same(ck[1], ck[2], "generator.blocks.1.")  # round 2: the 8 px fade-in
    # round 3 (after the resume) is stage 1 stable: the 4 px output layers rest, 8 px trains
    assert _same(ck[2], ck[3], "generator.to_rgb.0.")
    assert _same(ck[2], ck[3], "discriminator.from_rgb.0.")
    assert not _same(ck[2], ck[3], "generator.blocks.1.")
    ckpt = folder / "checkpoints" / "round-003.npz"
    assert main(["sample", str(ckpt), "--n", "3", "--out", str(tmp_path / "png")]) == 0
    from PIL import Image

    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert len(pngs) == 3 and Image.open(pngs[0]).size == (16, 16)
