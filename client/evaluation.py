"""What a hospital's evaluation may do and send: one per round, a cap per run, and, at a DP
hospital, no figure computed from its slices in the reply.

Every ``eval-*`` figure (D(real), Fréchet distance, MMD, precision / recall / density /
coverage, FRD, SSIM / PSNR / MAE) is a statistic of the held-out slices computed with a model the
coordinator chose. With a crafted discriminator (any weights, BatchNorm running statistics
included) one such scalar is a chosen linear read-out of those slices, and a few hundred signed
EVALUATE messages rebuild their mean pixel by pixel (issue 25 item 1). DP-SGD's ledger does not
see any of it: evaluation trains nothing.

At a hospital whose settings need DP (``require-dp`` or a finite ``dp-epsilon``,
``HospitalSettings.needs_dp``) the figures are therefore **kept home**: written to the hospital's
log (one line per evaluation), its metrics port and its kept-evaluations file (read by
``fedsynth evaluate --kept-home``), and the reply carries only ``eval-examples`` (how many slices
are held out, a count fixed for the run and no function of any pixel) and ``eval-kept-home = 1``.
``eval-seconds`` stays home too: a timing can depend on the values computed.

Why kept home rather than a DP release charged to the same ledger: a DP release of these
scalars needs a sensitivity bound per held-out slice, and for FRD, Fréchet distance, PRDC or
SSIM under an arbitrary received model there is no useful one (a crafted network makes one
slice move the figure as far as it likes, so the noise that makes it DP drowns it); each
release would also spend the training budget on a number of little use to the federation.
Keeping the figures home is sound whatever the model and costs no epsilon; the coordinator
still has its own view of quality (its sample grids and server-side measures), and each
hospital sees its own figures.

Both limits hold at every hospital, DP or not: an evaluation of a round this hospital already
evaluated (by an EVALUATE message, or folded into a train message) is refused in one log line
and counted before anything is computed, and so is any evaluation past ``max-evaluations`` in a
run. They bound how many read-outs a coordinator gets from a hospital without DP; they are not a
privacy guarantee (docs/security.md, "Evaluation").
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

from protocol.keys import EVAL_KEPT_HOME as KEPT_HOME  # the reply's flag

from .privacy import PrivacyRefused
from .statefiles import write_atomic
from .settings import HospitalSettings

log = logging.getLogger(__name__)

RELEASED_WHEN_KEPT = ("eval-examples",)  # what a DP hospital's evaluation reply still carries
EVALUATED_STATE = "fedsynth-evaluated-rounds"  # in context.state: {"rounds": json list}
KEPT_FILE = "kept-evaluations"  # <state folder>/kept-evaluations.jsonl
KEPT_FILE_MAX_BYTES = 4 << 20  # past this the file keeps its newest half


class EvaluationRefused(PrivacyRefused):
    """A second evaluation of one round, or one past ``max-evaluations`` in this run."""


def _evaluated(hospital: HospitalSettings, context: Any) -> set[int]:
    """The rounds of this run this hospital has evaluated: memory and disk, whichever is more."""
    rounds: set[int] = set()
    if EVALUATED_STATE in context.state.config_records:
        try:
            rounds.update(int(r) for r in json.loads(
                str(context.state.config_records[EVALUATED_STATE]["rounds"])))
        except (ValueError, TypeError, KeyError):
            pass
    path = hospital.run_state_path(context.run_id, "evaluated")
    if path is not None and path.is_file():
        try:
            rounds.update(int(r) for r in json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            # treated as spent, not as empty: a corrupt record must not reopen the cap
            log.error("evaluation record %s unreadable (%s): no further evaluation in run %s",
                      path, exc, context.run_id)
            rounds.update(range(-hospital.max_evaluations, 0))
    return rounds


def _save(hospital: HospitalSettings, context: Any, rounds: set[int]) -> None:
    from flwr.app import ConfigRecord

    text = json.dumps(sorted(rounds))
    context.state[EVALUATED_STATE] = ConfigRecord({"rounds": text})
    path = hospital.run_state_path(context.run_id, "evaluated")
    if path is None:
        return
    try:  # temp file, fsync, rename; a full disk leaves the old record and no temp file
        write_atomic(path, text)
    except OSError as exc:  # the memory record still holds for this process
        log.warning("could not record the evaluated rounds in %s: %s", path, exc)


def admit(hospital: HospitalSettings, context: Any, evaluated_round: int) -> None:
    """Record that round ``evaluated_round`` is evaluated now, or refuse (one line, counted).

    Called after the message's signature is checked and before anything is computed."""
    from . import metrics as hospital_metrics

    rounds = _evaluated(hospital, context)
    reason = None
    if evaluated_round in rounds:
        reason, why = "evaluation-repeat", (
            f"round {evaluated_round} of run {context.run_id} was already evaluated here "
            "(one evaluation per round)")
    elif len(rounds) >= hospital.max_evaluations:
        reason, why = "evaluation-limit", (
            f"run {context.run_id} already had {len(rounds)} evaluations here, this "
            f"hospital's max-evaluations = {hospital.max_evaluations}")
    if reason is not None:
        log.error("REFUSED evaluation (%s): %s; nothing computed", reason, why)
        hospital_metrics.record_refusal(hospital.name, reason)
        raise EvaluationRefused(why)
    _save(hospital, context, rounds | {evaluated_round})


def release(hospital: HospitalSettings, context: Any, evaluated_round: int,
            metrics: Mapping[str, float]) -> dict[str, float]:
    """Log the evaluation's figures here; what of them the reply may carry."""
    kept = hospital.needs_dp
    figures = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(metrics.items()))
    log.info("evaluation of round %d (run %s): %s%s", evaluated_round, context.run_id, figures,
             " (kept at this hospital: it requires DP)" if kept else "")
    if not kept:
        return dict(metrics)
    _keep(hospital, {"time": round(time.time(), 3), "run": int(context.run_id),
                     "round": int(evaluated_round),
                     **{k: (float(v) if math.isfinite(float(v)) else None)
                        for k, v in metrics.items()}})
    out = {k: metrics[k] for k in RELEASED_WHEN_KEPT if k in metrics}
    out[KEPT_HOME] = 1
    return out


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{float(v):.6g}"


def kept_path(hospital: HospitalSettings) -> Path | None:
    # the state folder; a hospital without one (a demo, a simulation) keeps them in its cache
    path = hospital.state_path(KEPT_FILE) or hospital.cache_state_path(KEPT_FILE)
    return None if path is None else path.with_suffix(".jsonl")


def _keep(hospital: HospitalSettings, entry: dict[str, Any]) -> None:
    path = kept_path(hospital)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file() and path.stat().st_size > KEPT_FILE_MAX_BYTES:
            lines = path.read_text().splitlines()  # the older half goes, atomically
            write_atomic(path, "".join(f"{x}\n" for x in lines[len(lines) // 2:]))
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
    except OSError as exc:  # the log line has the figures already
        log.warning("could not keep the evaluation in %s: %s", path, exc)


def read_kept(path: Path) -> list[dict[str, Any]]:
    """The kept evaluations in ``path``, oldest first (unreadable lines skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "round" in entry:
            out.append(entry)
    return out
