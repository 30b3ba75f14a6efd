"""The hospital's privacy ledger and budget: what DP-SGD rounds have spent, and the refusal.

The hospital keeps the history of its DP releases (``shared_models.dp.Accountant``: noise
multiplier, Poisson rate, count) over EVERY run in ``<cache-dir>/run-state/<hospital>/
dp-ledger.json`` (and the current run's copy in ``context.state``): runs on the same slices
compose, so its ``dp-epsilon`` is one budget for all of them, and a restarted daemon does not
forget what it spent. A hospital with a budget and no cache folder refuses DP rounds. Before a round it projects epsilon(dp-delta) after the round's releases;
above its ``dp-epsilon`` it refuses the round, logging ONE line, and the coordinator counts it as
failed, by name, while the run goes on without it. After a round it charges exactly the releases
the trainer made (a family that made more than it declared fails the round: nothing is sent) and
reports epsilon spent so far as the ``dp-epsilon`` metric, the one scalar DP adds to a reply.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from shared_models import TrainConfig
from shared_models.dp import DP_EPSILON, Accountant, PrivacyError  # noqa: F401

from .settings import HospitalSettings

log = logging.getLogger(__name__)

LEDGER_STATE = "fedsynth-dp-ledger"  # in context.state: ConfigRecord {"history": json}


class PrivacyRefused(RuntimeError):
    """This hospital's privacy settings refuse the round (no DP, or over its budget)."""


class PrivacyBudgetExhausted(PrivacyRefused):
    """The round would take epsilon past this hospital's ``dp-epsilon``."""


@dataclass
class RoundPlan:
    """What a DP round will charge: Poisson rate q, releases, and the ledger it charges."""

    ledger: Accountant
    noise_multiplier: float
    sample_rate: float
    releases: int


def _ledger_path(hospital: HospitalSettings, run_id: int) -> Path | None:
    """One ledger per hospital over ALL runs: every run trains on the same slices, so their
    releases compose; a per-run ledger would let a coordinator spend a fresh dp-epsilon with
    each new run."""
    return hospital.state_path("dp-ledger")


