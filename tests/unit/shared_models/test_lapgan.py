"""lapgan (Denton et al. 2015): the pyramid, a step per level, samples, DP, launch, a round."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from shared_models import ModelConfig, StepContext, TrainConfig, get_family
from shared_models.dp import PrivateSteps
from shared_models.lapgan import LEVELS, downsample, pyramid, reconstruct, upsample


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.mark.parametrize("dims", [2, 3])
def test_pyramid_round_trip_reconstructs_the_image(dims: int) -> None:
    x = torch.rand((3, 1) + (16,) * dims) * 2 - 1
    images, residuals = pyramid(x)
    assert [i.shape[-1] for i in images] == [4, 8, 16] and len(residuals) == LEVELS - 1
    assert torch.equal(images[-1], x)
    for k in range(1, LEVELS):  # every level is the mean-pooled finer one, and its own residual
        assert torch.allclose(images[k - 1], downsample(images[k]))
        assert torch.allclose(upsample(images[k - 1]) + residuals[k - 1], images[k], atol=1e-6)
    assert torch.allclose(reconstruct(images[0], residuals), x, atol=1e-6)
    flat = torch.full((1, 1) + (16,) * dims, 0.3)  # a flat image has no band-pass content
    assert all(h.abs().max() < 1e-6 for h in pyramid(flat)[1])


def _nets(size: int = 16, dims: int = 2, norm: str = "batch") -> tuple[object, ModelConfig, dict]:
    fam = get_family("lapgan")
    cfg = ModelConfig(family="lapgan", image_size=size, width=4, latent_dim=8,
                      spatial_dims=dims, norm=norm)
    return fam, cfg, fam.build(cfg)


def _changed(before: dict, nets: dict) -> set[str]:
    return {c for c, n in nets.items()
            if any(not torch.equal(before[c][k], v) for k, v in n.state_dict().items()
                   if v.is_floating_point())}


def test_components_per_level_and_their_roles() -> None:
    fam = get_family("lapgan")
    assert fam.generators == ("g_0", "g_1", "g_2")
    assert fam.discriminators == ("d_0", "d_1", "d_2")
    assert fam.samplers == fam.generators == fam.ema_components
    from server.presets import preset_policies

    local_d = preset_policies("local-d", fam)
    assert {c for c, p in local_d.items() if p.shared} == set(fam.generators)
    assert all(p.shared for p in preset_policies("fedgan", fam).values())


@pytest.mark.parametrize("size", [16, 64])
def test_a_training_step_moves_every_level(size: int) -> None:
    torch.manual_seed(0)
    fam, cfg, nets = _nets(size)
    before = {c: copy.deepcopy(n.state_dict()) for c, n in nets.items()}
    opts = fam.optimizers(nets, TrainConfig(lr_g=1e-3, lr_d=1e-3))
    data = {"image": torch.rand(6, 1, size, size) * 2 - 1}
    out = fam.train_step(fam.draw(data, 4), nets, opts, StepContext())
    assert _changed(before, nets) == set(fam.components)
    from protocol.keys import TRAIN_METRICS

    assert set(out) == {"loss-g", "loss-d", "d-real", "d-fake"} <= set(TRAIN_METRICS)
    assert all(torch.isfinite(v) and not v.requires_grad for v in out.values())


def test_level_k_trains_on_the_real_coarse_image() -> None:
    """D_k's real input is (u(I_{k-1}), I_k) of the real image: the paper's training pairs."""
    fam, _, nets = _nets(16)
    seen: list[torch.Tensor] = []
    nets["d_1"].register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    real = torch.rand(4, 1, 16, 16) * 2 - 1
    fam.train_step({"image": real}, nets, fam.optimizers(nets, TrainConfig()), StepContext())
    images, _ = pyramid(real)
    expected = torch.cat([upsample(images[0]), images[1]], 1)
    assert torch.allclose(seen[0], expected, atol=1e-6)  # first call: the real pair


@pytest.mark.parametrize("size,dims", [(16, 2), (32, 2), (16, 3)])
def test_samples_have_the_runs_size_and_range(size: int, dims: int) -> None:
    fam, cfg, nets = _nets(size, dims)
    with torch.no_grad():  # make the residual generators loud: the clamp must hold
        for k in range(1, LEVELS):
            nets[f"g_{k}"].body[-1].conv.bias.fill_(5.0)
    out = fam.sample(nets, torch.randn(3, cfg.latent_dim))
    assert out.shape == (3, 1) + (size,) * dims
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_dp_step_releases_what_it_declares_and_trains_every_level() -> None:
    torch.manual_seed(0)
    fam, cfg, nets = _nets(16, norm="group")
    data = {"image": torch.rand(12, 1, 16, 16) * 2 - 1}
    q, per_step = fam.dp_plan(data, 4)
    assert (q, per_step) == (4 / 12, 2)
    dp = PrivateSteps(data, 4, q, 1.0, 1.0, torch.device("cpu"))
    before = {c: copy.deepcopy(n.state_dict()) for c, n in nets.items()}
    out = fam.train_step({}, nets, fam.optimizers(nets, TrainConfig()), StepContext(dp=dp))
    assert dp.releases == per_step
    assert _changed(before, nets) == set(fam.components)
    assert set(out) == {"loss-g", "d-fake"}  # level 0's, from noise only: nothing of the records


def test_launch_accepts_lapgan_and_refuses_what_it_cannot_do() -> None:
    from server.run_config import from_flat

    cfg = from_flat({"family": "lapgan", "image-size": 64})
    assert cfg.model.family == "lapgan" and cfg.model.image_size == 64
    assert from_flat({"family": "lapgan", "dp-noise-multiplier": 1.0}).model.norm == "group"
    for extra, says in (({"preset": "ua-gan"}, "preset 'ua-gan' is for"),
                        ({"augment": "translation"}, "augment is for"),
                        ({"r1-gamma": 1.0}, "r1-gamma is for"),
                        ({"image-size": 24}, "power of two")):
        with pytest.raises(ValueError, match=says):
            from_flat({"family": "lapgan", **extra})
    assert 'family = "lapgan"' in (Path(__file__).parents[3] / "examples" / "run.toml").read_text()


@pytest.mark.slow
def test_a_tiny_federated_round_writes_report_grid_and_samples(tmp_path: Path) -> None:
    from fedsynth.cli import main
    from fedsynth.demo_data import build_demo_hospitals
    from fedsynth.inprocess import run_inprocess
    from server.federation import FederationConfig

    folders = build_demo_hospitals(tmp_path / "data", 2, matrix=32, include_real=False)
    hospitals = [{"data-dir": str(f), "cache-dir": str(tmp_path / "cache" / f.name),
                  "device": "cpu", "holdout-every": 4} for f in folders]
    cfg = FederationConfig(model=ModelConfig(family="lapgan", image_size=32, width=4,
                                             latent_dim=8),
                           train=TrainConfig(local_steps=2, batch_size=4),
                           run_dir=str(tmp_path / "runs"), run_id="lap", num_samples=4,
                           rounds=1)
    folder, _ = run_inprocess(cfg, hospitals)
    (row,) = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert (row["replied"], row["failed"], row["rejected"]) == (2, 0, 0), row
    assert (folder / "samples" / "round-001.png").is_file()
    from tests.harness.report_checks import assert_report_scores

    assert assert_report_scores(folder)  # the run's report: every panel drawn, a score
    ckpt = folder / "checkpoints" / "round-001.npz"
    assert ckpt.is_file()
    assert main(["sample", str(ckpt), "--n", "3", "--out", str(tmp_path / "png")]) == 0
    from PIL import Image

    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert len(pngs) == 3 and Image.open(pngs[0]).size == (32, 32)
