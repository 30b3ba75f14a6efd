"""Learning curves of the small-data, quality and demo benches (issue 21): what is scored along
the run, how seeds and families are folded into the tables, and that scoring mid-run leaves the
training it observes unchanged."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench import demo_curve, quality, small_data
from bench.quality import VARIANTS, BenchConfig, run
from bench.quality_curve import curve_table

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- demo


def test_demo_configs_start_from_the_demos_own_defaults() -> None:
    from fedsynth.commands.demo import DEMO

    defaults = demo_curve.demo_defaults()
    for key in ("rounds", "local_steps", "width", "augment", "ema_decay", "server_ema_decay"):
        assert defaults[key] == DEMO[key], key
    assert defaults["family"] == "dcgan" and defaults["image_size"] == 64
    name, s = demo_curve.parse_config("demo", defaults)
    assert name == "demo" and s == defaults
    name, s = demo_curve.parse_config("lr=5e-4 rounds=12 local_steps=100 augment=translation",
                                      defaults)
    assert s["lr_g"] == s["lr_d"] == 5e-4 and s["rounds"] == 12 and s["local_steps"] == 100
    assert s["augment"] == "translation" and s["width"] == defaults["width"]
    with pytest.raises(ValueError, match="key=value"):
        demo_curve.parse_config("learning_rate=1", defaults)
    fcfg = demo_curve.federation_config(s, Path("unused"), seed=0)
    # every round's checkpoint survives the run folder's pruning, to be scored
    assert fcfg.keep_checkpoints == 13 and fcfg.rounds == 12 and fcfg.train.lr_d == 5e-4
    assert fcfg.preset == defaults["preset"] and fcfg.model.width == defaults["width"]


def test_demo_points_average_over_seeds_and_meet_the_bar_only_within_time() -> None:
    def pt(config: str, seed: int, r: int, factor: float, wall: float) -> dict:
        return {"config": config, "seed": seed, "round": r, "steps": 100 * r, "frechet": factor,
                "floor": 1.0, "factor": factor, "seconds": 10.0 * r, "wall": wall}

    points = [pt("demo", 0, 1, 20.0, 200), pt("demo", 1, 1, 10.0, 220),
              pt("demo", 0, 2, 6.0, 200), pt("demo", 1, 2, 2.0, 220),
              pt("slow", 0, 1, 30.0, 400), pt("slow", 0, 2, 3.0, 400)]
    rows = demo_curve.mean_points(points)
    assert [(r["config"], r["round"], r["factor"]) for r in rows] == [
        ("demo", 1, 15.0), ("demo", 2, 4.0), ("slow", 1, 30.0), ("slow", 2, 3.0)]
    verdict = demo_curve.verdicts(rows)
    assert verdict[0].startswith("demo: 4.0x") and verdict[0].endswith("(met)")
    assert verdict[1].startswith("slow: 3.0x") and "NOT met" in verdict[1]  # 400 s > 5 minutes
    assert "| demo | 2 | 200 | 4.0000 | 4.0 | 20 |" in demo_curve.table(rows)


# ---------------------------------------------------------------- small data


def test_small_data_curve_rounds_and_family_refusals() -> None:
    assert small_data.curve_rounds(4, 4) == [1, 2, 3, 4]
    assert small_data.curve_rounds(12, 4) == [3, 6, 9, 12]
    assert small_data.curve_rounds(5, 0) == []
    assert small_data.supported("dcgan", "augment+r1+ema")
    for fam in ("lapgan", "pgan"):
        assert small_data.supported(fam, "off")
        assert not small_data.supported(fam, "augment")
        assert not small_data.supported(fam, "augment+ema")


def test_small_data_tables_compare_each_family_with_its_own_off_and_with_dcgan() -> None:
    floor = small_data.FLOOR
    rows = {floor: {"frechet": 0.01, "frechet-sd": 0.0, "seconds": 0.0},
            "dcgan off": {"frechet": 0.4, "frechet-sd": 0.1, "seconds": 10.0,
                          "curve": [(25, 0.6), (50, 0.4)]},
            "dcgan augment": {"frechet": 0.2, "frechet-sd": 0.1, "seconds": 11.0,
                              "curve": [(25, 0.5), (50, 0.2)]},
            "lapgan off": {"frechet": 0.3, "frechet-sd": 0.1, "seconds": 12.0,
                           "curve": [(25, 0.45), (50, 0.3)]}}
    text = small_data.table(rows, [0, 1])
    assert "vs dcgan off" in text
    assert "| dcgan augment | 0.200 ± 0.100 | 0.50 | 0.50 | 11 |" in text
    assert "| lapgan off | 0.300 ± 0.100 | 1.00 | 0.75 | 12 |" in text
    curve = small_data.curve_table(rows)
    assert curve.splitlines()[0] == "| steps per hospital | dcgan off | dcgan augment | lapgan off | floor |"
    assert "| 25 | 0.600 | 0.500 | 0.450 | 0.010 |" in curve
    single = {floor: rows[floor], "off": rows["dcgan off"], "augment": rows["dcgan augment"]}
    text = small_data.table(single, [0])
    assert "vs dcgan off" not in text and "| augment | 0.200 ± 0.100 | 0.50 | 11 |" in text


# ---------------------------------------------------------------- quality


def test_quality_curve_points_and_seed_mean() -> None:
    assert BenchConfig(rounds=24, curve_points=6).curve_rounds() == [4, 8, 12, 16, 20, 24]
    assert BenchConfig(rounds=24).curve_rounds() == []
    curves = {"fedgan": [(20, {"ssim": 0.5}), (40, {"ssim": 0.6}),
                         (20, {"ssim": 0.7}), (40, {"ssim": 0.8})]}
    assert "| 20 | 0.6000 |" in curve_table(curves) and "| 40 | 0.7000 |" in curve_table(curves)


def test_scoring_mid_training_leaves_the_batches_unchanged() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.batches: list[torch.Tensor] = []

        def train_step(self, batch, nets, opts, ctx):  # noqa: ANN001, ANN201
            self.batches.append(batch["a"].clone())

    data = {"a": torch.arange(50.0).view(50, 1), "b": torch.zeros(50, 1)}
    plain, observed, seen = Recorder(), Recorder(), []
    torch.manual_seed(3)
    quality._train(plain, {}, {}, data, 6, 4)
    torch.manual_seed(3)
    # a callback that draws from torch's RNG must not shift the batches after it
    quality._train(observed, {}, {}, data, 6, 4, [2, 4],
                   lambda step: seen.append((step, torch.rand(1))))
    assert [s for s, _ in seen] == [2, 4]
    assert all(torch.equal(a, b) for a, b in zip(plain.batches, observed.batches))


@pytest.mark.slow
def test_quality_curve_ends_at_the_rows_own_scores() -> None:
    """Federated (global and FedBN's per-hospital models), centralized and alone rows, with and
    without the curve: the same final rows; the curve has its points and ends at the row."""
    small = BenchConfig(hospitals=2, image_size=16, width=4, rounds=2, local_steps=2, batch=2)
    variants = {k: VARIANTS[k] for k in ("fedgan", "fedbn")}
    curves: dict = {}
    with_curve, _, _ = run(replace(small, curve_points=2), [0], variants, curves)
    without, _, _ = run(small, [0], variants)
    assert with_curve == without
    assert set(curves) == {"centralized", "hospital-1 alone", "hospital-2 alone", "fedgan",
                           "fedbn"}
    for name, pts in curves.items():
        assert [s for s, _ in pts] == [2, 4], name
        assert pts[-1][1] == pytest.approx(with_curve[name]), name
