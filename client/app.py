"""The Flower ClientApp: a thin adapter from Flower messages to the local trainer.

What leaves the hospital is built only by ``protocol.train_reply`` / ``evaluate_reply``:
the shared components' arrays and a fixed list of scalar metrics. Local errors are logged here in
full and reach the coordinator only as a generic reason, because an exception text can hold a file
path or a DICOM attribute.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable

import torch
from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp

from protocol import records as protocol
from shared_models import encode, get_family
from shared_models.codec import decode_into

from . import ceilings
from . import evaluation as evaluations
from . import metrics as hospital_metrics
from . import privacy
from .datasets import DataSelectionError, LocalData, local_data
from .settings import HospitalSettings
from .privacy import PrivacyRefused
from .trainer import LocalTrainer
from .admission import check_never_send, check_signature
from .run_state import forget_trainer, trainer_for
from .secure_aggregation import secure_aggregation_mod
from .ua_gan import UA_ACTION, reply_plan, ua_train

log = logging.getLogger(__name__)


class HospitalError(RuntimeError):
    """Sent to the coordinator instead of the local exception (whose text stays at the site)."""

    already_logged = False  # a refusal by the hospital's settings: logged in one line already


class HospitalRefusal(HospitalError):
    already_logged = True


def _private_errors(handler: Callable[[Message, Context], Message]
                    ) -> Callable[[Message, Context], Message]:
    """Log the real error locally; send only its class of problem to the coordinator."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except PrivacyRefused as exc:  # logged in one line where it was refused
            hospital_metrics.record_failure(_name_of(context), handler.__name__)
            raise HospitalRefusal(f"{handler.__name__} refused by the hospital's privacy "
                                  f"settings ({type(exc).__name__})") from None
        except ceilings.CeilingRefused as exc:  # logged in one line where it was refused
            hospital_metrics.record_failure(_name_of(context), handler.__name__)
            raise HospitalRefusal(f"{handler.__name__} refused: past the hospital's ceilings "
                                  f"({type(exc).__name__})") from None
        except Exception as exc:  # noqa: BLE001 - every local failure must be sanitised
            log.exception("round failed at this hospital")
            hospital_metrics.record_failure(_name_of(context), handler.__name__)
            raise HospitalError(f"{handler.__name__} failed at the hospital "
                                f"({type(exc).__name__}); see the hospital's log") from None

    return wrapper


def _name_of(context: Context) -> str:
    """The hospital's configured name for metric labels ("unknown" if its settings are broken)."""
    try:
        return HospitalSettings.from_node_config(context.node_config).name
    except Exception:  # noqa: BLE001 - the handler's own error is what gets reported
        return "unknown"


def _prepare(msg: Message, context: Context) -> tuple[HospitalSettings, LocalTrainer,
                                                       LocalData | None, object, int]:
    """Settings, trainer (with this hospital's weights + the received ones), data, config, round.

    ``data`` is None when this hospital holds nothing the run's family can use (no slice of
    either domain, no pair, no slice of any class): it then trains nothing and says so with
    zero example counts, rather than failing the round.
    """
    hospital = HospitalSettings.from_node_config(context.node_config)
    if hospital.threads:
        torch.set_num_threads(hospital.threads)
    hospital_metrics.note_identity(context.node_id, hospital.name)
    check_signature(hospital, msg, context)
    model, train, server_round = protocol.parse_train_config(msg.content[protocol.CONFIG])
    get_family(model.family)  # an unknown family is refused before anything is built
    # the work asked (parameters; batch and steps of a train message) within this hospital's
    # ceilings, counted on the meta device before any net is built or slice loaded
    ceilings.check_message(hospital, model, train, server_round,
                           training=str(msg.metadata.message_type) == MessageType.TRAIN)
    if str(msg.metadata.message_type) == MessageType.EVALUATE:
        # one evaluation per round, a cap per run: refused before any model or slice is loaded
        evaluations.admit(hospital, context, server_round)
    data_cfg = protocol.parse_data_config(msg.content[protocol.CONFIG])
    received = protocol.from_record(msg.content[protocol.ARRAYS])
    trainer = trainer_for(hospital, model, context.run_id)
    try:
        restore_local(trainer, context, received, train.seed)
    except Exception:
        forget_trainer(trainer, context.run_id)
        raise
    try:
        data: LocalData | None = local_data(hospital, model, data_cfg,
                                            lesion_masks=train.lesion_cycle_weight > 0)
    except DataSelectionError as exc:
        log.warning("this hospital holds nothing %s can train this round: %s", model.family, exc)
        data = None
    return hospital, trainer, data, train, server_round


