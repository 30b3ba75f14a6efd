"""Issue 22 item 3 (second bullet): pix2pix ``cascade`` (Nie et al. 2017 auto-context, Wei et al.
2018): the stages' shapes, that stage 2 refines stage 1's output, end-to-end against stagewise
(frozen stages unchanged), the stage the signed round names, DP, refusals, one tiny round each."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from client.trainer import LocalTrainer
from server.run_config import from_flat
from shared_models import ModelConfig, StepContext, TrainConfig, get_family
from shared_models.translation_networks import CascadeGenerator

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _build(dims: int = 2, k: int = 2, size: int = 16):  # noqa: ANN202
    torch.manual_seed(0)
    fam = get_family("pix2pix")
    nets = fam.build(ModelConfig(family="pix2pix", image_size=size, width=4, spatial_dims=dims,
                                 cascade=k))
    return fam, nets, fam.optimizers(nets, TrainConfig(lr_g=1e-3, lr_d=1e-3))


def _batch(dims: int, size: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (2, 1) + (size,) * dims
    return {"a": torch.rand(shape, generator=g) * 2 - 1, "b": torch.rand(shape, generator=g) * 2 - 1}


def _stage_moved(before: dict, net: torch.nn.Module, j: int) -> bool:
    return any(not torch.equal(before[k], v) for k, v in net.state_dict().items()
               if k.startswith(f"stages.{j}.") and v.is_floating_point())


@pytest.mark.parametrize("dims", [2, 3])
def test_cascade_shapes_and_stage_two_sees_stage_ones_output(dims: int) -> None:
    fam, nets, _ = _build(dims, k=3)
    g = nets["generator"]
    assert isinstance(g, CascadeGenerator) and len(g.stages) == 3
    assert len(nets["discriminator"].stages) == 3
    assert fam.components == ("generator", "discriminator")  # stages live inside the roles
    a = _batch(dims)["a"]
    outs = g.outputs(a)
    assert [o.shape for o in outs] == [a.shape] * 3
    # stage 2's first convolution takes 2 channels: the input and stage 1's output
    first = next(m for m in g.stages[1].modules() if isinstance(m, (torch.nn.Conv2d,
                                                                     torch.nn.Conv3d)))
    assert first.in_channels == 2
    # ... and stage 2's output follows stage 1's: change stage 1, stage 2 changes too
    with torch.no_grad():
        for p in g.stages[0].parameters():
            p.add_(0.1)
    assert not torch.allclose(g.outputs(a)[1], outs[1])
    assert torch.equal(g.outputs(a)[1], g.stages[1](torch.cat([a, g.stages[0](a)], 1)))
    # sampling (fedsynth sample --input) runs the whole cascade: the last stage's output
    assert torch.equal(fam.sample(nets, a), g.outputs(a)[-1])


def test_cascade_one_keeps_todays_networks() -> None:
    _, nets, _ = _build(k=1)
    assert not isinstance(nets["generator"], CascadeGenerator)
    assert not any(k.startswith("stages.") for k in nets["generator"].state_dict())


@pytest.mark.parametrize("dims", [2, 3])
def test_end_to_end_trains_every_stage_stagewise_only_the_rounds_one(dims: int) -> None:
    batch = _batch(dims)
    for stage, moves in ((None, {0, 1}), (1, {0}), (2, {1})):
        fam, nets, opts = _build(dims)
        before = {c: copy.deepcopy(n.state_dict()) for c, n in nets.items()}
        out = fam.train_step(batch, nets, opts, StepContext(cascade_stage=stage))
        for c in ("generator", "discriminator"):
            assert {j for j in (0, 1) if _stage_moved(before[c], nets[c], j)} == moves, (c, stage)
        assert torch.isfinite(out["loss-g"]) and out["loss-l1"] > 0
        assert all(p.requires_grad for n in nets.values() for p in n.parameters())  # restored


def test_the_signed_round_names_the_stage() -> None:
    stagewise = TrainConfig(cascade_training="stagewise", cascade_stage_rounds=2)
    assert [stagewise.cascade_stage(3, r) for r in range(1, 9)] == [1, 1, 2, 2, 3, 3, 3, 3]
    assert stagewise.cascade_stage(1, 5) is None  # a single stage: nothing to choose
    assert TrainConfig().cascade_stage(3, 5) is None  # end-to-end: every stage


def test_trainer_freezes_the_earlier_stage_in_a_stagewise_round() -> None:
    model = ModelConfig(family="pix2pix", image_size=16, width=4, cascade=2)
    t = LocalTrainer(model, CPU, "off")
    t.reset(0)
    before = copy.deepcopy(t.nets["generator"].state_dict())
    train = TrainConfig(local_steps=2, batch_size=2, cascade_training="stagewise",
                        cascade_stage_rounds=1)
    t.fit(_batch(2), train, seed=0, server_round=2)
    assert not _stage_moved(before, t.nets["generator"], 0)
    assert _stage_moved(before, t.nets["generator"], 1)


def test_dp_step_trains_the_cascade_and_leaves_frozen_stages_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = ModelConfig(family="pix2pix", image_size=16, width=4, norm="group", cascade=2)
    data = {k: v.repeat(3, 1, 1, 1) for k, v in _batch(2).items()}
    for training, moves in (("end-to-end", {0, 1}), ("stagewise", {1})):
        t = LocalTrainer(model, CPU, "off")
        t.reset(0)
        before = {c: copy.deepcopy(n.state_dict()) for c, n in t.nets.items()}
        train = TrainConfig(local_steps=1, batch_size=3, dp_noise_multiplier=0.8,
                            cascade_training=training, cascade_stage_rounds=1)
        gen = torch.Generator().manual_seed(7)
        monkeypatch.setattr("shared_models.dp.secret_generator", lambda device: gen)
        result = t.fit(data, train, seed=1, server_round=2)
        assert result.dp_releases > 0
        for c in ("generator", "discriminator"):
            assert {j for j in (0, 1) if _stage_moved(before[c], t.nets[c], j)} == moves


@pytest.mark.parametrize("values,match", [
    ({"family": "dcgan", "cascade": 2}, "cascade > 1 is for pix2pix, not family 'dcgan'"),
    ({"family": "pix2pix", "cascade": 5}, "cascade must be 1 to 4"),
    ({"family": "pix2pix", "cascade": 0}, "cascade must be 1 to 4"),
    ({"family": "pix2pix", "cascade": 2, "cascade-training": "greedy"}, "cascade-training"),
    ({"family": "pix2pix", "cascade": 2, "cascade-stage-rounds": 0}, "cascade-stage-rounds"),
])
def test_launch_refuses_bad_cascades_in_one_line(values: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as exc:
        from_flat(values)
    assert "\n" not in str(exc.value)


def test_launch_accepts_a_cascade_with_dp_and_the_hospital_checks_the_family() -> None:
    cfg = from_flat({"family": "pix2pix", "cascade": 3, "cascade-training": "stagewise",
                     "spatial-dims": 3, "dp-noise-multiplier": 1.0})
    assert cfg.model.cascade == 3 and cfg.train.cascade_training == "stagewise"
    t = LocalTrainer(ModelConfig(family="dcgan", image_size=16, width=4, cascade=2), CPU, "off")
    with pytest.raises(ValueError, match="cascade > 1 is for pix2pix"):
        t.fit({"image": torch.zeros(2, 1, 16, 16)}, TrainConfig(), seed=0)


def _round(tmp_path: Path, model: ModelConfig, train: TrainConfig, rounds: int = 1
           ) -> list[dict]:
    from fedsynth.demo_data import build_demo_hospitals
    from fedsynth.inprocess import run_inprocess
    from server.federation import FederationConfig

    folders = build_demo_hospitals(tmp_path / "data", 2, matrix=16, include_real=False)
    hospitals = [{"data-dir": str(f), "cache-dir": str(tmp_path / "cache" / f.name),
                  "device": "cpu", "holdout-every": 4} for f in folders]
    cfg = FederationConfig(model=model, train=train, run_dir=str(tmp_path / "runs"),
                           run_id="cascade", num_samples=2, rounds=rounds)
    folder, _ = run_inprocess(cfg, hospitals)
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("training", ["end-to-end", "stagewise"])
def test_inprocess_round_with_a_cascade(tmp_path: Path, training: str) -> None:
    (row,) = _round(tmp_path, ModelConfig(family="pix2pix", image_size=16, width=4, cascade=2),
                    TrainConfig(local_steps=2, batch_size=2, cascade_training=training))
    assert (row["replied"], row["failed"], row["rejected"]) == (2, 0, 0)
    assert row["train"]["loss-l1"] > 0
    # the checkpoint rebuilds the cascade, and sampling (fedsynth sample --input) runs it all
    from fedsynth.generation import load_generator

    (ckpt,) = sorted((tmp_path / "runs" / "cascade" / "checkpoints").glob("round-*.npz"))[-1:]
    family, nets, meta = load_generator(ckpt)
    assert meta["_config"].cascade == 2 and isinstance(nets["generator"], CascadeGenerator)
    a = torch.rand(1, 1, 16, 16) * 2 - 1
    assert torch.equal(family.sample(nets, a), nets["generator"].eval().outputs(a)[-1])


@pytest.mark.slow
def test_bench_cascade_rows_at_a_reduced_size(capsys: pytest.CaptureFixture) -> None:
    """bench.canon's cascade rows (2 stages against 1), 1 round x 1 step at 16^3."""
    from bench.canon import main

    main(["cascade", "--seeds", "0", "--size", "16", "--width", "4", "--rounds", "1",
          "--local-steps", "1"])
    rows = [x for x in capsys.readouterr().out.splitlines() if x.startswith("| cascade")]
    assert [r.split("|")[1].strip() for r in rows] == ["cascade = 1", "cascade = 2"]
    assert all("ssim" in r and "mae-3d" in r for r in rows)
