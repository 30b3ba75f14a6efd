"""Issue 22 items 3 (first bullet) and 4: pix2pix ``gradient-loss`` (Nie et al. 2017's
image-gradient difference) and CycleGAN ``lesion-cycle-weight`` (an L1 of the cycle and identity
terms inside the lesion masks): the losses, a training step with each on, DP, launch refusals,
the hospital's data, and one tiny in-process round per setting."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from client.trainer import LocalTrainer
from server.run_config import from_flat
from shared_models import ModelConfig, StepContext, TrainConfig, get_family
from shared_models.capabilities import check_supported
from shared_models.losses import gradient_difference, masked_l1

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------ the losses

@pytest.mark.parametrize("dims", [2, 3])
def test_gradient_difference_of_a_known_ramp(dims: int) -> None:
    """fake: a ramp of slope 0.5 along the last axis; real: flat. Only that axis differs,
    |0.5 - 0| per neighbour pair: L = 0.5 (p = 1), 0.25 (p = 2), in 2D and 3D alike."""
    n = 6
    shape = (2, 1) + (n,) * dims
    ramp = (0.5 * torch.arange(n, dtype=torch.float32)).expand(shape).contiguous()
    flat = torch.zeros(shape)
    assert gradient_difference(ramp, flat, 1).item() == pytest.approx(0.5)
    assert gradient_difference(ramp, flat, 2).item() == pytest.approx(0.25)
    # a ramp along every axis: each of the dims axes adds its own term
    every = sum((0.5 * torch.arange(n, dtype=torch.float32)).view(
        *([n if i == d else 1 for i in range(dims)])) for d in range(dims)).expand(shape)
    assert gradient_difference(every, flat, 1).item() == pytest.approx(0.5 * dims)
    # magnitudes compared (Nie et al.): the mirrored ramp has the same edges, so 0
    assert gradient_difference(ramp, ramp.flip(-1), 2).item() == pytest.approx(0.0)


@pytest.mark.parametrize("dims", [2, 3])
def test_gradient_difference_is_zero_for_equal_images_and_differentiable(dims: int) -> None:
    x = torch.rand((3, 1) + (8,) * dims)
    assert gradient_difference(x, x.clone(), 1).item() == 0.0
    assert gradient_difference(x, x + 0.3, 2).item() == pytest.approx(0.0, abs=1e-6)  # offset
    fake = torch.rand_like(x, requires_grad=True)
    gradient_difference(fake, x).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="power must be 1 or 2"):
        gradient_difference(x, x, 3)


def test_masked_l1_counts_only_the_lesion() -> None:
    x, y = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    y[0, 0, 0, 0] = 3.0
    mask = torch.zeros(1, 2, 4, 4)
    mask[0, 0, 0, 0] = 1.0  # channel 0: one pixel (error 3); channel 1: two pixels (error 1)
    mask[0, 1, 1, :2] = 1.0
    assert masked_l1(x, y, mask).item() == pytest.approx(5.0 / 3.0)
    assert masked_l1(x, y, torch.zeros_like(mask)).item() == 0.0


# ------------------------------------------------------------------------------ training steps

def _nets_and_opts(family: str, dims: int, size: int, width: int):  # noqa: ANN202
    torch.manual_seed(0)
    fam = get_family(family)
    nets = fam.build(ModelConfig(family=family, image_size=size, width=width, spatial_dims=dims))
    return fam, nets, fam.optimizers(nets, TrainConfig(lr_g=1e-3, lr_d=1e-3))


def _moved(before: dict, nets: dict, component: str) -> bool:
    return any(not torch.equal(before[component][k], v)
               for k, v in nets[component].state_dict().items() if v.is_floating_point())


def _lesion_batch(size: int, dims: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (2, 1) + (size,) * dims
    mask = torch.zeros((2, 1) + (size,) * dims)
    mask[..., size // 4: size // 2, size // 4: size // 2] = 1.0
    return {"a": torch.rand(shape, generator=g) * 2 - 1, "b": torch.rand(shape, generator=g) * 2 - 1,
            "mask_a": mask, "mask_b": mask.flip(-1)}


@pytest.mark.parametrize("dims,size,width", [(2, 16, 4), (3, 16, 4)])
def test_pix2pix_step_with_gradient_loss_moves_g_and_changes_its_loss(dims: int, size: int,
                                                                      width: int) -> None:
    batch = {k: v for k, v in _lesion_batch(size, dims).items() if k in ("a", "b")}
    outs = {}
    for weight in (0.0, 5.0):
        fam, nets, opts = _nets_and_opts("pix2pix", dims, size, width)
        before = {c: copy.deepcopy(n.state_dict()) for c, n in nets.items()}
        outs[weight] = fam.train_step(batch, nets, opts, StepContext(gradient_loss=weight))
        assert _moved(before, nets, "generator") and _moved(before, nets, "discriminator")
    assert "loss-gradient" not in outs[0.0]
    on = outs[5.0]
    assert on["loss-gradient"].item() > 0 and not on["loss-gradient"].requires_grad
    # same seed, same nets, same batch: the generator loss differs by exactly the added term
    assert on["loss-g"].item() == pytest.approx(outs[0.0]["loss-g"].item()
                                                + on["loss-gradient"].item(), rel=1e-5)


def test_cyclegan_step_with_lesion_cycle_weight_moves_gs_and_changes_its_loss() -> None:
    batch = _lesion_batch(16)
    outs = {}
    for weight in (0.0, 10.0):
        fam, nets, opts = _nets_and_opts("cyclegan", 2, 16, 8)
        before = {c: copy.deepcopy(n.state_dict()) for c, n in nets.items()}
        outs[weight] = fam.train_step(batch, nets, opts, StepContext(lesion_cycle_weight=weight))
        assert all(_moved(before, nets, c) for c in fam.components)
    assert "loss-lesion" not in outs[0.0]
    lesion = outs[10.0]["loss-lesion"].item()
    assert lesion > 0
    assert outs[10.0]["loss-g"].item() == pytest.approx(outs[0.0]["loss-g"].item() + lesion,
                                                        rel=1e-5)
    # a batch without masks (a hospital holding none): the plain terms, loss-lesion 0
    fam, nets, opts = _nets_and_opts("cyclegan", 2, 16, 8)
    plain = fam.train_step({"a": batch["a"], "b": batch["b"]}, nets, opts,
                           StepContext(lesion_cycle_weight=10.0))
    assert plain["loss-lesion"].item() == 0.0
    assert plain["loss-g"].item() == pytest.approx(outs[0.0]["loss-g"].item(), rel=1e-5)


def test_cyclegan_draws_each_domains_masks_with_its_index() -> None:
    a = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 1, 4, 4)
    data = {"a": a, "mask_a": a.clone(), "b": -a[:3], "mask_b": -a[:3].clone()}
    batch = get_family("cyclegan").draw(data, 4)
    assert torch.equal(batch["a"], batch["mask_a"]) and torch.equal(batch["b"], batch["mask_b"])


@pytest.mark.parametrize("family,setting", [("pix2pix", {"gradient_loss": 2.0}),
                                            ("cyclegan", {"lesion_cycle_weight": 5.0})])
def test_dp_step_includes_the_term_per_record(family: str, setting: dict,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Under DP the term is part of each record's generator loss: with the same secret noise
    and Poisson draws, the generator lands elsewhere than without it."""
    model = ModelConfig(family=family, image_size=16, width=4, norm="group")
    batch = _lesion_batch(16)
    data = {k: v.repeat(3, *[1] * (v.ndim - 1)) for k, v in batch.items()}
    results = {}
    for on in (False, True):
        t = LocalTrainer(model, CPU, "off")
        t.reset(0)
        train = TrainConfig(local_steps=1, batch_size=3, dp_noise_multiplier=0.8,
                            **(setting if on else {}))
        gen = torch.Generator().manual_seed(7)  # the same secret draws and noise both times
        monkeypatch.setattr("shared_models.dp.secret_generator", lambda device: gen)
        result = t.fit(data, train, seed=1)
        assert result.dp_releases > 0
        assert not {"loss-gradient", "loss-lesion"} & set(result.metrics)  # nothing travels
        g = t.family.generators[0]
        results[on] = torch.cat([p.detach().flatten() for p in t.nets[g].parameters()])
    assert torch.isfinite(results[True]).all() and not torch.equal(results[True], results[False])


