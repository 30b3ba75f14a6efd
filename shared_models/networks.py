"""DCGAN networks built from MONAI blocks, one class for 2D and 3D (``spatial_dims``).

MONAI's own ``Generator``/``Discriminator`` are residual, instance-normalised networks that train
several times slower on a CPU; the classic DCGAN layout (Radford et al. 2016: strided transposed
convolutions, batch norm, ReLU / LeakyReLU(0.2), tanh output) converges in a few hundred steps, which
is what a round budget at a hospital affords. The layers are MONAI ``Convolution`` blocks and the
argument names follow MONAI (``spatial_dims``, ``in_channels``, ``channels``).
"""

from __future__ import annotations

import math

import torch
from monai.networks.utils import normal_init
from monai.networks.blocks import Convolution
from torch import nn

LEAKY = ("LEAKYRELU", {"negative_slope": 0.2})
# Layer normalisation over (C, H, W[, D]) of each sample: GroupNorm with a single group.
LAYER_NORM = ("GROUP", {"num_groups": 1})


def _levels(image_size: int) -> int:
    """Number of stride-2 stages between a 4-pixel seed and ``image_size``."""
    return int(math.log2(image_size // 4))


class DCGANGenerator(nn.Module):
    """z (B, latent_dim) [+ class one-hot] -> image (B, C, S, S[, S]) in [-1, 1]."""

    def __init__(
        self,
        spatial_dims: int,
        latent_dim: int,
        out_channels: int,
        image_size: int,
        width: int,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        levels = _levels(image_size)
        chans = [width * 2 ** (levels - 1 - i) for i in range(levels)]  # e.g. 128, 64, 32
        self.seed_shape = (chans[0],) + (4,) * spatial_dims
        self.project = nn.Sequential(
            nn.Linear(latent_dim + num_classes, math.prod(self.seed_shape), bias=False),
            nn.BatchNorm1d(math.prod(self.seed_shape)),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            blocks.append(
                Convolution(spatial_dims, c_in, c_out, strides=2, kernel_size=4, padding=1,
                            output_padding=0, is_transposed=True, act="RELU", norm="BATCH",
                            bias=False)
            )
        blocks.append(
            Convolution(spatial_dims, chans[-1], out_channels, strides=2, kernel_size=4,
                        padding=1, output_padding=0, is_transposed=True, conv_only=True)
        )
        self.body = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            if labels is None:
                raise ValueError("a class-conditional generator needs labels")
            z = torch.cat([z, nn.functional.one_hot(labels, self.num_classes).to(z.dtype)], 1)
        x = self.project(z).view(z.shape[0], *self.seed_shape)
        return torch.tanh(self.body(x))


class DCGANDiscriminator(nn.Module):
    """image -> one logit per image (no sigmoid: the loss works on logits, stable under fp16).

    With ``num_classes`` > 0 it is a projection discriminator (Miyato & Koyama 2018): the class
    embedding's inner product with the pooled features is added to the logit. ``norm`` is batch
    norm for DCGAN; a WGAN-GP critic needs a per-sample norm (``LAYER_NORM``), since its gradient
    penalty is defined per sample (Gulrajani et al. 2017, sec. 4).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        image_size: int,
        width: int,
        num_classes: int = 0,
        norm: str | tuple = "BATCH",
    ) -> None:
        super().__init__()
        levels = _levels(image_size)
        chans = [width * 2**i for i in range(levels)]  # e.g. 32, 64, 128
        blocks: list[nn.Module] = [
            Convolution(spatial_dims, in_channels, chans[0], strides=2, kernel_size=4,
                        padding=1, act=LEAKY, norm=None)
        ]
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            blocks.append(
                Convolution(spatial_dims, c_in, c_out, strides=2, kernel_size=4, padding=1,
                            act=LEAKY, norm=norm, bias=False)
            )
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(chans[-1] * 4**spatial_dims, 1)
        self.embed = nn.Embedding(num_classes, chans[-1] * 4**spatial_dims) if num_classes else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.body(x).flatten(1)
        logit = self.head(h).squeeze(1)
        if self.embed is not None:
            if labels is None:
                raise ValueError("a class-conditional discriminator needs labels")
            logit = logit + (self.embed(labels) * h).sum(1)
        return logit


def init_dcgan_weights(module: nn.Module) -> None:
    """N(0, 0.02) conv/linear weights and N(1, 0.02) batch-norm scales as in the DCGAN paper
    (MONAI's ``normal_init``); GroupNorm/LayerNorm scales, which it leaves alone, likewise."""
    module.apply(normal_init)
    for m in module.modules():
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)