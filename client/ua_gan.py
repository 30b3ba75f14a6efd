"""Hospital side of the strategies: what to send back, and the UA-GAN discriminator round.

``reply_plan`` reads the round's ConfigRecord (``reply-components``, ``local-norm-components``,
written by ``server.strategy.GanStrategy``) and returns the arguments of ``shared_models.encode``,
so a hospital never sends a component the coordinator keeps local, nor its FedBN norm layers.

``ua_train`` answers a ``train.ua_gan`` message (see ``server/ua_gan.py``): train the local
discriminator on local real slices vs the received generated images, then reply with its logits on
those images and their input gradients. Nothing else leaves: no weight, no real pixel.
Register it in ``client/app.py`` with ``app.train(UA_ACTION)(_private_errors(ua_train))``.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Mapping

import numpy as np
import torch
from flwr.app import Context, Message
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits as bce

from fedsynth import protocol
from fedsynth.protocol import LOCAL_NORM_COMPONENTS, REPLY_COMPONENTS
from shared_models.codec import norm_state_keys
from server.ua_gan import FAKES, GRADS, LABELS, LOGITS, UA_ACTION

log = logging.getLogger(__name__)

__all__ = ["UA_ACTION", "reply_plan", "ua_discriminator_round", "ua_train"]

Include = Callable[[str, str], bool]


def _names(config: Mapping[str, object], key: str) -> tuple[str, ...]:
    return tuple(c for c in str(config.get(key, "")).split(",") if c)


def reply_plan(config: Mapping[str, object], nets: Mapping[str, nn.Module],
               default: tuple[str, ...]) -> tuple[tuple[str, ...], Include | None]:
    """(components, include) for ``encode`` from the round's config.

    Without a ``reply-components`` entry (an older coordinator) every component in ``default`` is
    sent, as before.
    """
    if REPLY_COMPONENTS not in config:
        return default, None
    components = _names(config, REPLY_COMPONENTS)
    local_norm = set(_names(config, LOCAL_NORM_COMPONENTS))
    if not local_norm:
        return components, None
    norm_keys = norm_state_keys({c: nets[c] for c in local_norm if c in nets})
    return components, lambda c, name: f"{c}.{name}" not in norm_keys


def ua_discriminator_round(
    d: nn.Module,
    opt: torch.optim.Optimizer,
    real: torch.Tensor,
    fakes: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    real_labels: torch.Tensor | None = None,
    fake_labels: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Train ``d`` for ``steps`` on real vs fakes; return (logits, d logit / d fake, metrics).

    The final pass runs in eval mode, so each image's logit depends on that image only and its
    input gradient is exactly what the coordinator's chain rule needs.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    device = next(d.parameters()).device
    real, fakes = real.to(device), fakes.to(device)
    real_labels = real_labels.to(device) if real_labels is not None else None
    fake_labels = fake_labels.to(device) if fake_labels is not None else None
    d.train()
    loss_sum, d_real_sum, d_fake_sum = 0.0, 0.0, 0.0
    for _ in range(steps):
        ri = torch.randint(len(real), (min(batch_size, len(real)),), generator=gen)
        fi = torch.randint(len(fakes), (min(batch_size, len(fakes)),), generator=gen)
        rl = real_labels[ri] if real_labels is not None else None
        fl = fake_labels[fi] if fake_labels is not None else None
        out_real = d(real[ri], rl)
        out_fake = d(fakes[fi], fl)
        loss = bce(out_real, torch.ones_like(out_real)) + bce(out_fake, torch.zeros_like(out_fake))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += float(loss.detach())
        d_real_sum += float(torch.sigmoid(out_real).mean())
        d_fake_sum += float(torch.sigmoid(out_fake).mean())
    d.eval()
    try:
        x = fakes.detach().clone().requires_grad_(True)
        logits = d(x, fake_labels)
        (grads,) = torch.autograd.grad(logits.sum(), x)
    finally:
        d.train()
    n = max(steps, 1)
    metrics = {"loss-d": loss_sum / n, "d-real": d_real_sum / n, "d-fake": d_fake_sum / n}
    return (logits.detach().float().cpu().numpy(), grads.float().cpu().numpy(), metrics)


_UA_OPTS: dict[int, torch.optim.Optimizer] = {}  # per warm trainer: D's Adam state across rounds


def ua_train(msg: Message, context: Context) -> Message:
    """Flower handler of ``train.ua_gan``: one UA-GAN discriminator round at this hospital."""
    from .app import (check_signature, restore_local, save_local,  # late: client.app registers
                      trainer_for)  # this handler
    from .datasets import local_data
    from .settings import HospitalSettings

    hospital = HospitalSettings.from_node_config(context.node_config)
    if hospital.threads:
        torch.set_num_threads(hospital.threads)
    check_signature(hospital, msg)
    model, train, server_round = protocol.parse_train_config(msg.content[protocol.CONFIG])
    trainer = trainer_for(hospital, model)
    restore_local(trainer, context, {}, train.seed)  # the private D of this hospital
    data = local_data(hospital, model)
    received = protocol.from_record(msg.content[protocol.ARRAYS])
    fakes = torch.from_numpy(np.asarray(received[FAKES], dtype=np.float32))
    fake_labels = torch.from_numpy(received[LABELS]).long() if LABELS in received else None
    d = trainer.nets["discriminator"]
    opt = _UA_OPTS.setdefault(id(trainer), torch.optim.Adam(
        d.parameters(), train.lr_d, (train.beta1, train.beta2)))
    t0 = time.perf_counter()
    real = data.train["image"].float()
    logits, grads, metrics = ua_discriminator_round(
        d, opt, real, fakes, steps=train.local_steps, batch_size=train.batch_size,
        real_labels=data.train.get("label"), fake_labels=fake_labels,
        seed=train.seed * 1_000_003 + server_round)
    metrics.update({"train-seconds": time.perf_counter() - t0, "steps": train.local_steps,
                    protocol.NUM_EXAMPLES: len(real),
                    protocol.examples_key("discriminator"): len(real)})
    save_local(trainer, context)
    log.info("UA-GAN round %d: D trained %d steps", server_round, train.local_steps)
    return Message(protocol.train_reply({LOGITS: logits, GRADS: grads}, metrics), reply_to=msg)
