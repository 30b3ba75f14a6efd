"""Class-conditional DCGAN: G(z, y) with a one-hot class input, projection discriminator D(x, y).

Conditioning follows Mirza & Osindero 2014 (eq. 2: min_G max_D E[log D(x|y)] + E[log(1 - D(G(z|y)|y))])
with the non-saturating generator loss; D is a projection discriminator (Miyato & Koyama 2018, eq. 3:
f(x, y) = y^T V phi(x) + psi(phi(x))). Labels are int64 class indices in [0, ``num_classes``); the
class order is fixed by the federation so that index k means the same class at every hospital.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .dcgan import DCGAN
from .family import Nets
from .networks import class_parameters


class ConditionalDCGAN(DCGAN):
    name = "cdcgan"
    batch_keys = ("image", "label")
    optional_keys = ()
    data_layout = "labelled"

    def build(self, cfg: ModelConfig) -> Nets:
        if cfg.num_classes < 2:
            raise ValueError(f"family 'cdcgan' needs model num_classes >= 2, got {cfg.num_classes}")
        return super().build(cfg)

    def class_slices(self, nets: Nets) -> dict[str, tuple[int, int]]:
        """Every per-class parameter its networks declare (``networks.class_parameters``): G's
        one-hot input columns and CBN rows, D's projection embeddings and AC-GAN head rows."""
        return {f"{c}.{name}": where for c, net in nets.items()
                for name, where in class_parameters(net).items()}

    @torch.no_grad()
    def sample(self, nets: Nets, noise: torch.Tensor, labels: torch.Tensor | None = None
               ) -> torch.Tensor:
        if labels is None:
            raise ValueError("family 'cdcgan' samples need labels (one class index per noise row)")
        return super().sample(nets, noise, labels)
