"""What a hospital process keeps per Flower run: warm trainers and UA-GAN optimisers.

Shared by the ClientApp's handlers (``client.app``) and the UA-GAN handler (``client.ua_gan``),
which is why it is neither of them.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from .datasets import clear_local_data
from .settings import HospitalSettings
from .trainer import LocalTrainer, pick_device

log = logging.getLogger(__name__)


class RunState:
    """What this process keeps for one Flower run: warm trainers and UA-GAN optimisers.

    State belongs to a run and goes when the next run starts (``run_state``): a long-lived
    executor serving run after run, each with other settings, must not grow without bound, and
    nothing of one run (an optimiser's learning rate or step count) may leak into the next.
    """

    MAX_TRAINERS = 2  # per run: the coordinator's config rarely changes within a run

    def __init__(self, run_id: int) -> None:
        self.run_id = run_id
        self.trainers: "OrderedDict[tuple, LocalTrainer]" = OrderedDict()
        self.ua: dict[object, object] = {}  # client.ua_gan: per hospital, its private D + Adam


_RUNS: "OrderedDict[int, RunState]" = OrderedDict()
MAX_RUNS = 1  # one run at a time at a hospital; simulation runs one per process too


def run_state(run_id: int) -> RunState:
    """This run's state; starting a new run drops every other run's trainers and data."""
    state = _RUNS.get(run_id)
    if state is None:
        while len(_RUNS) >= MAX_RUNS:
            old_id, _old = _RUNS.popitem(last=False)
            log.info("run %s state released (a new run started)", old_id)
        clear_local_data()
        state = _RUNS[run_id] = RunState(run_id)
    _RUNS.move_to_end(run_id)
    return state


def trainer_for(hospital: HospitalSettings, model, run_id: int = 0) -> LocalTrainer:  # noqa: ANN001
    device = pick_device(hospital.device)
    key = (model, str(device), hospital.amp)
    trainers = run_state(run_id).trainers
    if key not in trainers:
        while len(trainers) >= RunState.MAX_TRAINERS:
            trainers.popitem(last=False)
        trainers[key] = LocalTrainer(model, device, hospital.amp)
    trainers.move_to_end(key)
    return trainers[key]


def forget_trainer(trainer: LocalTrainer, run_id: int) -> None:
    """Drop a trainer that failed to take a model (a wrong family or shape): no cache of junk."""
    trainers = run_state(run_id).trainers
    for key in [k for k, t in trainers.items() if t is trainer]:
        del trainers[key]
