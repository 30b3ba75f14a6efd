"""Hospital side of the strategies: what to send back, and the UA-GAN discriminator round.

``reply_plan`` reads the round's ConfigRecord (``reply-components``, ``local-norm-components``,
written by ``server.strategy.GanStrategy``) and returns the arguments of ``shared_models.encode``,
so a hospital never sends a component the coordinator keeps local, nor its FedBN norm layers.

``ua_train`` answers a ``train.ua_gan`` message (see ``server/ua_gan.py``): train the local
discriminator on local real slices vs the received generated images, then reply with its logits on
those images and their input gradients. Nothing else leaves: no weight, no real pixel.

Why the UA discriminator is built the way it is (the trust review's finding 5): a coordinator that
knows a hospital's discriminator, and chooses its steps, batch and learning rate, can solve the
returned input gradients for the real slice that trained it (one step, batch 1, lr 1 gave a
correlation of 0.99999). So the UA discriminator is created at the hospital from a secret seed
(``secrets``) that never leaves, lives only in its own slot of ``context.state`` (never loaded
from any message: a TRAIN message that plants weights reaches the ordinary model, not this one),
draws its real batches with that secret too, and trains by the hospital's own floor
(``HospitalSettings.ua_*``: at least ``ua_min_batch`` real slices per step, a learning rate of
at most ``ua_max_lr``, ``ua_min_steps``..``ua_max_steps`` steps, at most ``ua_max_fakes`` images,
Adam with fixed betas). What this does not bound: the gradients still depend on the real slices;
differential privacy on this discriminator (the privacy issue) is what bounds that.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Callable, Mapping

import numpy as np
import torch
from flwr.app import Context, Message
from torch import nn

from protocol import records as protocol
from protocol.keys import UA_ACTION, UA_FAKES as FAKES, UA_GRADS as GRADS, UA_LABELS as LABELS
from protocol.keys import UA_LOGITS as LOGITS
from protocol.records import LOCAL_NORM_COMPONENTS, REPLY_COMPONENTS
from shared_models import StepContext, encode, get_family
from shared_models.capabilities import UA_GAN, supporting
from shared_models.codec import decode_into, norm_state_keys
from shared_models.family import adam

from .trainer import LocalTrainer, discriminator_round

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
    trainer: LocalTrainer | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Train ``d`` for ``steps`` on real vs fakes; return (logits, d logit / d fake, metrics).

    With a ``trainer`` (as ``ua_train`` runs it) this is ``trainer.ua_round``, the same machinery
    as every other hospital round: the trainer's device, mixed precision and upload-once cache of
    the real slices, ``StepContext`` steps, one host sync per round (``discriminator_round``).
    Without one: on ``d``'s device in fp32. Batches are drawn with a CPU generator
    seeded by ``seed`` (the hospital's secret). The final pass runs in eval mode, so each image's
    logit depends on that image only and its input gradient is exactly what the coordinator's
    chain rule needs.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if trainer is not None:
        return trainer.ua_round(d, opt, real, fakes, steps=steps, batch_size=batch_size,
                                generator=gen, real_labels=real_labels, fake_labels=fake_labels)
    device = next(d.parameters()).device
    return discriminator_round(
        d, opt, real.float().to(device), fakes.to(device), steps=steps, batch_size=batch_size,
        ctx=StepContext(device=device), generator=gen,
        real_labels=real_labels.to(device) if real_labels is not None else None,
        fake_labels=fake_labels.to(device) if fake_labels is not None else None)


UA_STATE = "fedsynth-ua-discriminator"  # context.state: this hospital's private UA D
UA_SECRET = "fedsynth-ua-secret"  # context.state: the secret seed of that D and of its batches
UA_BETAS = (0.5, 0.999)  # the hospital's, not the message's


class _UaState:
    """One hospital's UA discriminator and its optimiser for this run (``client.app.RunState``)."""

    def __init__(self, d: nn.Module, lr: float) -> None:
        self.d = d  # on its device already: the fused (CUDA) Adam is chosen from where it is
        self.opt = adam(d.parameters(), lr, UA_BETAS)


def _secret(context: Context) -> int:
    from flwr.app import ConfigRecord

    if UA_SECRET not in context.state.config_records:
        context.state[UA_SECRET] = ConfigRecord({"seed": secrets.randbits(62)})
    return int(context.state.config_records[UA_SECRET]["seed"])


def _ua_discriminator(context: Context, model, lr: float, trainer: LocalTrainer,  # noqa: ANN001
                      store: dict) -> _UaState:
    """This hospital's UA discriminator: from this run's memory, its saved state, or new."""
    state = store.get(context.node_id)
    if state is None:
        family = get_family(model.family)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_secret(context))
            d = family.build(model)["discriminator"]
        if UA_STATE in context.state.array_records:
            decode_into({"discriminator": d},
                        protocol.from_record(context.state.array_records[UA_STATE]))
        state = store[context.node_id] = _UaState(trainer.prepare(d), lr)
    for group in state.opt.param_groups:
        group["lr"] = lr
    return state


