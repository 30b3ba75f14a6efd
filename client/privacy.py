"""The hospital's privacy ledger and budget: what DP-SGD rounds have spent, and the refusal.

The hospital keeps the history of its DP releases (``shared_models.dp.Accountant``: noise
multiplier, Poisson rate, count) over EVERY run in ``<state-dir>/run-state/<hospital>/
dp-ledger.json`` (and the current run's copy in ``context.state``): runs on the same slices
compose, so its ``dp-epsilon`` is one budget for all of them, and a restarted daemon does not
forget what it spent. The state folder is the hospital's kept state (systemd ``StateDirectory=``),
not its cache (``CacheDirectory=``, which may be cleaned at any time: deleting the ledger there
once gave a hospital a fresh budget, issue 25). A hospital with a budget and no state folder
refuses DP rounds.

The ledger is written atomically (``client.statefiles``) with a checksum, and the first charge
leaves a marker beside it (and a copy in the cache folder): from then on a MISSING ledger is told
from a first start, and a missing or CORRUPT ledger refuses every DP round, in one line naming the
file, until an operator restores it or resets it (``fedsynth ledger``, docs/hospital-it.md).

Before a round it projects epsilon(dp-delta) after the round's releases; above its ``dp-epsilon``
it refuses the round, logging ONE line, and the coordinator counts it as failed, by name, while
the run goes on without it. After a round it charges exactly the releases the trainer made (a
family that made more than it declared fails the round: nothing is sent) and reports epsilon spent
so far as the ``dp-epsilon`` metric, the one scalar DP adds to a reply.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from shared_models import TrainConfig
from shared_models.dp import DP_EPSILON, Accountant, PrivacyError  # noqa: F401

from .settings import HospitalSettings
from .statefiles import read_state, write_atomic

log = logging.getLogger(__name__)

LEDGER_STATE = "fedsynth-dp-ledger"  # in context.state: ConfigRecord {"history": json}
LEDGER = "dp-ledger"  # <state-dir>/run-state/<hospital>/dp-ledger.json
MARKER = "dp-ledger-started"  # beside it (and in the cache folder): DP was charged here before
FORMAT = "fedsynth-dp-ledger/1"
FIX = ("restore the file from a backup, or run `fedsynth ledger reset --i-know` with this "
       "hospital's settings (docs/hospital-it.md, 'The privacy ledger')")


class PrivacyRefused(RuntimeError):
    """This hospital's privacy settings refuse the round (no DP, or over its budget)."""


class PrivacyBudgetExhausted(PrivacyRefused):
    """The round would take epsilon past this hospital's ``dp-epsilon``."""


class LedgerUnusable(PrivacyRefused):
    """The ledger on disk is missing (after DP was charged here) or corrupt: no DP round until
    an operator acts. The message names the file and what to do."""


@dataclass
class RoundPlan:
    """What a DP round will charge: Poisson rate q, releases, and the ledger it charges."""

    ledger: Accountant
    noise_multiplier: float
    sample_rate: float
    releases: int


@dataclass(frozen=True)
class LedgerFiles:
    """Where this hospital's ledger, its marker and the old (cache) ledger are."""

    ledger: Path
    marker: Path
    cache_marker: Path | None
    legacy: Path | None  # <cache-dir>/run-state/<hospital>/dp-ledger.json of earlier versions

    @classmethod
    def of(cls, hospital: HospitalSettings) -> "LedgerFiles | None":
        ledger = hospital.state_path(LEDGER)
        if ledger is None:
            return None
        legacy = hospital.cache_state_path(LEDGER)
        cache_marker = hospital.cache_state_path(MARKER)
        return cls(ledger, ledger.with_name(f"{MARKER}.json"),
                   None if cache_marker == ledger.with_name(f"{MARKER}.json") else cache_marker,
                   None if legacy == ledger else legacy)


def _ledger_text(ledger: Accountant) -> str:
    history = json.loads(ledger.to_json())
    digest = hashlib.sha256(json.dumps(history).encode()).hexdigest()
    return json.dumps({"format": FORMAT, "history": history, "releases": ledger.releases,
                       "sha256": digest}, indent=1) + "\n"