# ------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("values,match", [
    ({"family": "dcgan", "gradient-loss": 1.0}, "gradient-loss is for pix2pix, not family 'dcgan'"),
    ({"family": "maskgan", "gradient-loss": 1.0}, "gradient-loss is for pix2pix"),
    ({"family": "pix2pix", "lesion-cycle-weight": 1.0},
     "lesion-cycle-weight is for cyclegan, not family 'pix2pix'"),
    ({"family": "pix2pix", "gradient-loss": -1.0}, "must be finite and >= 0"),
    ({"family": "pix2pix", "gradient-loss": float("nan")}, "must be finite and >= 0"),
    ({"family": "cyclegan", "lesion-cycle-weight": float("inf")}, "must be finite and >= 0"),
    ({"family": "pix2pix", "gradient-loss": 1.0, "gradient-loss-power": 3}, "power 1 or 2"),
    ({"family": "pix2pix", "gradient-loss": 1.0, "preset": "ua-gan"},
     "gradient-loss is not supported with preset 'ua-gan'"),
    ({"family": "cyclegan", "lesion-cycle-weight": 2.0, "preset": "ua-gan"},
     "lesion-cycle-weight is not supported with preset 'ua-gan'"),
])
def test_launch_refuses_bad_values_in_one_line(values: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as exc:
        from_flat(values)
    assert "\n" not in str(exc.value)


def test_launch_accepts_the_settings_with_dp_and_the_hospital_checks_them_too() -> None:
    cfg = from_flat({"family": "pix2pix", "gradient-loss": 1.0, "gradient-loss-power": 1,
                     "dp-noise-multiplier": 1.0})
    assert cfg.train.gradient_loss == 1.0 and cfg.train.gradient_loss_power == 1
    assert from_flat({"family": "cyclegan", "lesion-cycle-weight": 3.0,
                      "dp-noise-multiplier": 1.0}).train.lesion_cycle_weight == 3.0
    # the hospital's trainer refuses a signed config whose family would ignore the setting
    t = LocalTrainer(ModelConfig(family="dcgan", image_size=16, width=4), CPU, "off")
    with pytest.raises(ValueError, match="gradient-loss is for pix2pix"):
        t.fit({"image": torch.zeros(2, 1, 16, 16)}, TrainConfig(gradient_loss=1.0), seed=0)
    check_supported(get_family("cyclegan"), TrainConfig(lesion_cycle_weight=1.0))


# ------------------------------------------------------------------------------ the hospital

def test_hospital_loads_domain_masks_only_when_asked(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    pytest.importorskip("highdicom")
    from client.datasets import clear_local_data, local_data
    from client.settings import HospitalSettings
    from fedsynth.demo_data import build_demo_hospitals
    from fedsynth.mask_demo import add_phantom_segs

    with_segs, without = build_demo_hospitals(tmp_path / "data", 2, matrix=16, include_real=False)
    add_phantom_segs(with_segs)
    model = ModelConfig(family="cyclegan", image_size=16)
    clear_local_data()
    h = HospitalSettings(data_dir=with_segs, cache_dir=tmp_path / "c0", holdout_every=4)
    plain = local_data(h, model)
    assert set(plain.train) == {"a", "b"}
    masked = local_data(h, model, lesion_masks=True).train
    assert set(masked) == {"a", "b", "mask_a", "mask_b"}
    for k in ("a", "b"):
        assert masked[f"mask_{k}"].shape[0] == masked[k].shape[0]
        assert set(masked[f"mask_{k}"].unique().tolist()) <= {0.0, 1.0}
    assert masked["mask_a"].sum() > 0 and masked["mask_b"].sum() > 0
    h2 = HospitalSettings(data_dir=without, cache_dir=tmp_path / "c1", holdout_every=4)
    with caplog.at_level("WARNING", logger="client.datasets"):
        none = local_data(h2, model, lesion_masks=True).train
    assert none["mask_a"].sum() == 0 and none["mask_b"].sum() == 0
    assert any("trains the plain cycle and identity terms" in r.getMessage()
               for r in caplog.records)
    clear_local_data()


# ------------------------------------------------------------------------------ in-process rounds

def _round(tmp_path: Path, family: str, train: TrainConfig, segs: bool) -> list[dict]:
    from fedsynth.demo_data import build_demo_hospitals
    from fedsynth.inprocess import run_inprocess
    from server.federation import FederationConfig

    folders = build_demo_hospitals(tmp_path / "data", 2, matrix=16, include_real=False)
    if segs:  # one hospital with lesion masks, one without
        from fedsynth.mask_demo import add_phantom_segs

        add_phantom_segs(folders[0])
    hospitals = [{"data-dir": str(f), "cache-dir": str(tmp_path / "cache" / f.name),
                  "device": "cpu", "holdout-every": 4} for f in folders]
    cfg = FederationConfig(model=ModelConfig(family=family, image_size=16, width=4),
                           train=train, run_dir=str(tmp_path / "runs"), run_id="canon",
                           num_samples=2, rounds=1)
    folder, _ = run_inprocess(cfg, hospitals)
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_inprocess_round_with_gradient_loss(tmp_path: Path) -> None:
    (row,) = _round(tmp_path, "pix2pix", TrainConfig(local_steps=2, batch_size=2,
                                                     gradient_loss=1.0), segs=False)
    assert (row["replied"], row["failed"], row["rejected"]) == (2, 0, 0)
    assert row["train"]["loss-gradient"] > 0


@pytest.mark.slow
def test_inprocess_round_with_lesion_cycle_weight(tmp_path: Path) -> None:
    pytest.importorskip("highdicom")
    (row,) = _round(tmp_path, "cyclegan", TrainConfig(local_steps=2, batch_size=2,
                                                      lesion_cycle_weight=5.0), segs=True)
    assert (row["replied"], row["failed"], row["rejected"]) == (2, 0, 0)
    assert row["train"]["loss-lesion"] > 0  # the hospital with masks; the other adds 0


@pytest.mark.slow
def test_bench_gradient_rows_at_a_reduced_size(capsys: pytest.CaptureFixture) -> None:
    """bench.canon's gradient rows, 1 round x 1 step at 16^3 (about 12 s; the lesion rows take
    about 45 s at their smallest and are not run here)."""
    from bench.canon import main

    main(["gradient", "--seeds", "0", "--size", "16", "--width", "4", "--rounds", "1",
          "--local-steps", "1"])
    rows = [x for x in capsys.readouterr().out.splitlines() if x.startswith("| gradient-loss")]
    assert len(rows) == 2 and all("ssim" in r and "mae-3d" in r for r in rows)
