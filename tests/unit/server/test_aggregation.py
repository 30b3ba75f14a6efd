"""The aggregation math against hand-computed values (small arrays, no Flower)."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from server.aggregation import (
    ComponentPolicy,
    ServerOptState,
    Update,
    aggregate,
    coordinate_median,
    norm_state_keys,
    server_step,
    trimmed_mean,
    weighted_mean,
)

A = np.array([1.0, 2.0], dtype=np.float32)
B = np.array([3.0, 6.0], dtype=np.float32)


def test_weighted_mean_by_examples_and_integer_buffers() -> None:
    np.testing.assert_allclose(weighted_mean([A, B], [1, 3]), [2.5, 5.0])
    counts = weighted_mean([np.array(3, np.int64), np.array(8, np.int64)], [1, 1])
    assert counts.dtype == np.int64 and int(counts) == 6  # 5.5 rounds to even
    with pytest.raises(ValueError, match="zero"):
        weighted_mean([A, B], [0, 0])


def test_median_and_trimmed_mean_ignore_an_outlier() -> None:
    values = [np.array([v], np.float32) for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    assert coordinate_median(values)[0] == 3.0
    # beta 0.2 of 5 cuts one value at each end: mean(2, 3, 4)
    assert trimmed_mean(values, 0.2)[0] == pytest.approx(3.0)
    assert trimmed_mean(values, 0.0)[0] == pytest.approx(22.0)


def test_component_weights_come_from_that_components_domain() -> None:
    """Hospital 2 has no domain-B slices: it moves d_a but contributes nothing to d_b."""
    h1 = Update({"d_a.w": A, "d_b.w": A}, {"d_a": 1, "d_b": 2})
    h2 = Update({"d_a.w": B, "d_b.w": B}, {"d_a": 1, "d_b": 0})
    out = aggregate([h1, h2], ("d_a", "d_b"))
    np.testing.assert_allclose(out["d_a.w"], [2.0, 4.0])
    np.testing.assert_allclose(out["d_b.w"], A)


def test_component_nobody_trained_is_left_out() -> None:
    h = Update({"d_b.w": A}, {"d_b": 0})
    assert aggregate([h], ("d_b",)) == {}


def test_fedavgm_momentum_over_two_rounds() -> None:
    policy = ComponentPolicy(server_opt="avgm", server_lr=1.0, server_momentum=0.5)
    state = ServerOptState()
    x0 = np.array([0.0], np.float32)
    x1 = server_step("g.w", x0, np.array([1.0], np.float32), policy, state)  # v = 1
    assert x1[0] == pytest.approx(1.0)
    x2 = server_step("g.w", x1, np.array([2.0], np.float32), policy, state)  # v = 0.5 + 1
    assert x2[0] == pytest.approx(2.5)


def test_fedadam_first_step_by_hand() -> None:
    policy = ComponentPolicy(server_opt="adam", server_lr=0.1, adam_beta1=0.9, adam_beta2=0.99,
                             adam_tau=1e-3)
    state = ServerOptState()
    x1 = server_step("g.w", np.array([0.0], np.float32), np.array([2.0], np.float32), policy,
                     state)
    m, v = 0.1 * 2.0, 0.01 * 4.0  # m = (1-b1) d, v = (1-b2) d^2
    assert x1[0] == pytest.approx(0.1 * m / (np.sqrt(v) + 1e-3), rel=1e-6)
    assert state.m["g.w"][0] == pytest.approx(m) and state.v["g.w"][0] == pytest.approx(v)


def test_server_optimizer_runs_inside_aggregate() -> None:
    policy = {"g": ComponentPolicy(server_opt="avg", server_lr=0.5)}
    out = aggregate([Update({"g.w": B}, {"g": 1})], ("g",), policy, current={"g.w": A},
                    state=ServerOptState())
    np.testing.assert_allclose(out["g.w"], A + 0.5 * (B - A))


def test_sync_schedule() -> None:
    every2 = ComponentPolicy(sync_every=2)
    assert [every2.sends(r) for r in (1, 2, 3, 4)] == [True, False, True, False]
    assert [every2.collects(r) for r in (1, 2, 3, 4)] == [False, True, False, True]
    local = ComponentPolicy(shared=False)
    assert not local.sends(1) and not local.collects(1)


@pytest.mark.parametrize("bad", [dict(sync_every=0), dict(reducer="mode"), dict(trim_beta=0.5),
                                 dict(server_opt="sgd"), dict(weighting="loss")])
def test_policy_rejects_bad_settings(bad: dict) -> None:
    with pytest.raises(ValueError):
        ComponentPolicy(**bad)


def test_norm_state_keys_finds_batch_and_instance_norm_entries() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.InstanceNorm2d(2, affine=True))
    keys = norm_state_keys({"g": net})
    assert keys == {"g.1.weight", "g.1.bias", "g.1.running_mean", "g.1.running_var",
                    "g.1.num_batches_tracked", "g.2.weight", "g.2.bias"}
