"""A hospital's round as named stages: ``admit -> plan -> evaluate -> train -> account -> reply``.

Each stage is a function of one ``Round`` (what the message asked and what the stages before
found), testable alone, and each either fills in its part of the ``Round`` or refuses:

* **admit** (``client.admission``): the hospital's settings, the pinned key's signature, the
  replay record and the secure-aggregation config, the signed run and round, a known family. The
  app bundle is admitted before any of this, by the executor (``client.bundle``), and a message
  to a bundle it refused never reaches a stage.
* **plan**: what the round may do here. The message's asked work against this hospital's
  ceilings (``client.ceilings``, before anything is built or loaded); then the trainer with this
  hospital's weights and the received ones, and its data; the reply's components against
  ``never-send`` (it needs the nets: a local norm layer's keys); the DP budget
  (``client.privacy.plan_round``: the releases projected before any is made); the folded
  evaluation's admission (``client.evaluation.admit``). A UA-GAN round has its own floor
  (``client.ua_gan``, ``privacy.refuse_ua_gan``).
* **evaluate**: the received model (the previous round's aggregate) on the held-out slices,
  before training, when the train message asks for it; figures kept home at a DP hospital.
* **train**: ``LocalTrainer.fit`` (or ``idle`` where this hospital holds nothing to train).
* **account**: the ledger is charged once, with exactly the releases the trainer made
  (``client.privacy.charge``), and the memorisation audit (``audit-every``).
* **reply**: this hospital's weights saved in ``context.state``, its metrics recorded, and the
  reply built by ``protocol.train_reply`` only.

Evaluate comes before train because the received model is what it measures. ``client.app`` is the
Flower adapter: it runs these stages and turns a refusal into a generic reason.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from flwr.app import Context, Message, MessageType

from protocol import records as protocol
from shared_models import TrainConfig, encode, get_family
from shared_models.codec import decode_into
from shared_models.perceptual import load_feature_net

from . import ceilings
from . import evaluation as evaluations
from . import metrics as hospital_metrics
from . import privacy
from .admission import PerceptualRefused, check_never_send, check_signature, refuse
from .datasets import DataSelectionError, LocalData, local_data
from .run_state import forget_trainer, trainer_for
from .settings import HospitalSettings
from .trainer import LocalResult, LocalTrainer
from .ua_gan import reply_plan

log = logging.getLogger(__name__)

LOCAL_STATE = "fedsynth-local-weights"  # in context.state: this hospital's whole model


@dataclass
class Round:
    """One message's round at this hospital, filled in stage by stage."""

    msg: Message
    context: Context
    hospital: HospitalSettings
    deadline: ceilings.Deadline  # max-round-seconds from the message's arrival
    model: Any = None  # ModelConfig (signed)
    train: TrainConfig | None = None
    server_round: int = 0
    # plan
    trainer: LocalTrainer | None = None
    # None: this hospital holds nothing the family can use (it trains nothing, says so with zero
    # example counts, rather than failing the round)
    data: LocalData | None = None
    seed: int = 0
    reply: tuple[tuple[str, ...], Callable[[str, str], bool] | None] | None = None
    dp_plan: privacy.RoundPlan | None = None
    perceptual: torch.nn.Module | None = None  # the pinned feature net of perceptual-loss
    evaluated_round: int | None = None  # the folded evaluation's round, once admitted
    # evaluate, train, account
    evaluation: dict[str, float] = field(default_factory=dict)
    result: LocalResult | None = None
    audited: dict[str, float] = field(default_factory=dict)

    @property
    def config(self) -> Any:
        return self.msg.content[protocol.CONFIG]

    @property
    def training(self) -> bool:
        return str(self.msg.metadata.message_type) == MessageType.TRAIN

    @property
    def usable(self) -> bool:
        return self.data is not None and bool(self.data.num_train)


# -- admit -----------------------------------------------------------------------------------

def admit(msg: Message, context: Context) -> Round:
    """This hospital's settings, then what the pinned key signed, once per round, for a known
    family; refused (``client.admission.refuse``) before anything is built."""
    hospital = HospitalSettings.from_node_config(context.node_config)
    deadline = ceilings.Deadline(hospital, int(msg.content[protocol.CONFIG].get(
        protocol.SERVER_ROUND, 0)))
    if hospital.threads:
        torch.set_num_threads(hospital.threads)
    hospital_metrics.note_identity(context.node_id, hospital.name)
    check_signature(hospital, msg, context)
    model, train, server_round = protocol.parse_train_config(msg.content[protocol.CONFIG])
    get_family(model.family)  # an unknown family is refused before anything is built
    return Round(msg, context, hospital, deadline, model, train, server_round)


# -- plan ------------------------------------------------------------------------------------