def parse_ledger(text: str) -> Accountant:
    """A ledger file's content; ``ValueError`` (saying why) for anything but an intact ledger.

    The earlier bare-list form (``Accountant.to_json``) is read too (a file carried over)."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if isinstance(raw, list):
        return Accountant.from_json(text)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"not a ledger of format {FORMAT}")
    history = raw.get("history")
    if hashlib.sha256(json.dumps(history).encode()).hexdigest() != raw.get("sha256"):
        raise ValueError("its checksum does not match its history")
    ledger = Accountant.from_json(json.dumps(history))
    if raw.get("releases") != ledger.releases:
        raise ValueError("its release count does not match its history")
    return ledger


@dataclass(frozen=True)
class LedgerStatus:
    """What is on disk: ``state`` one of ok, first-start, missing, corrupt, none (no state
    folder); ``ledger`` when it could be read; ``problem`` the one line when unusable."""

    state: str
    files: LedgerFiles | None
    ledger: Accountant | None = None
    problem: str = ""


def ledger_status(hospital: HospitalSettings) -> LedgerStatus:
    """Read (never write) this hospital's ledger and say what state it is in."""
    files = LedgerFiles.of(hospital)
    if files is None:
        return LedgerStatus("none", None)
    if files.ledger.exists() or files.ledger.is_symlink():
        try:
            return LedgerStatus("ok", files, parse_ledger(read_state(files.ledger)))
        except (OSError, ValueError, TypeError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            return LedgerStatus("corrupt", files, problem=(
                f"privacy ledger {files.ledger} is corrupt ({why}); DP rounds are refused "
                f"until an operator acts: {FIX}"))
    markers = [m for m in (files.marker, files.cache_marker) if m is not None and m.exists()]
    if markers:
        return LedgerStatus("missing", files, problem=(
            f"privacy ledger {files.ledger} is missing, but this hospital has charged DP rounds "
            f"before ({markers[0]}); DP rounds are refused until an operator acts: {FIX}"))
    if files.legacy is not None and files.legacy.exists():
        try:
            old = parse_ledger(read_state(files.legacy))
        except (OSError, ValueError, TypeError, UnicodeDecodeError) as exc:
            return LedgerStatus("corrupt", files, problem=(
                f"privacy ledger {files.legacy} (the cache folder's, of an earlier fedsynth) is "
                f"corrupt ({exc}); DP rounds are refused until an operator acts: {FIX}"))
        return LedgerStatus("ok", files, old)
    return LedgerStatus("first-start", files, Accountant())


def _write_marker(files: LedgerFiles) -> None:
    text = json.dumps({"since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "ledger": str(files.ledger)}) + "\n"
    if not files.marker.exists():
        write_atomic(files.marker, text, prefix=".dp-")
    if files.cache_marker is not None and not files.cache_marker.exists():
        try:  # the cache's copy is a hint only (the cache may be cleaned): best effort
            write_atomic(files.cache_marker, text, prefix=".dp-")
        except OSError as exc:
            log.warning("could not write the ledger marker's copy %s: %s", files.cache_marker,
                        exc)


def write_ledger(files: LedgerFiles, ledger: Accountant) -> None:
    """The ledger, atomically and flushed to disk, then its marker (in that order: a crash
    between the two leaves a readable ledger, never a marker without one it wrote)."""
    write_atomic(files.ledger, _ledger_text(ledger), prefix=".dp-")
    _write_marker(files)


def load_ledger(hospital: HospitalSettings, context: Any) -> Accountant:
    """The ledger: from ``context.state`` or the state folder, whichever has spent more.

    A missing ledger where DP was charged before, or an unreadable one, is NOT treated as empty
    (that would reset the budget): ``LedgerUnusable``, until an operator acts."""
    candidates = []
    if LEDGER_STATE in context.state.config_records:
        candidates.append(Accountant.from_json(
            str(context.state.config_records[LEDGER_STATE]["history"])))
    status = ledger_status(hospital)
    if status.state in ("missing", "corrupt"):
        raise LedgerUnusable(status.problem)
    if status.state == "first-start" and candidates and candidates[0].releases:
        # the whole state folder (marker too) went while this SuperNode still remembers a spend
        raise LedgerUnusable(
            f"privacy ledger {status.files.ledger} is missing, but this hospital charged "
            f"{candidates[0].releases} DP releases in this process; DP rounds are refused "
            f"until an operator acts: {FIX}")
    if status.ledger is not None:
        candidates.append(status.ledger)
    return max(candidates, key=lambda a: a.releases, default=Accountant())


def save_ledger(hospital: HospitalSettings, context: Any, ledger: Accountant) -> None:
    from flwr.app import ConfigRecord

    context.state[LEDGER_STATE] = ConfigRecord({"history": ledger.to_json()})
    files = LedgerFiles.of(hospital)
    if files is None:
        return
    write_ledger(files, ledger)  # an OSError fails the round: the spend must be on record
    if files.legacy is not None and files.legacy.exists():
        try:  # carried over into the state folder: the cache's old copy would only mislead
            files.legacy.unlink()
            log.info("privacy ledger moved from the cache folder (%s) to the state folder (%s)",
                     files.legacy, files.ledger)
        except OSError:
            pass


def reset_ledger(hospital: HospitalSettings) -> tuple[LedgerStatus, Path | None]:
    """The operator's reset (``fedsynth ledger reset --i-know``): the old file, if any, is kept
    aside as ``dp-ledger.json.reset-<time>``, a new empty ledger and marker are written, and
    the reset is appended to ``dp-ledger-resets.log``. Returns the state before and the file
    kept aside."""
    status = ledger_status(hospital)
    files = status.files
    if files is None:
        raise PrivacyError("this hospital has no state-dir, so it keeps no privacy ledger")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = None
    if files.ledger.exists() or files.ledger.is_symlink():
        aside = files.ledger.with_name(f"{files.ledger.name}.reset-{stamp}")
        files.ledger.rename(aside)
    write_ledger(files, Accountant())
    spent = (status.ledger.epsilon(hospital.dp_delta)
             if status.ledger is not None else None)
    entry = {"time": stamp, "before": status.state, "epsilon-before": spent,
             "releases-before": status.ledger.releases if status.ledger is not None else None,
             "kept-aside": str(aside) if aside else None}
    log_fd = os.open(files.ledger.with_name("dp-ledger-resets.log"),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # the hospital's own
    with os.fdopen(log_fd, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    log.warning("privacy ledger %s RESET by an operator (it was %s%s)", files.ledger,
                status.state, "" if spent is None else f", epsilon {spent:.4g} spent")
    return status, aside


def _refuse(hospital: HospitalSettings, exc: PrivacyRefused, reason: str = "dp-budget") -> None:
    from . import metrics as hospital_metrics

    log.error("REFUSED round (%s): %s", reason, exc)
    hospital_metrics.record_refusal(hospital.name, reason)
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
    if hospital.needs_dp and hospital.state_dir is None:
        _refuse(hospital, PrivacyRefused(
            f"round {server_round}: this hospital has a privacy budget but no state-dir, so its "
            "ledger would not survive a restart; set state-dir"))
    try:
        ledger = load_ledger(hospital, context)
    except LedgerUnusable as exc:
        _refuse(hospital, exc, "dp-ledger")
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