def _checked_fakes(received: Mapping[str, np.ndarray], model, max_fakes: int  # noqa: ANN001
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The coordinator's generated images, refused unless they are images of this model."""
    extra = sorted(set(received) - {FAKES, LABELS})
    if FAKES not in received or extra:
        raise ValueError(f"UA-GAN message must hold {FAKES!r} (and {LABELS!r}) only")
    fakes = np.asarray(received[FAKES])
    spatial = (model.image_size,) * model.spatial_dims
    if (fakes.ndim != 2 + model.spatial_dims or fakes.shape[2:] != spatial
            or fakes.shape[1] != model.channels or not 1 <= len(fakes) <= max_fakes):
        raise ValueError(f"UA-GAN fakes of shape {fakes.shape} are not 1..{max_fakes} images of "
                         f"{model.channels}x{spatial}")
    if not np.issubdtype(fakes.dtype, np.floating) or not np.isfinite(fakes).all():
        raise ValueError("UA-GAN fakes must be finite floating-point images")
    labels = None
    if LABELS in received:
        lab = np.asarray(received[LABELS])
        if (lab.shape != (len(fakes),) or not np.issubdtype(lab.dtype, np.integer)
                or (len(lab) and (lab.min() < 0 or lab.max() >= max(model.num_classes, 1)))):
            raise ValueError("UA-GAN labels must be one class index per fake")
        labels = torch.from_numpy(lab.astype(np.int64))
    return torch.from_numpy(np.clip(fakes.astype(np.float32), -1.0, 1.0)), labels


def ua_train(msg: Message, context: Context) -> Message:
    """Flower handler of ``train.ua_gan``: one UA-GAN discriminator round at this hospital."""
    from .admission import PolicyRefused, check_signature, refuse
    from .run_state import run_state, trainer_for
    from .datasets import local_data  # registers this handler
    from .settings import HospitalSettings

    hospital = HospitalSettings.from_node_config(context.node_config)
    if hospital.threads:
        torch.set_num_threads(hospital.threads)
    check_signature(hospital, msg, context)
    from .privacy import refuse_ua_gan

    refuse_ua_gan(hospital)
    if "ua-gan" in hospital.never_send:
        refuse(hospital, "never-send", PolicyRefused(
            "this hospital's never-send setting refuses UA-GAN rounds"))
    model, train, server_round = protocol.parse_train_config(msg.content[protocol.CONFIG])
    if UA_GAN not in get_family(model.family).supports:  # its D gives a probability's logit
        raise ValueError(f"UA-GAN needs a family in {supporting(UA_GAN)}, got {model.family!r}")
    from .ceilings import check_message

    check_message(hospital, model, train, server_round, training=True)
    try:
        fakes, fake_labels = _checked_fakes(protocol.from_record(msg.content[protocol.ARRAYS]),
                                            model, hospital.ua_max_fakes)
    except ValueError as exc:
        refuse(hospital, "ua-policy", PolicyRefused(str(exc)))
    # this run's warm trainer of the model (first: a new run drops the previous run's data): its
    # device, precision and device copies of the real slices; its nets are not the UA D
    trainer = trainer_for(hospital, model, context.run_id)
    data = local_data(hospital, model)
    real = data.train["image"]  # the cached tensor itself: uploaded to the device once per run
    if len(real) < hospital.ua_min_batch:
        refuse(hospital, "ua-policy", PolicyRefused(
            f"{len(real)} training slices are fewer than ua-min-batch = {hospital.ua_min_batch}: "
            "a UA-GAN reply would reveal too much about each"))
    steps = min(max(train.local_steps, hospital.ua_min_steps), hospital.ua_max_steps)
    batch = max(train.batch_size, hospital.ua_min_batch)
    lr = min(train.lr_d, hospital.ua_max_lr)
    if (steps, batch, lr) != (train.local_steps, train.batch_size, train.lr_d):
        log.warning("UA-GAN round %d within this hospital's floor: %d steps (asked %d), batch "
                    "%d (asked %d), lr %.3g (asked %.3g)", server_round, steps,
                    train.local_steps, batch, train.batch_size, lr, train.lr_d)
    ua = _ua_discriminator(context, model, lr, trainer, run_state(context.run_id).ua)
    t0 = time.perf_counter()
    logits, grads, metrics = ua_discriminator_round(
        ua.d, ua.opt, real, fakes, steps=steps, batch_size=batch,
        real_labels=data.train.get("label"), fake_labels=fake_labels,
        seed=(_secret(context) + server_round) % 2**62, trainer=trainer)
    metrics.update({"train-seconds": time.perf_counter() - t0, "steps": steps,
                    protocol.NUM_EXAMPLES: len(real),
                    protocol.examples_key("discriminator"): len(real)})
    context.state[UA_STATE] = protocol.to_record(encode({"discriminator": ua.d}))
    log.info("UA-GAN round %d: D trained %d steps", server_round, steps)
    return Message(protocol.train_reply({LOGITS: logits, GRADS: grads}, metrics), reply_to=msg)
