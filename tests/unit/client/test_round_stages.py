"""The hospital's round as stages (issue 23 item 4): each stage of ``client.round`` alone.

No Flower message travels here: a ``Round`` is built by hand with what the earlier stages would
have filled in, and a trainer that fails the test if a stage that must not train touches it.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import Context, RecordDict

from client import round as stages
from client.ceilings import CeilingRefused, Deadline
from client.privacy import PrivacyBudgetExhausted, ledger_status, plan_round
from client.settings import HospitalSettings
from client.trainer import LocalResult
from shared_models import ModelConfig, TrainConfig, get_family

DATA = {"image": torch.zeros(64, 1, 16, 16)}
DP_TRAIN = TrainConfig(dp_noise_multiplier=1.0, local_steps=5, batch_size=16)
FAMILY = get_family("dcgan")


class UntouchableTrainer:
    """Only ``family`` may be read; any training, evaluation or idle round fails the test."""

    family = FAMILY

    def __getattr__(self, name: str):
        raise AssertionError(f"the stage touched the trainer ({name})")


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _hospital(tmp_path: Path, **kw) -> HospitalSettings:
    return HospitalSettings(data_dir=tmp_path, cache_dir=tmp_path / "cache",
                            state_dir=tmp_path / "state", **kw)


def _round(tmp_path: Path, hospital: HospitalSettings, train: TrainConfig = DP_TRAIN,
           trainer=None, **kw) -> stages.Round:
    data = SimpleNamespace(train=DATA, num_train=len(DATA["image"]), holdout={}, report=None)
    return stages.Round(msg=None, context=_context(), hospital=hospital,
                        deadline=Deadline(hospital, 1), model=ModelConfig(), train=train,
                        server_round=1, trainer=trainer or UntouchableTrainer(), data=data, **kw)


def test_plan_refuses_a_dp_round_past_the_budget_without_touching_the_trainer(tmp_path) -> None:
    r = _round(tmp_path, _hospital(tmp_path, dp_epsilon=0.01))
    with pytest.raises(PrivacyBudgetExhausted):
        stages.plan_privacy(r)
    assert r.dp_plan is None
    assert ledger_status(r.hospital).state == "first-start"  # nothing charged


def test_plan_within_the_budget_projects_the_releases(tmp_path) -> None:
    r = _round(tmp_path, _hospital(tmp_path, dp_epsilon=50.0))
    stages.plan_privacy(r)
    assert r.dp_plan is not None and r.dp_plan.releases > 0
    assert ledger_status(r.hospital).state == "first-start"  # a plan charges nothing


def test_plan_refuses_a_message_past_the_ceilings_before_anything_is_built(tmp_path) -> None:
    hospital = _hospital(tmp_path, max_batch=8)
    r = _round(tmp_path, hospital, train=TrainConfig(batch_size=16), trainer=None)
    r.msg = SimpleNamespace(metadata=SimpleNamespace(message_type="train"))
    with pytest.raises(CeilingRefused):
        stages.plan_ceilings(r)


def _dp_result(releases: int, rate: float) -> LocalResult:
    return LocalResult(arrays={}, metrics={}, dp_releases=releases, dp_sample_rate=rate)


def test_account_charges_the_ledger_once_per_release(tmp_path) -> None:
    hospital = _hospital(tmp_path, dp_epsilon=50.0)
    r = _round(tmp_path, hospital)
    r.dp_plan = plan_round(hospital, r.context, FAMILY, DP_TRAIN, DATA, 1)
    made = r.dp_plan.releases - 1  # the trainer may make fewer than planned, never more
    r.result = _dp_result(made, r.dp_plan.sample_rate)
    stages.account(r)
    status = ledger_status(hospital)
    assert status.state == "ok" and status.ledger.releases == made
    assert r.result.metrics["dp-epsilon"] == pytest.approx(status.ledger.epsilon(
        hospital.dp_delta))


def test_account_without_dp_charges_nothing(tmp_path) -> None:
    hospital = _hospital(tmp_path)
    r = _round(tmp_path, hospital, train=TrainConfig())
    r.result = LocalResult(arrays={}, metrics={"loss-g": 1.0})
    stages.account(r)
    assert "dp-epsilon" not in r.result.metrics
    assert ledger_status(hospital).state == "first-start"


def test_evaluate_stage_does_nothing_without_an_admitted_evaluation(tmp_path) -> None:
    r = _round(tmp_path, _hospital(tmp_path))
    assert stages.evaluate(r).evaluation == {}  # the untouchable trainer was not asked
