"""Local trainer vs a bare PyTorch loop: images/s of the same nets, data, batches and steps.

The bare loop below is written inline on purpose, with no trainer, family or StepContext: it is the
floor a competent PyTorch user would write for DCGAN (same non-saturating loss on logits, same Adam
settings, same batch draws). Both sides start every repetition from the same initial weights and the
same seed, so they do identical arithmetic; ``max-weight-diff`` checks that they really did.

Repetitions are interleaved (trainer, bare, bare, trainer, ...); the figure is the median over
pairs of the pair's time ratio, because this machine is shared and its load drifts between pairs. Run ``python -m bench.trainer`` for this part alone.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits as bce

from client.trainer import LocalTrainer
from shared_models import ModelConfig, TrainConfig, encode, families, get_family

log = logging.getLogger(__name__)


@dataclass
class Comparison:
    """Interleaved timings of two ways to do the same work; ``ratio`` = a's rate / b's rate."""

    name: str
    images_per_rep: int
    a_seconds: list[float] = field(default_factory=list)
    b_seconds: list[float] = field(default_factory=list)
    extra: dict[str, float | str] = field(default_factory=dict)

    @property
    def a_rate(self) -> float:
        return self.images_per_rep / statistics.median(self.a_seconds)

    @property
    def b_rate(self) -> float:
        return self.images_per_rep / statistics.median(self.b_seconds)

    a_cpu: list[float] = field(default_factory=list)
    b_cpu: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Median over pairs of b_seconds / a_seconds: the two runs of a pair are adjacent in time,
        so they share the machine's load, which drifts a lot between pairs on a shared host."""
        return statistics.median(b / a for a, b in zip(self.a_seconds, self.b_seconds))

    @property
    def ratio_of_medians(self) -> float:
        return self.a_rate / self.b_rate

    @property
    def cpu_ratio(self) -> float:
        """Same work in CPU seconds of this process (less sensitive to other processes)."""
        if not self.a_cpu:
            return float("nan")
        return statistics.median(self.b_cpu) / statistics.median(self.a_cpu)


def interleave(a: Callable[[], float], b: Callable[[], float], reps: int, warmup: int = 1
               ) -> tuple[list[float], list[float]]:
    """Run ``a`` and ``b`` alternately (A B B A A B ...); each returns its own seconds.

    The order flips every pair so neither side always runs right after the other (caches, turbo).
    Warm-up pairs (first Adam import, allocator growth, cuDNN autotuning) are not counted.
    """
    for _ in range(warmup):
        a()
        b()
    sa: list[float] = []
    sb: list[float] = []
    for i in range(reps):
        if i % 2 == 0:
            sa.append(a())
            sb.append(b())
        else:
            sb.append(b())
            sa.append(a())
    return sa, sb


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def bare_dcgan(g: nn.Module, d: nn.Module, images: torch.Tensor, train: TrainConfig, seed: int,
               amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """The floor: a plain DCGAN loop on ``images`` (already on the device), one sync at the end."""
    device = images.device
    betas = (train.beta1, train.beta2)
    opt_g = torch.optim.Adam(g.parameters(), train.lr_g, betas)
    opt_d = torch.optim.Adam(d.parameters(), train.lr_d, betas)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    g.train()
    d.train()
    torch.manual_seed(seed)
    n = len(images)
    batch = min(train.batch_size, n)
    sum_g = torch.zeros((), device=device)
    sum_d = torch.zeros((), device=device)
    for _ in range(train.local_steps):
        real = images[torch.randint(n, (batch,), device=device)]
        z = torch.randn(batch, g.latent_dim, device=device)
        ones = torch.ones(batch, device=device)
        zeros = torch.zeros_like(ones)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            fake = g(z)
            loss_d = bce(d(real).float(), ones) + bce(d(fake.detach()).float(), zeros)
        opt_d.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss_d).backward()
            scaler.step(opt_d)
        else:
            loss_d.backward()
            opt_d.step()
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            loss_g = bce(d(fake).float(), ones)
        opt_g.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss_g).backward()
            scaler.step(opt_g)
            scaler.update()
        else:
            loss_g.backward()
            opt_g.step()
        sum_g += loss_g.detach()
        sum_d += loss_d.detach()
    means = (torch.stack([sum_g, sum_d]) / train.local_steps).tolist()
    return {"loss-g": means[0], "loss-d": means[1]}