LOCAL_STATE = "fedsynth-local-weights"  # in context.state: this hospital's whole model


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


# Flower's SecAgg+ masks the train reply of a secure-aggregation round (and only then)
app = ClientApp(mods=[secure_aggregation_mod])


@app.train()
@_private_errors
def train(msg: Message, context: Context) -> Message:
    hospital = HospitalSettings.from_node_config(context.node_config)
    deadline = ceilings.Deadline(hospital, int(msg.content[protocol.CONFIG].get(
        protocol.SERVER_ROUND, 0)))  # max-round-seconds from the message's arrival
    hospital, trainer, data, train_cfg, server_round = _prepare(msg, context)
    seed = train_cfg.seed * 1_000_003 + server_round * 1009 + context.node_id % 1000
    hospital_metrics.reset_peak_memory(trainer.device)
    reply = reply_plan(msg.content[protocol.CONFIG], trainer.nets, trainer.family.components)
    check_never_send(hospital, reply[0])
    usable = data is not None and bool(data.num_train)
    dp_plan = privacy.plan_round(hospital, context, trainer.family, train_cfg,
                                 data.train if usable else None, server_round)
    evaluation: dict[str, float] = {}
    evaluated_round: int | None = None
    if protocol.EVALUATE_ROUND in msg.content[protocol.CONFIG]:
        # the model just received is the previous round's aggregate: evaluate it before training
        # (one round trip per round; server/strategy.py, "folded" evaluation)
        evaluated_round = int(msg.content[protocol.CONFIG][protocol.EVALUATE_ROUND])
        try:
            evaluations.admit(hospital, context, evaluated_round)
        except evaluations.EvaluationRefused:  # logged and counted; the round still trains
            evaluated_round = None
    if evaluated_round is not None:
        t0 = time.perf_counter()
        try:
            evaluation = (trainer.evaluate(data.holdout, seed=evaluated_round,
                                           classifier_steps=train_cfg.eval_classifier_steps)
                          if data is not None else {"eval-examples": 0})
        except Exception:  # noqa: BLE001 - a failed evaluation must not cost the round's training
            log.exception("evaluation of round %d failed at this hospital; training goes on",
                          evaluated_round)
            evaluation = {"eval-examples": 0}
        evaluation["eval-seconds"] = time.perf_counter() - t0
        hospital_metrics.record_evaluate(hospital.name, evaluated_round, evaluation)
        evaluation = evaluations.release(hospital, context, evaluated_round, evaluation)
    if not usable:
        result = trainer.idle(train_cfg, reply)  # zero examples: counts for nothing
    else:
        result = trainer.fit(data.train, train_cfg, seed, reply=reply, deadline=deadline)
    if dp_plan is not None:  # charge the releases made; epsilon spent so far travels
        result.metrics[privacy.DP_EPSILON] = privacy.charge(
            hospital, context, dp_plan, result.dp_releases, result.dp_sample_rate)
    audited = privacy.audit_round(hospital, trainer, data if usable else None, server_round,
                                  train_cfg.dp) if hospital.audit_every else {}
    if not (train_cfg.dp or hospital.needs_dp):  # a statistic of the slices: kept home at DP
        result.metrics.update(audited)
    save_local(trainer, context)
    hospital_metrics.record_train(hospital.name, server_round, {**result.metrics, **audited},
                                  data.report if data is not None else None, trainer.device)
    arrays = result.arrays
    if train_cfg.wire_dtype == "int8":  # the update, 8-bit, with error feedback (client/wire.py)
        from .wire import int8_reply

        arrays = int8_reply(arrays, msg, context)
    return Message(protocol.train_reply(arrays, {**result.metrics, **evaluation}),
                   reply_to=msg)


@app.evaluate()
@_private_errors
def evaluate(msg: Message, context: Context) -> Message:
    hospital, trainer, data, train, server_round = _prepare(msg, context)
    t0 = time.perf_counter()
    metrics = (trainer.evaluate(data.holdout, seed=server_round,
                                classifier_steps=train.eval_classifier_steps)
               if data is not None else {"eval-examples": 0})
    metrics["eval-seconds"] = time.perf_counter() - t0  # a round's compute = train + evaluate
    hospital_metrics.record_evaluate(hospital.name, server_round, metrics)
    # at a hospital that requires DP the figures stay here (client/evaluation.py)
    reply = evaluations.release(hospital, context, server_round, metrics)
    return Message(protocol.evaluate_reply(reply), reply_to=msg)


# UA-GAN: the hospital trains its private discriminator and answers with its outputs on the
# coordinator's generated images (server/ua_gan.py).
app.train(UA_ACTION)(_private_errors(ua_train))
