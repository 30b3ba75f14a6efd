"""Differentially private GAN training at the hospital: DP-SGD with correct GAN accounting.

The mechanism is DP-SGD (Abadi et al. 2016, Algorithm 1): every optimiser step of a component
whose loss touches the hospital's real slices takes a **Poisson sample** of the records (each
record in independently with probability ``q = batch_size / N``), computes each sampled record's
gradient, **clips** it to L2 norm ``C`` (``dp-max-grad-norm``, jointly over every parameter the
step trains), sums, adds **Gaussian noise** N(0, sigma^2 C^2 I) (sigma = ``dp-noise-multiplier``)
and divides by the expected batch size. Each such step is one release of the sampled Gaussian
mechanism, and the hospital's accountant (Opacus's RDP accountant, Mironov 2017 / Mironov, Talwar
& Zhang 2019) composes them: ``epsilon(delta)`` after all releases of the run.

What counts as a release, family by family (``releases_per_step``):

* dcgan / cdcgan: the discriminator's real-data term (1 per step). Its generator never sees a
  real slice: its loss is log D(G(z)) through the already-released D.
* wgan-gp: each of the ``n_critic`` critic updates (its real term and the gradient penalty at
  real/fake interpolates are per-record), each on its own Poisson sample: n_critic per step.
* pix2pix: the discriminator (both its terms see the real input ``a``: D(a, b) and D(a, G(a)))
  and the generator (its adversarial and L1 terms see ``a`` and ``b``): 2 per step.
* cyclegan: the generators' joint step and the discriminators' joint step, each over a Poisson
  sample of domain a and one of domain b (a record is a slice of one domain; its inclusion
  probability is at most ``q = batch / min(N_a, N_b)``, which the accountant is given): 2 per
  step with both domains, 1 (the generators) with one.

**Fake-only terms cost nothing (post-processing).** A term computed only from the current weights
and fresh noise z (D's loss on G(z), the generator's loss through D, the FedProx term) is a
function of quantities already released by earlier DP steps (the weights, by induction from the
coordinator's public ones) and of randomness independent of the data. Adding its ordinary
(unclipped) gradient to the noised real-data gradient is post-processing of that release
(Dwork & Roth 2014, Prop. 2.1) under adaptive composition, so it changes no epsilon. Terms that
look "fake" but are built from a real input (pix2pix's D(a, G(a)), CycleGAN's D_A(F(b))) are
real-data terms and are clipped with the record they came from. Fake class labels of the
conditional DCGAN are drawn uniformly, never copied from sampled records.

**Secret randomness.** The batch draws and noise use a generator seeded from the OS's entropy at
each round, never from the run's seed: the coordinator knows that seed, and noise it can
reproduce it can subtract. (Opacus's ``secure_mode`` with a cryptographically secure generator
needs ``torchcsprng``, which is not installed; the floating-point attack on Gaussian sampling
(Mironov 2012) is not addressed either; see docs/security.md.)

**Normalisation.** Batch norm mixes the records of a batch (and its running statistics are a
non-private average): with DP on, the run's ``model.norm`` is ``group`` and every family swaps
its BatchNorm layers for GroupNorm (``per_sample_norms``) on every side, coordinator included,
so all hospitals build the same architecture. Instance norm is per-sample and stays.

Per-sample gradients are computed with ``torch.func`` (``vmap`` of ``grad`` through
``functional_call``), which also handles the WGAN-GP penalty's gradient-of-a-gradient that
Opacus's hook-based ``GradSampleModule`` cannot; Opacus provides the accountant and its
``ModuleValidator`` checks every privately trained network. No Flower import here.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

DEFAULT_DELTA = 1e-5
NORM_CHOICES = ("batch", "group")
DP_EPSILON = "dp-epsilon"  # the one metric DP adds to a train reply (protocol.keys)

PerSampleLoss = Callable[[dict[str, torch.Tensor]], torch.Tensor]


class PrivacyError(RuntimeError):
    """A DP run cannot go on as configured (a net that is not per-sample safe, a family that
    released more than it declared)."""


# ----------------------------------------------------------------------------------- norms

def _groups(channels: int) -> int:
    return math.gcd(channels, 32)


def _swap_batch_norm(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            gn = nn.GroupNorm(_groups(child.num_features), child.num_features,
                              eps=child.eps, affine=True)
            setattr(module, name, gn)
        else:
            _swap_batch_norm(child)


def per_sample_norms(nets: dict[str, nn.Module], norm: str) -> dict[str, nn.Module]:
    """``nets`` with every BatchNorm replaced by GroupNorm when ``norm == "group"``.

    GroupNorm(gcd(C, 32), C) (Opacus's ``ModuleValidator.fix`` uses min(32, C), which fails on
    widths that 32 does not divide). Scales start at 1, shifts at 0 (the families' inits run after
    this, on the new layers)."""
    if norm not in NORM_CHOICES:
        raise ValueError(f"model norm {norm!r} is not one of {NORM_CHOICES}")
    if norm == "group":
        for net in nets.values():
            _swap_batch_norm(net)
    return nets


def check_private(net: nn.Module, component: str) -> None:
    """Opacus's validator on a privately trained net: no BatchNorm (or other unsupported layer)."""
    from opacus.validators import ModuleValidator

    errors = [e for e in ModuleValidator.validate(net, strict=False)
              if "BatchNorm" in type(e).__name__ or "BatchNorm" in str(e)]
    if errors:
        raise PrivacyError(f"component {component!r} has batch norm and cannot be trained with "
                           "DP (the run's model norm must be 'group')")


