"""Client-level DP on the aggregate (server/client_dp.py): clipping bounds each hospital's
influence, the noise has the std it claims, the epsilon is Opacus' own, refusals at launch, and a
tiny in-process run whose metrics.jsonl, report, Prometheus gauge and status show the epsilon."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from server.aggregation import Update
from server.client_dp import EPSILON, ClientDP, epsilon, noise_for_epsilon, noised_mean
from server.run_config import FederationConfig, from_flat

C = 1.0


def _ref() -> dict[str, np.ndarray]:
    return {"generator.w": np.zeros(64, np.float32), "generator.b": np.zeros(8, np.float32),
            "discriminator.w": np.zeros(32, np.float32)}


def _update(rng: np.random.Generator, scale: float, examples: float = 10.0) -> Update:
    arrays = {k: (v + rng.normal(0, 1, v.shape)).astype(np.float32) for k, v in _ref().items()}
    norm = math.sqrt(sum(float(np.square(a).sum()) for a in arrays.values()))
    return Update({k: a * np.float32(scale / norm) for k, a in arrays.items()},
                  {"generator": examples, "discriminator": examples})


def _flat(u: Update) -> np.ndarray:
    return np.concatenate([u.arrays[k].astype(np.float64).ravel() for k in sorted(u.arrays)])


@pytest.mark.parametrize("noise", [0.0, 2.0])
def test_a_hospital_sending_1000x_the_bound_moves_the_mean_by_at_most_c_over_n(noise: float
                                                                               ) -> None:
    rng = np.random.default_rng(0)
    honest = {f"h{i}": _update(rng, 0.3 * C) for i in range(4)}
    loud = _update(rng, 1000 * C, examples=1e8)  # and claims every example there is
    quiet = Update({k: np.zeros_like(v) for k, v in _ref().items()}, loud.examples)
    n = len(honest) + 1
    with_loud = noised_mean({**honest, "x": loud}, _ref(), C, noise, np.random.default_rng(7))
    with_quiet = noised_mean({**honest, "x": quiet}, _ref(), C, noise, np.random.default_rng(7))
    assert with_loud.clipped == ["x"] and with_loud.norms["x"] == pytest.approx(1000 * C, 1e-4)
    moved = np.linalg.norm(_flat(with_loud.update) - _flat(with_quiet.update))
    assert moved <= C / n * (1 + 1e-5), moved  # the same noise draw: the rest is the noise
    assert moved == pytest.approx(C / n, rel=1e-4)  # clipped to exactly C, weighted 1/n
    # equal weights: the claimed 1e8 examples count as one hospital
    assert with_loud.update.examples == {"generator": n, "discriminator": n}
    without = noised_mean(honest, _ref(), C, noise, np.random.default_rng(7))
    assert np.linalg.norm(_flat(with_loud.update) - _flat(without.update)) < 2 * C


def test_the_noise_std_is_z_c_over_n() -> None:
    z, clip, n = 1.5, 2.0, 3
    ref = {"generator.w": np.zeros(200_000, np.float32)}
    zero = Update({"generator.w": np.zeros(200_000, np.float32)}, {"generator": 5.0})
    rng = np.random.default_rng(1)
    draws = np.stack([noised_mean({f"h{i}": zero for i in range(n)}, ref, clip, z, rng)
                      .update.arrays["generator.w"] for _ in range(5)])
    sigma = z * clip / n
    assert draws.std() == pytest.approx(sigma, rel=0.01)
    assert abs(draws.mean()) < 0.01 * sigma
    # a component trained by one hospital only: n_c = 1, sigma = z C
    ref2 = {**ref, "d_b.w": np.zeros(100_000, np.float32)}
    one = Update({**zero.arrays, "d_b.w": np.zeros(100_000, np.float32)},
                 {"generator": 5.0, "d_b": 5.0})
    out = noised_mean({"h0": one, "h1": zero, "h2": zero}, ref2, clip, z, rng)
    assert out.update.arrays["d_b.w"].std() == pytest.approx(z * clip, rel=0.02)
    assert out.sigma == {"generator": pytest.approx(sigma), "d_b": pytest.approx(z * clip)}


def test_integer_buffers_are_not_released_and_variances_stay_non_negative() -> None:
    ref = {"generator.bn.running_var": np.full(4000, 0.01, np.float32),
           "generator.bn.num_batches_tracked": np.array(7, np.int64)}
    u = Update({"generator.bn.running_var": np.full(4000, 0.02, np.float32),
                "generator.bn.num_batches_tracked": np.array(99, np.int64)}, {"generator": 3.0})
    out = noised_mean({"a": u, "b": u}, ref, 1.0, 5.0, np.random.default_rng(2)).update.arrays
    assert out["generator.bn.num_batches_tracked"] == 7
    assert (out["generator.bn.running_var"] >= 0).all()


def test_epsilon_is_opacus_rdp_and_falls_with_more_noise() -> None:
    from opacus.accountants import RDPAccountant

    for z, q, rounds in ((1.0, 1.0, 5), (0.8, 0.5, 20), (3.0, 0.2, 100)):
        dp = ClientDP(z, C, 1e-5)
        rng = np.random.default_rng(3)
        eps = []
        for _ in range(rounds):
            _, notes = dp.release({"h": _update(rng, 0.5)}, _ref(), q)
            eps.append(notes[EPSILON])
        own = RDPAccountant()
        for _ in range(rounds):
            own.step(noise_multiplier=z, sample_rate=q)
        assert eps[-1] == pytest.approx(own.get_epsilon(delta=1e-5), rel=1e-9)
        assert all(b > a for a, b in zip(eps, eps[1:]))  # every round spends
    by_noise = [epsilon([(z, 1.0, 10)], 1e-5) for z in (0.7, 1.0, 2.0, 5.0)]
    assert all(b < a for a, b in zip(by_noise, by_noise[1:])), by_noise
    # the calibration the quality bench uses hits its target
    z8 = noise_for_epsilon(8.0, 10, 1.0, 1e-5)
    assert epsilon([(z8, 1.0, 10)], 1e-5) == pytest.approx(8.0, abs=0.1)


def test_the_ledger_is_rebuilt_on_resume() -> None:
    dp = ClientDP(1.2, C)
    rows = []
    for rnd in (1, 2, 3):
        _, notes = dp.release({"h": _update(np.random.default_rng(rnd), 0.5)}, _ref(), 1.0)
        rows.append({"round": rnd, "server": notes})
    again = ClientDP(1.2, C)
    again.restore(rows, before_round=3)
    assert again.epsilon() == pytest.approx(rows[1]["server"][EPSILON])


@pytest.mark.parametrize("settings, says", [
    ({"client-dp-clip": 0.0}, "client-dp-clip must be > 0"),
    ({"client-dp-clip": -1.0}, "client-dp-clip must be > 0"),
    ({"client-dp-clip": 1.0, "reducer": "median"}, "reducer 'median' is not a mean"),
    ({"client-dp-clip": 1.0, "reducer": "trimmed-mean"}, "reducer 'trimmed-mean' is not a mean"),
    ({"client-dp-clip": 1.0, "preset": "ua-gan"}, "preset 'ua-gan' sends no model updates"),
    ({"client-dp-clip": 1.0, "secure-aggregation": True, "min-hospitals": 3},
     "clipping must run at the hospital and the noise be distributed"),
    ({"client-dp-clip": 1.0, "client-dp-delta": 1.0}, "client-dp-delta must be in"),
])
def test_launch_refuses_what_cannot_be_accounted(settings: dict, says: str) -> None:
    with pytest.raises(ValueError, match="client-dp: ") as err:
        from_flat({"client-dp-noise-multiplier": 1.0, **settings})
    assert says in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="client-dp-noise-multiplier must be >= 0"):
        from_flat({"client-dp-noise-multiplier": -1.0, "client-dp-clip": 1.0})


def test_off_by_default_and_on_with_a_bound() -> None:
    assert from_flat({}).client_dp_noise_multiplier == 0.0
    cfg = from_flat({"client-dp-noise-multiplier": 1.1, "client-dp-clip": 0.5,
                     "preset": "fedbn"})
    assert (cfg.client_dp_noise_multiplier, cfg.client_dp_clip) == (1.1, 0.5)


@pytest.mark.slow
def test_an_inprocess_run_reports_a_growing_epsilon(tmp_path: Path) -> None:
    from fedsynth.commands.status import folder_summary, format_run
    from fedsynth.inprocess import run_inprocess
    from server.metrics import CoordinatorMetrics
    from shared_models import ModelConfig, TrainConfig
    from tests.harness.report_checks import chart_titles
    from tests.unit.fedsynth.test_inprocess import _hospitals
    from server.report import build_report

    cfg = FederationConfig(model=ModelConfig(family="pix2pix", image_size=16, width=4),
                           train=TrainConfig(local_steps=2, batch_size=2),
                           run_dir=str(tmp_path / "runs"), run_id="cdp", num_samples=2,
                           rounds=2, client_dp_noise_multiplier=1.0, client_dp_clip=0.5)
    metrics = CoordinatorMetrics()
    folder, _ = run_inprocess(cfg, _hospitals(tmp_path), observers=(metrics.observe,))
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert "client-level DP: clip 0.5, noise multiplier 1, delta 1e-05" in \
        (folder / "coordinator.log").read_text()
    eps = [r["server"][EPSILON] for r in rows]
    assert 0 < eps[0] < eps[1] and eps[1] == pytest.approx(epsilon([(1.0, 1.0, 2)], 1e-5))
    assert all(r["replied"] == 2 and r["server"]["client-dp-noise-std"] == pytest.approx(0.25)
               and r["server"]["refused-aggregates"] == 0 for r in rows)
    page = build_report(folder)
    assert any("Client-level DP" in t for t in chart_titles(page))
    assert "Client-level DP on the aggregate: each hospital" in page
    assert metrics.client_dp_epsilon._value.get() == pytest.approx(eps[1])
    summary = folder_summary(folder)
    assert summary["client-dp-epsilon"] == pytest.approx(eps[1])
    assert any(f"client-level epsilon: {eps[1]:.4g} (delta 1e-05)" in line
               for line in format_run({**summary, "run-folder": "cdp"}))


def test_the_strategy_keeps_a_loud_hospital_clipped_instead_of_comparing_it_to_the_others(
) -> None:
    """The plain round drops a reply 50x the others' median (norm_outliers); under client DP that
    test is off (it would let one hospital decide another's inclusion) and the reply is clipped.
    Equal weights: hospital 1's 10x example count does not count."""
    from server.strategy import GanStrategy
    from tests.unit.server.test_strategy import ALL, COMPONENTS, run_round

    many = {c: 10 * n for c, n in ALL.items()}
    answers = {1: (0.1, many), 2: (0.1, ALL), 3: (5.0, ALL)}
    plain = GanStrategy(COMPONENTS)
    run_round(plain, answers)
    assert (plain.last_train.replied, plain.last_train.rejected) == (2, 1)
    dp = GanStrategy(COMPONENTS, client_dp=ClientDP(1e-6, 1.0))
    _, _, new, _ = run_round(dp, answers)
    assert (dp.last_train.replied, dp.last_train.rejected) == (3, 0)
    loud = 5.0 / (5.0 * math.sqrt(10))  # 10 elements over the four components, clipped to 1
    assert new["g_ab.w"] == pytest.approx([(0.1 + 0.1 + loud) / 3] * 2, abs=1e-4)
    notes = dp.last_train.notes()
    assert notes["client-dp-clipped"] == 1 and notes["client-dp-sample-rate"] == 1.0
    assert notes[EPSILON] == pytest.approx(epsilon([(1e-6, 1.0, 1)], 1e-5))
