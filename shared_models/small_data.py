"""Adversarial training on a hospital's few slices: what the GAN families' train steps call.

Three mechanisms, each a run setting (``TrainConfig``; off by default unless ``BENCHMARKS.md``'s
"Small local data" measurement says otherwise), all identical at every hospital:

- ``augment``: DiffAugment (Zhao et al. 2020, ``shared_models.augment``) of every image the
  discriminator sees, real and generated, in the discriminator's and the generator's step
  (pix2pix: each input/output pair augmented as one two-channel image);
- ``r1_gamma``: the R1 penalty (Mescheder et al. 2018, eq. 9), gamma/2 * E[||grad_x D(x)||^2] on
  the real images (as D sees them: augmented, as in Karras et al. 2020), added to D's loss;
- ``ema_decay``: an exponential moving average of the generator over a round's local steps
  (``GeneratorEMA``); the hospital sends the average in place of the last iterate. The
  coordinator's average across rounds is ``server.ema`` (``server-ema-decay``).

``SmallData`` rides in the ``StepContext`` (``ctx.small_data``); a family's step calls
``view(x)`` on everything D sees and ``r1(logits, x)`` on the reals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .augment import diff_augment, parse_policy

# Which families' train steps call SmallData each family declares (``supports``: "augment",
# "r1"); the others refuse the settings (``shared_models.capabilities.check_supported``).


@dataclass(frozen=True)
class SmallData:
    """The round's augmentation policy and R1 weight (from ``TrainConfig``)."""

    augment: tuple[str, ...] = ()
    r1_gamma: float = 0.0

    @classmethod
    def from_train(cls, train: object | None) -> "SmallData":
        if train is None:
            return cls()
        # channels are checked at launch and by the hospital (capabilities.check_model)
        return cls(augment=parse_policy(getattr(train, "augment", ""), channels=3),
                   r1_gamma=float(getattr(train, "r1_gamma", 0.0)))

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the discriminator sees it (augmented when a policy is set)."""
        return diff_augment(x, self.augment) if self.augment else x

    def real_view(self, x: torch.Tensor) -> torch.Tensor:
        """The reals as D sees them, a leaf that requires grad when R1 is on (``r1`` needs it)."""
        x = self.view(x)
        return x.detach().requires_grad_(True) if self.r1_gamma > 0 else x

    def r1(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor | float:
        """gamma/2 * mean over the batch of ||d logits_i / d x_i||^2 (0. when off).

        ``x`` is ``real_view``'s tensor and ``logits`` D's output on it; the graph is kept so the
        penalty trains D. Each logit depends on its own image only in eval mode; under batch
        norm (DCGAN's D in train mode) the sum's gradient also carries the batch coupling, as
        every R1 implementation on a batch-normalised D does."""
        if self.r1_gamma <= 0:
            return 0.0
        (grad,) = torch.autograd.grad(logits.float().sum(), x, create_graph=True)
        return 0.5 * self.r1_gamma * grad.float().flatten(1).pow(2).sum(1).mean()


class GeneratorEMA:
    """w_ema <- decay * w_ema + (1 - decay) * w after each step (Karras et al. 2018, "G_s").

    Starts at the nets' current weights (the round's received model). Floating buffers (batch
    norm running statistics) are averaged too; integer ones (``num_batches_tracked``) copied.
    ``apply()`` writes the average into the nets."""

    def __init__(self, nets: dict[str, nn.Module], components: Iterable[str], decay: float
                 ) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.nets = {c: nets[c] for c in components}
        self.shadow = {c: {k: v.detach().clone() for k, v in net.state_dict().items()}
                       for c, net in self.nets.items()}

    @torch.no_grad()
    def update(self) -> None:
        for c, net in self.nets.items():
            shadow = self.shadow[c]
            for k, v in net.state_dict().items():
                if v.is_floating_point():
                    shadow[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
                else:
                    shadow[k].copy_(v)

    @torch.no_grad()
    def apply(self) -> None:
        for c, net in self.nets.items():
            net.load_state_dict(self.shadow[c])