# ------------------------------------------------------------------------------ accountant

@dataclass
class Accountant:
    """The hospital's privacy ledger for one run: Opacus's RDP accountant over its history.

    ``history`` holds (noise_multiplier, sample_rate, releases) entries, as Opacus's
    ``RDPAccountant.history``; it is what the hospital persists per run.
    """

    history: list[tuple[float, float, int]] = field(default_factory=list)

    def epsilon(self, delta: float,
                extra: tuple[float, float, int] | None = None) -> float:
        """epsilon(delta) of the history (plus a projected ``extra`` entry); 0 with no release."""
        from opacus.accountants import RDPAccountant

        hist = list(self.history) + ([extra] if extra is not None and extra[2] > 0 else [])
        if not hist:
            return 0.0
        acc = RDPAccountant()
        acc.history = [(float(s), float(q), int(n)) for s, q, n in hist]
        return float(acc.get_epsilon(delta=delta))

    def add(self, noise_multiplier: float, sample_rate: float, releases: int) -> None:
        if releases <= 0:
            return
        last = self.history[-1] if self.history else None
        if last is not None and last[0] == noise_multiplier and last[1] == sample_rate:
            self.history[-1] = (last[0], last[1], last[2] + int(releases))
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), int(releases)))

    @property
    def releases(self) -> int:
        return sum(n for _, _, n in self.history)

    def to_json(self) -> str:
        return json.dumps([list(h) for h in self.history])

    @classmethod
    def from_json(cls, text: str) -> "Accountant":
        raw = json.loads(text)
        if not isinstance(raw, list):
            raise ValueError("privacy ledger is not a list")
        hist = []
        for entry in raw:
            s, q, n = entry
            s, q, n = float(s), float(q), int(n)
            if not (s > 0 and 0 < q <= 1 and n >= 0):
                raise ValueError(f"privacy ledger entry {entry!r} is out of range")
            hist.append((s, q, n))
        return cls(hist)


# --------------------------------------------------------------------------- the mechanism