def plan(r: Round) -> Round:
    """Ceilings, then the trainer and data; for a train message also never-send, the DP budget
    and the folded evaluation's admission; for an evaluate message its admission (one per
    round, a cap per run), before any model or slice is loaded."""
    plan_ceilings(r)
    if str(r.msg.metadata.message_type) == MessageType.EVALUATE:
        evaluations.admit(r.hospital, r.context, r.server_round)
    load(r)
    if r.training:
        plan_reply(r)
        plan_perceptual(r)
        plan_privacy(r)
        plan_evaluation(r)
    return r


def plan_ceilings(r: Round) -> None:
    """The work asked (parameters; batch and steps of a train message) within this hospital's
    ceilings, counted on the meta device before any net is built or slice loaded."""
    ceilings.check_message(r.hospital, r.model, r.train, r.server_round, training=r.training)


def load(r: Round) -> None:
    """The trainer (this hospital's weights with the received ones) and the local data."""
    data_cfg = protocol.parse_data_config(r.config)
    received = protocol.from_record(r.msg.content[protocol.ARRAYS])
    trainer = trainer_for(r.hospital, r.model, r.context.run_id)
    try:
        restore_local(trainer, r.context, received, r.train.seed)
        # the round's state from the signed round number (pgan: stage and fade-in alpha)
        trainer.family.at_round(trainer.nets, r.model, r.server_round)
    except Exception:
        forget_trainer(trainer, r.context.run_id)
        raise
    r.trainer = trainer
    try:
        r.data = local_data(r.hospital, r.model, data_cfg,
                            lesion_masks=r.train.lesion_cycle_weight > 0)
    except DataSelectionError as exc:
        log.warning("this hospital holds nothing %s can train this round: %s", r.model.family,
                    exc)
        r.data = None


def plan_reply(r: Round) -> None:
    """The round's seed and what the reply carries; a component kept home is refused."""
    r.seed = r.train.seed * 1_000_003 + r.server_round * 1009 + r.context.node_id % 1000
    hospital_metrics.reset_peak_memory(r.trainer.device)
    r.reply = reply_plan(r.config, r.trainer.nets, r.trainer.family.components)
    check_never_send(r.hospital, r.reply[0])


def plan_perceptual(r: Round) -> None:
    """``perceptual-loss`` > 0: this hospital's pinned feature network, or the round refused in
    one line (no file set, a missing file, another SHA-256, tensors of another shape)."""
    if r.train.perceptual_loss <= 0:
        return
    h = r.hospital
    if h.perceptual_network is None or not h.perceptual_network_sha256:
        refuse(h, "perceptual-network", PerceptualRefused(
            "perceptual-loss > 0 needs this hospital's perceptual-network and "
            "perceptual-network-sha256 settings; none are set"))
    try:
        r.perceptual = load_feature_net(h.perceptual_network, h.perceptual_network_sha256,
                                        r.model.spatial_dims, r.model.channels)
    except ValueError as exc:
        refuse(h, "perceptual-network", PerceptualRefused(str(exc)))


def plan_privacy(r: Round) -> None:
    """The DP budget: a round the hospital's privacy settings forbid is refused here, before
    the trainer trains (``client.privacy.plan_round``)."""
    r.dp_plan = privacy.plan_round(r.hospital, r.context, r.trainer.family, r.train,
                                   r.data.train if r.usable else None, r.server_round)


def plan_evaluation(r: Round) -> None:
    """The folded evaluation of the received model, admitted or refused (logged and counted:
    the round still trains)."""
    r.evaluated_round = None
    if protocol.EVALUATE_ROUND not in r.config:
        return
    evaluated = int(r.config[protocol.EVALUATE_ROUND])
    try:
        evaluations.admit(r.hospital, r.context, evaluated)
    except evaluations.EvaluationRefused:
        return
    r.evaluated_round = evaluated


# -- evaluate --------------------------------------------------------------------------------

def measure(r: Round, evaluated_round: int, keep_going: bool = False) -> dict[str, float]:
    """The trainer's held-out figures of ``evaluated_round``, timed (``eval-seconds``: a round's
    compute is train + evaluate) and recorded on this hospital's metrics port. ``keep_going``:
    a failed evaluation is logged and counts 0 examples (a train message still trains)."""
    t0 = time.perf_counter()
    try:
        metrics = (r.trainer.evaluate(r.data.holdout, seed=evaluated_round,
                                      classifier_steps=r.train.eval_classifier_steps)
                   if r.data is not None else {"eval-examples": 0})
    except Exception:  # noqa: BLE001 - a failed evaluation must not cost the round's training
        if not keep_going:
            raise
        log.exception("evaluation of round %d failed at this hospital; training goes on",
                      evaluated_round)
        metrics = {"eval-examples": 0}
    metrics["eval-seconds"] = time.perf_counter() - t0
    hospital_metrics.record_evaluate(r.hospital.name, evaluated_round, metrics)
    return metrics


def evaluate(r: Round) -> Round:
    """The folded evaluation (the received model is the previous round's aggregate), when
    admitted; what of it the reply may carry (``client.evaluation.release``)."""
    if r.evaluated_round is not None:
        r.evaluation = evaluations.release(r.hospital, r.context, r.evaluated_round,
                                           measure(r, r.evaluated_round, keep_going=True))
    return r


