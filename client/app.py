"""The Flower ClientApp: a thin adapter from Flower messages to the local trainer.

What leaves the hospital is built only by ``fedsynth.protocol.train_reply`` / ``evaluate_reply``:
the shared components' arrays and a fixed list of scalar metrics. Local errors are logged here in
full and reach the coordinator only as a generic reason, because an exception text can hold a file
path or a DICOM attribute.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedsynth import protocol

from .cache import load_slices
from .dicom import DicomSettings
from .settings import HospitalSettings
from .trainer import LocalTrainer, pick_device

log = logging.getLogger(__name__)


class HospitalError(RuntimeError):
    """Sent to the coordinator instead of the local exception (whose text stays at the site)."""


@dataclass
class LocalData:
    train: torch.Tensor
    holdout: torch.Tensor


# Warm state of this process: in simulation a Ray actor serves many rounds; in a long-lived hospital
# worker too. Keyed by everything that changes them.
_DATA: dict[tuple, LocalData] = {}
_TRAINERS: dict[tuple, LocalTrainer] = {}


def local_data(hospital: HospitalSettings, image_size: int) -> LocalData:
    key = (hospital, image_size)
    if key not in _DATA:
        settings = DicomSettings(image_size=image_size, modalities=hospital.modalities)
        slices = load_slices(hospital.data_dir, settings, hospital.cache_dir)
        log.info("%s: %s", hospital.name, slices.report.summary())
        images = torch.from_numpy(slices.images.copy())
        held = torch.zeros(len(images), dtype=torch.bool)
        if len(images) >= 2 * hospital.holdout_every:
            held[:: hospital.holdout_every] = True
        _DATA[key] = LocalData(train=images[~held], holdout=images[held] if held.any() else images)
    return _DATA[key]


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
            raise HospitalError(f"{handler.__name__} failed at the hospital "
                                f"({type(exc).__name__}); see the hospital's log") from None

    return wrapper


def _prepare(msg: Message, context: Context) -> tuple[HospitalSettings, LocalTrainer, LocalData,
                                                       object, int]:
    hospital = HospitalSettings.from_node_config(context.node_config)
    if hospital.threads:
        torch.set_num_threads(hospital.threads)
    model, train, server_round = protocol.parse_train_config(msg.content[protocol.CONFIG])
    trainer = trainer_for(hospital, model)
    trainer.load(protocol.from_record(msg.content[protocol.ARRAYS]))
    data = local_data(hospital, model.image_size)
    return hospital, trainer, data, train, server_round


app = ClientApp()


@app.train()
@_private_errors
def train(msg: Message, context: Context) -> Message:
    _, trainer, data, train_cfg, server_round = _prepare(msg, context)
    seed = train_cfg.seed * 1_000_003 + server_round * 1009 + context.node_id % 1000
    result = trainer.fit(data.train, train_cfg, seed)
    return Message(protocol.train_reply(result.arrays, result.metrics), reply_to=msg)


@app.evaluate()
@_private_errors
def evaluate(msg: Message, context: Context) -> Message:
    _, trainer, data, _, server_round = _prepare(msg, context)
    metrics = trainer.evaluate(data.holdout, seed=server_round)
    return Message(protocol.evaluate_reply(metrics), reply_to=msg)