def secret_generator(device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from the OS's entropy (not from any run setting)."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


class _Closure(nn.Module):
    """Registers the privately trained nets so ``functional_call`` can swap their parameters
    while ``fn`` (which calls them as ordinary modules) runs."""

    def __init__(self, nets: Mapping[str, nn.Module], fn: PerSampleLoss) -> None:
        super().__init__()
        self.nets = nn.ModuleDict(dict(nets))
        self.fn = fn

    def forward(self, example: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fn(example)


class PrivateSteps:
    """The DP step of one round at one hospital: Poisson draws, clipping, noise, a release count.

    ``data``: the round's training tensors on the device (batch key -> (N, ...)).
    ``sample_rate``: q, the rate every Poisson draw uses (``batch_size / N``, at most 1).
    ``releases`` counts the DP steps taken; the hospital checks it against what it accounted.
    """

    def __init__(self, data: Mapping[str, torch.Tensor], batch_size: int, sample_rate: float,
                 noise_multiplier: float, max_grad_norm: float, device: torch.device,
                 generator: torch.Generator | None = None) -> None:
        if noise_multiplier <= 0 or max_grad_norm <= 0:
            raise ValueError("DP needs noise_multiplier > 0 and max_grad_norm > 0")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate {sample_rate} is not in (0, 1]")
        self.data = data
        self.batch_size = int(batch_size)
        self.sample_rate = float(sample_rate)
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.device = device
        self.generator = generator or secret_generator(device)
        self.releases = 0
        self._checked: set[int] = set()

    # -- randomness (all secret)
    def poisson(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each record of the paired ``keys`` in with probability q, independently."""
        n = len(self.data[keys[0]])
        mask = torch.rand(n, generator=self.generator, device=self.device) < self.sample_rate
        idx = mask.nonzero().squeeze(1)
        return {k: self.data[k][idx] for k in keys}

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator, device=self.device)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator, device=self.device)

    def randint(self, high: int, n: int) -> torch.Tensor:
        return torch.randint(high, (n,), generator=self.generator, device=self.device)

    # -- the DP step
    def step(self, nets: Mapping[str, nn.Module],
             groups: Iterable[tuple[PerSampleLoss, dict[str, torch.Tensor]]],
             optimizers: Sequence[torch.optim.Optimizer],
             public: torch.Tensor | float = 0.0) -> torch.Tensor:
        """One DP-SGD release for the parameters of ``nets`` (those that require grad).

        ``groups``: (per-record loss, Poisson-sampled records) pairs; the loss takes ONE record
        (each tensor with a leading dim of 1) and returns a scalar. Every record's gradient is
        clipped to ``max_grad_norm``, the clipped sum gets N(0, (sigma C)^2) noise and is divided
        by the expected batch size. ``public``: a loss of fake-only terms and FedProx, whose
        ordinary gradient is added after the noise (post-processing; see the module docstring).
        Returns the mean per-record loss (detached; 0 for an empty draw).
        """
        from torch.func import functional_call, grad, vmap

        for name, net in nets.items():
            if id(net) not in self._checked:
                check_private(net, name)
                self._checked.add(id(net))
        params = {f"nets.{c}.{n}": p for c, net in nets.items()
                  for n, p in net.named_parameters() if p.requires_grad}
        if not params:
            raise PrivacyError("a DP step with nothing to train")
        detached = {k: p.detach() for k, p in params.items()}
        summed = {k: torch.zeros_like(p) for k, p in params.items()}
        loss_total = torch.zeros((), device=self.device)
        count = 0
        for fn, records in groups:
            n = len(next(iter(records.values()))) if records else 0
            if n == 0:
                continue
            holder = _Closure(nets, fn)

            def one(p: dict[str, torch.Tensor], example: dict[str, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
                ex = {k: v.unsqueeze(0) for k, v in example.items()}
                loss = functional_call(holder, p, (ex,), strict=False).float()
                return loss, loss.detach()

            grads, losses = vmap(grad(one, has_aux=True), in_dims=(None, 0))(detached, records)
            norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
            factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            for k, g in grads.items():
                summed[k] += torch.einsum("i,i...->...", factor.to(g.dtype), g)
            loss_total = loss_total + losses.sum()
            count += n
        std = self.noise_multiplier * self.max_grad_norm
        private = {k: (s + std * torch.randn(s.shape, generator=self.generator,
                                             device=s.device, dtype=s.dtype)) / self.batch_size
                   for k, s in summed.items()}
        public_grads: dict[str, torch.Tensor] = {}
        if isinstance(public, torch.Tensor) and public.requires_grad:
            keys = list(params)
            got = torch.autograd.grad(public, [params[k] for k in keys], allow_unused=True)
            public_grads = {k: g for k, g in zip(keys, got) if g is not None}
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        for k, p in params.items():
            g = private[k]
            if k in public_grads:
                g = g + public_grads[k]
            p.grad = g.to(p.dtype)
        for opt in optimizers:
            opt.step()
        self.releases += 1
        return (loss_total / count).detach() if count else loss_total


def sample_rate(batch_size: int, n_records: int) -> float:
    """q = batch / N (at most 1): the Poisson rate of every DP draw."""
    if n_records <= 0:
        raise ValueError("no training records")
    return min(1.0, batch_size / n_records)
