"""The Flower ClientApp: a thin adapter from Flower messages to the local trainer.

What leaves the hospital is built only by ``fedsynth.protocol.train_reply`` / ``evaluate_reply``:
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
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedsynth import protocol
from fedsynth.signing import SIGNATURE_KEY, SignatureError, load_public_key, verify
from shared_models import encode
from shared_models.codec import decode_into

from . import metrics as hospital_metrics
from .datasets import LocalData, local_data
from .settings import HospitalSettings
from .trainer import LocalTrainer, pick_device
from .ua_gan import UA_ACTION, reply_plan, ua_train

log = logging.getLogger(__name__)


class HospitalError(RuntimeError):
    """Sent to the coordinator instead of the local exception (whose text stays at the site)."""


_TRAINERS: dict[tuple, LocalTrainer] = {}  # warm per process, keyed by what changes them


def trainer_for(hospital: HospitalSettings, model) -> LocalTrainer:  # noqa: ANN001
    device = pick_device(hospital.device)
    key = (model, str(device), hospital.amp)
    if key not in _TRAINERS:
        _TRAINERS[key] = LocalTrainer(model, device, hospital.amp)
    return _TRAINERS[key]


def _private_errors(handler: Callable[[Message, Context], Message]
                    ) -> Callable[[Message, Context], Message]:
    """Log the real error locally; send only its class of problem to the coordinator."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:  # noqa: BLE001 - every local failure must be sanitised
            log.exception("round failed at this hospital")
            hospital_metrics.record_failure(_name_of(context), handler.__name__)
            raise HospitalError(f"{handler.__name__} failed at the hospital "
                                f"({type(exc).__name__}); see the hospital's log") from None

    return wrapper


def check_signature(hospital: HospitalSettings, msg: Message) -> None:
    """Refuse a global model that the pinned coordinator key did not sign (when one is pinned)."""
    if hospital.model_public_key is None:
        return
    config = msg.content[protocol.CONFIG]
    signature = config[SIGNATURE_KEY] if SIGNATURE_KEY in config else None
    try:
        verify(msg.content[protocol.ARRAYS], signature, load_public_key(hospital.model_public_key))
    except SignatureError as exc:
        log.error("REFUSED global model: %s", exc)
        hospital_metrics.record_signature_failure(hospital.name)
        raise


def _name_of(context: Context) -> str:
    """The hospital's configured name for metric labels ("unknown" if its settings are broken)."""
    try:
        return HospitalSettings.from_node_config(context.node_config).name
    except Exception:  # noqa: BLE001 - the handler's own error is what gets reported
        return "unknown"


def _prepare(msg: Message, context: Context) -> tuple[HospitalSettings, LocalTrainer, LocalData,
                                                       object, int]:
    hospital = HospitalSettings.from_node_config(context.node_config)
    if hospital.threads:
        torch.set_num_threads(hospital.threads)
    hospital_metrics.note_identity(context.node_id, hospital.name)
    check_signature(hospital, msg)
    model, train, server_round = protocol.parse_train_config(msg.content[protocol.CONFIG])
    trainer = trainer_for(hospital, model)
    restore_local(trainer, context, protocol.from_record(msg.content[protocol.ARRAYS]), train.seed)
    data = local_data(hospital, model)
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


app = ClientApp()


@app.train()
@_private_errors
def train(msg: Message, context: Context) -> Message:
    hospital, trainer, data, train_cfg, server_round = _prepare(msg, context)
    seed = train_cfg.seed * 1_000_003 + server_round * 1009 + context.node_id % 1000
    hospital_metrics.reset_peak_memory(trainer.device)
    reply = reply_plan(msg.content[protocol.CONFIG], trainer.nets, trainer.family.components)
    result = trainer.fit(data.train, train_cfg, seed, reply=reply)
    save_local(trainer, context)
    hospital_metrics.record_train(hospital.name, server_round, result.metrics, data.report,
                                  trainer.device)
    return Message(protocol.train_reply(result.arrays, result.metrics), reply_to=msg)


@app.evaluate()
@_private_errors
def evaluate(msg: Message, context: Context) -> Message:
    hospital, trainer, data, _, server_round = _prepare(msg, context)
    t0 = time.perf_counter()
    metrics = trainer.evaluate(data.holdout, seed=server_round)
    metrics["eval-seconds"] = time.perf_counter() - t0  # a round's compute = train + evaluate
    hospital_metrics.record_evaluate(hospital.name, server_round, metrics)
    return Message(protocol.evaluate_reply(metrics), reply_to=msg)


# UA-GAN: the hospital trains its private discriminator and answers with its outputs on the
# coordinator's generated images (server/ua_gan.py).
app.train(UA_ACTION)(_private_errors(ua_train))
