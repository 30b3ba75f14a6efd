"""The most work one message may ask of this hospital (issue 25 item 5).

A signed message says the model's shape and the round's batch and steps; nothing else bounded
them, so ``width = 1024`` in 144 bytes of arrays took 8.6 GB, a DP batch of 100,000 took 8.3 GB
and ``local-steps = 1e9`` trained as long as asked. The hospital's own ceilings
(``HospitalSettings``: ``max-parameters``, ``max-batch``, ``max-steps``, ``max-round-seconds``)
are checked before anything is built or loaded: the parameter count on PyTorch's ``meta`` device
(shapes only, no memory), batch and steps from the signed config. A message past one is refused
in one log line, ``REFUSED message (ceiling-…)``, counted, and the coordinator sees the round
failed at this hospital; the run goes on without it. The seconds ceiling is checked between
training steps: a round past it stops, sends nothing, and its updates are dropped (the next
round starts from the hospital's saved weights).

Memory (``max-memory-mb``) is checked twice: before anything is built, a lower bound of what the
work needs from its shape alone (``memory_floor_mb``: parameters, batch, width, image size);
and before every training step, the process's resident memory (plus CUDA's tensors), so a
round that grows past it stops like one past its seconds. A single step's own allocation is not
interrupted: the sample is taken between steps.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

from .settings import HospitalSettings

log = logging.getLogger(__name__)


class CeilingRefused(RuntimeError):
    """A message asks more work than this hospital's ceilings allow."""


REASONS = ("ceiling-parameters", "ceiling-batch", "ceiling-steps", "ceiling-seconds",
           "ceiling-memory")
MB = 1024 * 1024


def refuse(hospital: HospitalSettings, reason: str, why: str) -> None:
    from . import metrics as hospital_metrics

    log.error("REFUSED message (%s): %s", reason, why)
    hospital_metrics.record_refusal(hospital.name, reason)
    raise CeilingRefused(why)


@functools.lru_cache(maxsize=16)
def parameter_count(model: Any) -> int:
    """Parameters and buffers of ``model``'s nets, built on the meta device (no memory)."""
    import torch

    from shared_models import get_family

    with torch.device("meta"):
        nets = get_family(model.family).build(model)
    return sum(t.numel() for net in nets.values()
               for t in (*net.parameters(), *net.buffers()))


def check_message(hospital: HospitalSettings, model: Any, train: Any, server_round: int,
                  training: bool) -> None:
    """Refuse a message past this hospital's ceilings; ``training``: batch and steps count."""
    if training and train.batch_size > hospital.max_batch:
        refuse(hospital, "ceiling-batch",
               f"round {server_round} asks batch {train.batch_size}, past this hospital's "
               f"max-batch = {hospital.max_batch}")
    if training and train.local_steps > hospital.max_steps:
        refuse(hospital, "ceiling-steps",
               f"round {server_round} asks {train.local_steps} local steps, past this "
               f"hospital's max-steps = {hospital.max_steps}")
    n = parameter_count(model)
    if n > hospital.max_parameters:
        refuse(hospital, "ceiling-parameters",
               f"round {server_round}: the {model.family} model asked for (width "
               f"{model.width}, image size {model.image_size}) has {n:,} parameters, past this "
               f"hospital's max-parameters = {hospital.max_parameters:,}")
    need = memory_floor_mb(model, train, n, training)
    if need > hospital.max_memory_mb:
        refuse(hospital, "ceiling-memory",
               f"round {server_round}: the {model.family} model (width {model.width}, image "
               f"size {model.image_size}, {n:,} parameters) at batch {train.batch_size} needs "
               f"at least {need:,.0f} MB, past this hospital's max-memory-mb = "
               f"{hospital.max_memory_mb:g}")


def memory_floor_mb(model: Any, train: Any, parameters: int, training: bool) -> float:
    """A lower bound of the memory a message's work needs, from its shape alone.

    Training: 16 bytes a parameter (weights, gradients, Adam's two moments) and, per image of
    the batch, one fp32 activation map of ``width`` channels at half the image's size in each
    of two networks (a generator's and a critic's widest layer, kept for the backward pass).
    Evaluation: the weights. Every family holds more than this, never less.
    """
    floor = parameters * (16 if training else 4)
    if training:
        floor += (train.batch_size * 2 * model.width
                  * (model.image_size // 2) ** model.spatial_dims * 4)
    return floor / MB


def resident_mb() -> float:
    """This process's resident memory now (Linux ``/proc/self/statm``), plus CUDA's tensors."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            pages = int(fh.read().split()[1])
        rss = pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: the largest it has been
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rss += torch.cuda.memory_allocated()
    except Exception:  # noqa: BLE001 - a device query never fails a round
        pass
    return rss / MB


class Deadline:
    """``max-round-seconds`` from the message's arrival; ``check`` between training steps."""

    def __init__(self, hospital: HospitalSettings, server_round: int) -> None:
        self.hospital = hospital
        self.server_round = server_round
        self.at = time.perf_counter() + hospital.max_round_seconds

    def check(self, step: int) -> None:
        rss = resident_mb()
        if rss > self.hospital.max_memory_mb:
            refuse(self.hospital, "ceiling-memory",
                   f"round {self.server_round}: this process holds {rss:,.0f} MB after {step} "
                   f"steps, past this hospital's max-memory-mb = "
                   f"{self.hospital.max_memory_mb:g}; stopped, nothing of it is sent")
        if time.perf_counter() > self.at:
            refuse(self.hospital, "ceiling-seconds",
                   f"round {self.server_round} passed this hospital's max-round-seconds = "
                   f"{self.hospital.max_round_seconds:g} after {step} steps; stopped, nothing "
                   "of it is sent")