def bare_cyclegan(nets: dict[str, nn.Module], a_images: torch.Tensor, b_images: torch.Tensor,
                  train: TrainConfig, seed: int, amp_dtype: torch.dtype | None = None
                  ) -> dict[str, float]:
    """The floor for CycleGAN (Zhu et al. 2017, LSGAN + cycle + identity, lambda 10): unpaired
    draws per domain, G step with frozen Ds, then D step; one sync at the end."""
    device = a_images.device
    g_ab, g_ba, d_a, d_b = nets["g_ab"], nets["g_ba"], nets["d_a"], nets["d_b"]
    betas = (train.beta1, train.beta2)
    opts = [torch.optim.Adam(g_ab.parameters(), train.lr_g, betas),
            torch.optim.Adam(g_ba.parameters(), train.lr_g, betas),
            torch.optim.Adam(d_a.parameters(), train.lr_d, betas),
            torch.optim.Adam(d_b.parameters(), train.lr_d, betas)]
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    d_params = list(d_a.parameters()) + list(d_b.parameters())
    for net in nets.values():
        net.train()
    torch.manual_seed(seed)
    na, nb = len(a_images), len(b_images)
    sum_g = torch.zeros((), device=device)
    sum_d = torch.zeros((), device=device)

    def ls(pred: torch.Tensor, target: float) -> torch.Tensor:
        return ((pred.float() - target) ** 2).mean()

    def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x.float() - y.float()).abs().mean()

    def update(loss: torch.Tensor, group: list[torch.optim.Optimizer]) -> None:
        for opt in group:
            opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            for opt in group:
                scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            for opt in group:
                opt.step()

    for _ in range(train.local_steps):
        a = a_images[torch.randint(na, (min(train.batch_size, na),), device=device)]
        b = b_images[torch.randint(nb, (min(train.batch_size, nb),), device=device)]
        for p in d_params:
            p.requires_grad_(False)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            fake_b = g_ab(a)
            adv = ls(d_b(fake_b), 1.0)
            cyc = l1(g_ba(fake_b), a)
            idt = l1(g_ba(a), a)
            fake_a = g_ba(b)
            adv = adv + ls(d_a(fake_a), 1.0)
            cyc = cyc + l1(g_ab(fake_a), b)
            idt = idt + l1(g_ab(b), b)
            loss_g = adv + 10.0 * cyc + 5.0 * idt
        update(loss_g, opts[:2])
        for p in d_params:
            p.requires_grad_(True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            loss_d = (0.5 * (ls(d_a(a), 1.0) + ls(d_a(fake_a.detach()), 0.0))
                      + 0.5 * (ls(d_b(b), 1.0) + ls(d_b(fake_b.detach()), 0.0)))
        update(loss_d, opts[2:])
        sum_g += loss_g.detach()
        sum_d += loss_d.detach()
    means = (torch.stack([sum_g, sum_d]) / train.local_steps).tolist()
    return {"loss-g": means[0], "loss-d": means[1]}


def _family_step_loop(family_name: str, nets: dict[str, nn.Module], data: dict[str, torch.Tensor],
                      train: TrainConfig, seed: int, amp_dtype: torch.dtype | None
                      ) -> None:
    """For families without an inline bare loop here: the family's own draw and step in a plain
    loop, which isolates what the trainer itself adds."""
    from shared_models import StepContext

    family = get_family(family_name)
    device = next(iter(data.values())).device
    opts = family.optimizers(nets, train)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    ctx = StepContext(device=device, amp_dtype=amp_dtype, scaler=scaler)
    for net in nets.values():
        net.train()
    torch.manual_seed(seed)
    totals: dict[str, torch.Tensor] = {}
    for _ in range(train.local_steps):
        out = family.train_step(family.draw(data, train.batch_size), nets, opts, ctx)
        for k, v in out.items():
            totals[k] = totals[k] + v if k in totals else v.clone()
    torch.stack([v.float() for v in totals.values()]).tolist()


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The layout a tuned GPU loop uses: one copy, channels_last for 4-D images."""
    t = t.to(device)
    if device.type == "cuda" and t.ndim == 4 and t.is_floating_point():
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def _synthetic(family_name: str, model: ModelConfig, n: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    shape = (n, model.channels) + (model.image_size,) * model.spatial_dims
    keys = get_family(family_name).batch_keys
    return {k: torch.rand(shape, generator=gen) * 2 - 1 for k in keys}


def compare(name: str, model: ModelConfig, train: TrainConfig, reps: int,
            device: torch.device = torch.device("cpu"), amp: bool = False, n_images: int = 256,
            warmup: int = 1) -> Comparison:
    """Trainer.fit (a) vs the bare loop (b) on ``model``; DCGAN gets the inline bare loop,
    other families the family step in a plain loop (which isolates the trainer's own overhead)."""
    torch.manual_seed(0)
    trainer = LocalTrainer(model, device, amp="auto" if amp else "off")
    init = encode(trainer.nets)  # both sides start every repetition from these weights
    data = _synthetic(model.family, model, n_images)
    bare_nets = copy.deepcopy(trainer.nets)
    amp_dtype = _amp_dtype(device, amp)
    if amp_dtype != trainer.amp_dtype:
        raise ValueError(f"trainer picked {trainer.amp_dtype}, bare loop {amp_dtype}")
    on_device = {k: _to_device(v, device) for k, v in data.items()}
    seed = 1234
    inline = model.family in ("dcgan", "cyclegan")

    cpu: dict[str, list[float]] = {"a": [], "b": []}

    def run_trainer() -> float:
        trainer.load(init)
        _sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        trainer.fit(data, train, seed)
        cpu["a"].append(time.process_time() - c0)
        return time.perf_counter() - t0

    def run_bare() -> float:
        from shared_models.codec import decode_into

        decode_into(bare_nets, init)
        _sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        if model.family == "cyclegan":
            bare_cyclegan(bare_nets, on_device["a"], on_device["b"], train, seed, amp_dtype)
        elif inline:
            bare_dcgan(bare_nets["generator"], bare_nets["discriminator"], on_device["image"],
                       train, seed, amp_dtype)
        else:
            _family_step_loop(model.family, bare_nets, on_device, train, seed, amp_dtype)
        _sync(device)
        cpu["b"].append(time.process_time() - c0)
        return time.perf_counter() - t0

    a, b = interleave(run_trainer, run_bare, reps, warmup)
    # images per step as the trainer counts them: every batch key (both domains for CycleGAN)
    per_step = min(train.batch_size, n_images) * len(get_family(model.family).batch_keys)
    result = Comparison(name, train.local_steps * per_step, a, b,
                        a_cpu=cpu["a"][warmup:], b_cpu=cpu["b"][warmup:])
    # Same start, same seed, same arithmetic: the weights must agree (bit-exact on CPU fp32).
    ta, tb = encode(trainer.nets), encode(bare_nets)
    result.extra["max-weight-diff"] = float(max(np.abs(ta[k].astype(np.float64) - tb[k]).max()
                                                for k in ta))
    result.extra["bare"] = (f"inline {model.family} loop" if inline
                            else "family draw+step in a plain loop")
    return result


def available(family_name: str) -> bool:
    return family_name in families()


def cpu_comparisons(quick: bool = False) -> list[Comparison]:
    """The CPU figures of ``make bench``: DCGAN-64 (and CycleGAN-128 where that family exists)."""
    out: list[Comparison] = []
    if quick:
        out.append(compare("trainer_vs_bare_dcgan32_quick",
                           ModelConfig(image_size=32, width=8),
                           TrainConfig(local_steps=3, batch_size=8), reps=3, n_images=32))
        return out
    out.append(compare("trainer_vs_bare_dcgan64", ModelConfig(image_size=64),
                       TrainConfig(local_steps=3, batch_size=16), reps=11))
    if available("cyclegan"):
        out.append(compare("trainer_vs_bare_cyclegan128",
                           ModelConfig(family="cyclegan", image_size=128),
                           TrainConfig(local_steps=1, batch_size=1), reps=7, n_images=8))
    else:
        log.warning("CycleGAN family not registered (families: %s): skipped", families())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: seconds, for tests")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for c in cpu_comparisons(args.quick):
        print(f"{c.name}: {c.ratio:.3f}")
        print(f"  trainer {c.a_rate:.1f} img/s, bare {c.b_rate:.1f} img/s, "
              f"max-weight-diff {c.extra['max-weight-diff']:.2e} ({c.extra['bare']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