def load_ledger(hospital: HospitalSettings, context: Any) -> Accountant:
    """The run's ledger: from ``context.state`` or the cache folder, whichever has spent more.

    An unreadable file on disk is NOT treated as empty (that would reset the budget): the
    round fails until the hospital's IT looks at it."""
    candidates = []
    if LEDGER_STATE in context.state.config_records:
        candidates.append(Accountant.from_json(
            str(context.state.config_records[LEDGER_STATE]["history"])))
    path = _ledger_path(hospital, context.run_id)
    if path is not None and path.exists():
        try:
            candidates.append(Accountant.from_json(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise PrivacyError(f"privacy ledger {path} is unreadable ({exc}); refusing to train "
                               "rather than forget what this run has spent") from None
    return max(candidates, key=lambda a: a.releases, default=Accountant())


def save_ledger(hospital: HospitalSettings, context: Any, ledger: Accountant) -> None:
    from flwr.app import ConfigRecord

    context.state[LEDGER_STATE] = ConfigRecord({"history": ledger.to_json()})
    path = _ledger_path(hospital, context.run_id)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".dp-")
    with os.fdopen(fd, "w") as fh:
        fh.write(ledger.to_json())
    os.replace(tmp, path)  # an OSError fails the round: the spend must be on record


def _refuse(hospital: HospitalSettings, exc: PrivacyRefused) -> None:
    from . import metrics as hospital_metrics

    log.error("REFUSED round (dp-budget): %s", exc)
    hospital_metrics.record_refusal(hospital.name, "dp-budget")
    raise exc


def plan_round(hospital: HospitalSettings, context: Any, family: Any, train: TrainConfig,
               data: Mapping[str, torch.Tensor] | None, server_round: int) -> RoundPlan | None:
    """Refuse a round this hospital's privacy settings forbid; else what DP will charge.

    None for a run without DP at a hospital that does not require it."""
    if not train.dp:
        if hospital.needs_dp:
            _refuse(hospital, PrivacyRefused(
                f"round {server_round}: the run trains without differential privacy "
                f"(train dp-noise-multiplier = 0) and this hospital requires it "
                f"(dp-epsilon = {hospital.dp_epsilon:g}, require-dp = "
                f"{str(hospital.require_dp).lower()})"))
        return None
    if hospital.needs_dp and hospital.cache_dir is None:
        _refuse(hospital, PrivacyRefused(
            f"round {server_round}: this hospital has a privacy budget but no cache-dir, so its "
            "ledger would not survive a restart; set cache-dir"))
    ledger = load_ledger(hospital, context)
    spent = ledger.epsilon(hospital.dp_delta)
    if data is None:
        return RoundPlan(ledger, train.dp_noise_multiplier, 0.0, 0)
    rate, per_step = family.dp_plan(data, train.batch_size)
    releases = per_step * train.local_steps
    after = ledger.epsilon(hospital.dp_delta, (train.dp_noise_multiplier, rate, releases))
    if after > hospital.dp_epsilon:
        _refuse(hospital, PrivacyBudgetExhausted(
            f"round {server_round} would take epsilon from {spent:.4g} to {after:.4g} "
            f"(delta = {hospital.dp_delta:g}), past this hospital's dp-epsilon = "
            f"{hospital.dp_epsilon:g} (one budget over every run on this hospital's slices); it "
            "trains no further DP round"))
    return RoundPlan(ledger, train.dp_noise_multiplier, rate, releases)


def charge(hospital: HospitalSettings, context: Any, plan: RoundPlan, releases: int,
           sample_rate: float) -> float:
    """Charge the releases the trainer made; epsilon spent so far (the reply's ``dp-epsilon``).

    More releases than planned, or at another rate, fail the round before anything is sent."""
    if releases > plan.releases or (releases and sample_rate > plan.sample_rate):
        raise PrivacyError(f"the round made {releases} DP releases at q = {sample_rate:g}; "
                           f"{plan.releases} at q = {plan.sample_rate:g} were accounted")
    plan.ledger.add(plan.noise_multiplier, plan.sample_rate, releases)
    save_ledger(hospital, context, plan.ledger)
    eps = plan.ledger.epsilon(hospital.dp_delta)
    log.info("privacy: epsilon = %.4g spent (delta = %g, %d DP releases on this hospital's "
             "slices, all runs; budget %g)",
             eps, hospital.dp_delta, plan.ledger.releases, hospital.dp_epsilon)
    return eps


def refuse_ua_gan(hospital: HospitalSettings) -> None:
    """UA-GAN replies (logits and input gradients on the hospital's slices) are not DP."""
    if hospital.needs_dp:
        _refuse(hospital, PrivacyRefused(
            "UA-GAN rounds send discriminator outputs and input gradients that are not "
            "differentially private; this hospital requires DP"))



AUDIT_SAMPLES = 64  # generated slices per audit round


def audit_round(hospital: HospitalSettings, trainer: Any, data: Any, server_round: int,
                dp: bool) -> dict[str, float]:
    """The memorisation audit after this round's training (``audit-every``), generation
    families only: ``AUDIT_SAMPLES`` samples of the generator this round sends against the
    training and held-out slices (``shared_models.audit``). Logged and returned as two scalars;
    in a DP run they stay here (a count of near-copies of training slices is a statistic of
    them, outside the DP guarantee): the caller sends them only when ``dp`` is False."""
    from shared_models.audit import audit

    if (not hospital.audit_every or server_round % hospital.audit_every or data is None
            or trainer.family.task != "generation" or "image" not in data.holdout
            or not len(data.holdout["image"]) or not len(data.train.get("image", ()))):
        return {}
    cfg = trainer.model
    gen = torch.Generator().manual_seed(server_round)
    noise = torch.randn(AUDIT_SAMPLES, cfg.latent_dim, generator=gen).to(trainer.device)
    labels = (torch.arange(AUDIT_SAMPLES, device=trainer.device) % cfg.num_classes
              if cfg.num_classes else None)
    fakes = trainer.family.sample(trainer.nets, noise, labels).float().cpu()
    result = audit(fakes, data.train["image"], data.holdout["image"])
    log.info("memorisation audit after round %d: %d of %d samples are near-copies of training "
             "slices; pixel distance ratio train/held-out %.3f%s", server_round,
             result.near_copies, result.generated, result.pixel.ratio,
             "" if not dp else " (kept here: DP run)")
    return {"audit-near-copy-share": result.near_copy_share,
            "audit-pixel-ratio": result.pixel.ratio}
