"""A reduced ``make bench-quality``: the whole pipeline runs (``run_federation`` over the
in-process grid to the real ClientApp), training beats no training, and the two printed ratios
come from the rows."""

from __future__ import annotations

import math

import pytest
import torch

from bench import quality
from bench.quality import (REFERENCE_ROWS, VARIANTS, BenchConfig, alone_rows, hospital_data,
                           mean_rows, ratios, run, table)
from shared_models import get_family

SMALL = BenchConfig(hospitals=2, image_size=16, width=4, rounds=3, local_steps=5, batch=2, lr=1e-3)


def test_data_split_is_non_iid_and_held_out() -> None:
    train, held = hospital_data(BenchConfig(hospitals=2, image_size=16))
    assert len(train) == 2 and len(held["a"]) > 0
    assert train[0]["a"].shape[1:] == (1, 16, 16) and train[0]["a"].min() >= -1.0
    # every 4th pair of each hospital is held out, and never trained on
    assert all(len(t["a"]) == len(t["b"]) for t in train)
    assert sum(len(t["a"]) for t in train) >= 2 * len(held["a"])
    flat = lambda x: {tuple(v.flatten().tolist()) for v in x}  # noqa: E731
    assert not flat(held["a"]) & flat(torch.cat([t["a"] for t in train]))
    # different scanner settings: the two hospitals' mean T2w intensities differ
    assert abs(float(train[0]["b"].mean() - train[1]["b"].mean())) > 1e-3


def test_ratios_come_from_the_rows() -> None:
    rows = {"centralized": {"ssim": 0.8}, "hospital-1 alone": {"ssim": 0.4},
            "hospital-2 alone": {"ssim": 0.6}, "a": {"ssim": 0.7}, "b": {"ssim": 0.76}}
    best, fed, solo = ratios(rows, ["a", "b"], ["hospital-1 alone", "hospital-2 alone"])
    assert best == "b" and fed == pytest.approx(0.95) and solo == pytest.approx(0.625)
    seeds = mean_rows([{"x": {"ssim": 0.2, "mae": 1.0}}, {"x": {"ssim": 0.4, "mae": 3.0}}])
    assert seeds == {"x": {"ssim": pytest.approx(0.3), "mae": pytest.approx(2.0)}}


@pytest.mark.parametrize("keep", [True, False])
def test_hospitals_keep_their_optimisers_only_when_asked(keep: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    family_cls = type(get_family("pix2pix"))  # get_family builds a new instance per call
    built: list[dict[str, torch.optim.Optimizer]] = []
    real = family_cls.optimizers

    def counting(self, nets, train):  # noqa: ANN001, ANN202
        built.append(real(self, nets, train))
        return built[-1]

    monkeypatch.setattr(family_cls, "optimizers", counting)
    cfg = BenchConfig(hospitals=2, image_size=16, width=4, rounds=3, local_steps=2, batch=2,
                      keep_optimizers=keep)
    train, held = hospital_data(cfg)
    quality.federated("local-d", cfg, train, held)
    # the ClientApp's trainer builds them every round; kept, each hospital's first ones serve on
    assert len(built) == (2 if keep else 2 * 3)
    # a kept Adam has seen every local step of every round; a fresh one only the last round's
    steps = [float(s["step"]) for s in built[-1]["generator"].state.values()]
    assert steps and all(s == (cfg.steps if keep else cfg.local_steps) for s in steps)


@pytest.mark.slow
def test_reduced_benchmark_trains_and_reports_every_row() -> None:
    rows, fed_ratio, alone_ratio = run(SMALL)
    fed_rows = list(VARIANTS)
    assert set(rows) == {*REFERENCE_ROWS, "centralized", *alone_rows(SMALL), *fed_rows}
    for r in rows.values():
        assert -1.0 <= r["ssim"] <= 1.0 and r["mae"] >= 0 and math.isfinite(r["psnr"])
    untrained = rows[REFERENCE_ROWS[1]]
    # 15 steps at lr 1e-3 already beat the untrained generator, for every kind of training
    for name in ("centralized", *alone_rows(SMALL), *fed_rows):
        assert rows[name]["ssim"] > untrained["ssim"] + 0.02, name
        assert rows[name]["mae"] < untrained["mae"], name
    c = rows["centralized"]["ssim"]
    assert fed_ratio == pytest.approx(max(rows[n]["ssim"] for n in fed_rows) / c)
    assert alone_ratio == pytest.approx(sum(rows[n]["ssim"] for n in alone_rows(SMALL)) / 2 / c)
    assert "| fedbn |" in table(rows)


def test_client_dp_rows_are_calibrated_and_reach_the_run_settings() -> None:
    """``--client-dp-epsilon 8 1``: fedgan without DP, then at each epsilon; the noise the
    accountant gives for the rounds, passed as run settings (no training here: the reduced
    federated run takes over 30 s on the shared cores)."""
    from bench.quality import client_dp_variants, federation_config
    from server.client_dp import epsilon

    variants = client_dp_variants([8.0, 1.0], SMALL.rounds, 0.5)
    names = list(variants)
    assert names[0] == "fedgan" and len(names) == 3 and "eps=8" in names[1]
    for name, target in zip(names[1:], (8.0, 1.0)):
        preset, overrides, keep = variants[name]
        fcfg = federation_config(preset, SMALL.model(), SMALL.train_config(), SMALL.rounds,
                                 overrides)
        assert fcfg.client_dp_clip == 0.5 and fcfg.extra_overrides == ()
        eps = epsilon([(fcfg.client_dp_noise_multiplier, 1.0, SMALL.rounds)], 1e-5)
        assert eps == pytest.approx(target, rel=0.02)