# -- train -----------------------------------------------------------------------------------

def train(r: Round) -> Round:
    """The round's steps (``max-round-seconds`` and ``max-memory-mb`` checked between them), or
    zero examples where this hospital holds nothing to train: counts for nothing."""
    if not r.usable:
        r.result = r.trainer.idle(r.train, r.reply)
    else:
        r.result = r.trainer.fit(r.data.train, r.train, r.seed, reply=r.reply,
                                 deadline=r.deadline, server_round=r.server_round,
                                 perceptual_net=r.perceptual)
    return r


# -- account ---------------------------------------------------------------------------------

def account(r: Round) -> Round:
    """Charge the ledger once with the releases the trainer made (epsilon spent so far travels
    as ``dp-epsilon``); the memorisation audit, whose figures leave only a run without DP at a
    hospital that does not require it (a statistic of the slices: kept home at DP)."""
    if r.dp_plan is not None:
        r.result.metrics[privacy.DP_EPSILON] = privacy.charge(
            r.hospital, r.context, r.dp_plan, r.result.dp_releases, r.result.dp_sample_rate)
    r.audited = (privacy.audit_round(r.hospital, r.trainer, r.data if r.usable else None,
                                     r.server_round, r.train.dp)
                 if r.hospital.audit_every else {})
    if not (r.train.dp or r.hospital.needs_dp):
        r.result.metrics.update(r.audited)
    return r


# -- reply -----------------------------------------------------------------------------------

def reply(r: Round) -> Message:
    """This hospital's weights kept for its next round, its metrics recorded, and the train
    reply: the shared components' arrays and the protocol's scalars, nothing else."""
    save_local(r.trainer, r.context)
    hospital_metrics.record_train(r.hospital.name, r.server_round,
                                  {**r.result.metrics, **r.audited},
                                  r.data.report if r.data is not None else None,
                                  r.trainer.device)
    arrays = r.result.arrays
    if r.train.wire_dtype == "int8":  # the update, 8-bit, with error feedback (client/wire.py)
        from .wire import int8_reply

        arrays = int8_reply(arrays, r.msg, r.context)
    return Message(protocol.train_reply(arrays, {**r.result.metrics, **r.evaluation,
                                                 **class_counts(r)}),
                   reply_to=r.msg)


def class_counts(r: Round) -> dict[str, int]:
    """The training slices per class, when the train message asks (class-weighted-aggregation)
    and the hospital trained. They come from DICOM labels, not pixels, but they are a statistic
    of the real data that the run's epsilon does not bound: a hospital that requires DP keeps
    them home, as it keeps its evaluation figures (the coordinator weighs it as an even mix of
    its examples). One that does not require DP sends them in a DP-SGD run too."""
    asked = int(r.config.get(protocol.CLASS_EXAMPLES, 0)) if r.training else 0
    if not asked or not r.usable:
        return {}
    if r.hospital.needs_dp:
        log.info("round %d: per-class slice counts kept at this hospital (DP)", r.server_round)
        return {}
    counts = r.trainer.family.class_examples(r.data.train, r.model.num_classes)
    if counts is None or asked != len(counts):
        log.warning("round %d: the coordinator asked for %d class counts, this family has %s; "
                    "none sent", r.server_round, asked, "none" if counts is None else len(counts))
        return {}
    return {protocol.class_examples_key(k): n for k, n in enumerate(counts)}


def train_round(msg: Message, context: Context) -> Message:
    """A train message, stage by stage."""
    r = plan(admit(msg, context))
    return reply(account(train(evaluate(r))))


def evaluate_round(msg: Message, context: Context) -> Message:
    """An evaluate message: admit, plan (ceilings, one evaluation per round), evaluate; at a
    hospital that requires DP the figures stay here (client/evaluation.py)."""
    r = plan(admit(msg, context))
    released = evaluations.release(r.hospital, r.context, r.server_round,
                                   measure(r, r.server_round))
    return Message(protocol.evaluate_reply(released), reply_to=msg)


# -- this hospital's own weights -------------------------------------------------------------

def restore_local(trainer: LocalTrainer, context: Context, received: dict, seed: int) -> None:
    """This hospital's own weights, overlaid with what the coordinator sent.

    Components a preset keeps local (private discriminators, FedBN norm layers) never come from
    the coordinator; they live in ``context.state``, which Flower keeps per hospital across
    rounds (a trainer may be shared by several simulated hospitals in one process).
    """
    if LOCAL_STATE in context.state.array_records:
        saved = protocol.from_record(context.state.array_records[LOCAL_STATE])
        decode_into(trainer.nets, {k: v for k, v in saved.items() if k not in received})
    else:
        trainer.reset(seed)
    trainer.load(received)


def save_local(trainer: LocalTrainer, context: Context) -> None:
    context.state[LOCAL_STATE] = protocol.to_record(encode(trainer.nets))
