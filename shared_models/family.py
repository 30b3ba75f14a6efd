"""What a GAN family is, and the registry of families.

A family declares its components once (``components``); the codec, checkpoints, aggregation and
metrics are generic over that declaration, so adding a family never touches them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from .config import ModelConfig, TrainConfig

Nets = dict[str, nn.Module]
Optimizers = dict[str, torch.optim.Optimizer]


@dataclass
class StepContext:
    """Everything a training step needs besides data, nets and optimisers.

    ``amp_dtype`` None means fp32. With fp16 a ``scaler`` is required (bf16 needs none).
    ``anchor`` holds the round's received global parameters, per component, for FedProx.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    prox_mu: float = 0.0
    anchor: dict[str, list[torch.Tensor]] | None = None

    def autocast(self) -> torch.autocast:
        return torch.autocast(
            device_type=self.device.type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        )

    def prox_term(self, component: str, net: nn.Module) -> torch.Tensor | float:
        """FedProx: mu/2 * ||w - w_global||^2 (Li et al. 2020, eq. 2); 0 when disabled."""
        if self.prox_mu <= 0 or self.anchor is None or component not in self.anchor:
            return 0.0
        total = sum(((p - a) ** 2).sum() for p, a in zip(net.parameters(), self.anchor[component]))
        return 0.5 * self.prox_mu * total

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward and step, through the grad scaler when fp16 needs one."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            optimizer.step()


class GanFamily(Protocol):
    """The contract every GAN family meets. Batches are dicts of tensors already on the device."""

    name: str
    components: tuple[str, ...]
    # which batch keys the family trains on, e.g. ("image",) or ("a", "b")
    batch_keys: tuple[str, ...]

    def build(self, cfg: ModelConfig) -> Nets: ...

    def optimizers(self, nets: Nets, train: TrainConfig) -> Optimizers: ...

    def train_step(
        self, batch: dict[str, torch.Tensor], nets: Nets, opts: Optimizers, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        """One optimisation step of every trained component; returns detached loss tensors.

        Returns tensors, not floats: converting to Python would synchronise the device on
        every step. The caller reduces them once at the end of the local work.
        """
        ...

    def sample(self, nets: Nets, noise: torch.Tensor, labels: torch.Tensor | None = None
               ) -> torch.Tensor: ...


_REGISTRY: dict[str, Callable[[], GanFamily]] = {}


def register(name: str) -> Callable[[Callable[[], GanFamily]], Callable[[], GanFamily]]:
    def deco(factory: Callable[[], GanFamily]) -> Callable[[], GanFamily]:
        _REGISTRY[name] = factory
        return factory

    return deco


def get_family(name: str) -> GanFamily:
    """The family called ``name``; a clear error lists the known ones."""
    from . import dcgan  # noqa: F401  (registers itself)

    if name not in _REGISTRY:
        raise ValueError(f"unknown GAN family {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def families() -> list[str]:
    from . import dcgan  # noqa: F401

    return sorted(_REGISTRY)
