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
from torch import nn

# MONAI is imported where a network is built: a process that only validates settings (fedsynth
# launch, status) then pays torch's import, not MONAI's ~3.5 s more (BENCHMARKS.md, "The test loop")

LEAKY = ("LEAKYRELU", {"negative_slope": 0.2})
# Layer normalisation over (C, H, W[, D]) of each sample: GroupNorm with a single group.
LAYER_NORM = ("GROUP", {"num_groups": 1})


def _levels(image_size: int) -> int:
    """Number of stride-2 stages between a 4-pixel seed and ``image_size``."""
    return int(math.log2(image_size // 4))


class ClassConditionalNorm(nn.Module):  # not "*BatchNorm*": MONAI normal_init matches names
    """Batch norm whose scale and shift are looked up per class (de Vries et al. 2017; the
    class-conditional BN of Miyato & Koyama 2018, sec. 4): the class acts at every stage of G,
    not only through its input. Scales start at 1, shifts at 0 (``init_dcgan_weights`` leaves
    them). The statistics layer is a plain ``BatchNorm`` without affine terms, so a DP run's
    GroupNorm swap (``shared_models.dp``) applies to it as to any other."""

    def __init__(self, spatial_dims: int, channels: int, num_classes: int) -> None:
        super().__init__()
        # spatial_dims 0: a (B, C) vector (the generator's projected seed)
        bn = {0: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]
        self.norm = bn(channels, affine=False)
        self.scale = nn.Embedding(num_classes, channels)
        self.shift = nn.Embedding(num_classes, channels)
        self.reset_affine()

    def reset_affine(self) -> None:
        nn.init.ones_(self.scale.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
        return self.norm(x) * self.scale(labels).view(shape) + self.shift(labels).view(shape)


class DCGANGenerator(nn.Module):
    """z (B, latent_dim) [+ class one-hot] -> image (B, C, S, S[, S]) in [-1, 1].

    ``class_norm`` (with ``num_classes``): every batch norm is a ``ClassConditionalNorm``."""

    def __init__(
        self,
        spatial_dims: int,
        latent_dim: int,
        out_channels: int,
        image_size: int,
        width: int,
        num_classes: int = 0,
        class_norm: bool = False,
    ) -> None:
        from monai.networks.blocks import Convolution
        super().__init__()
        self.spatial_dims = spatial_dims
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.class_norm = bool(class_norm and num_classes)
        levels = _levels(image_size)
        chans = [width * 2 ** (levels - 1 - i) for i in range(levels)]  # e.g. 128, 64, 32
        self.seed_shape = (chans[0],) + (4,) * spatial_dims
        seed = math.prod(self.seed_shape)
        self.project = nn.Sequential(
            nn.Linear(latent_dim + num_classes, seed, bias=False),
            *(() if self.class_norm else (nn.BatchNorm1d(seed), nn.ReLU(inplace=True))),
        )
        blocks: list[nn.Module] = []
        norms: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            if self.class_norm:  # conv, then the class's norm, then ReLU (in forward)
                blocks.append(Convolution(spatial_dims, c_in, c_out, strides=2, kernel_size=4,
                                          padding=1, output_padding=0, is_transposed=True,
                                          conv_only=True, bias=False))
                norms.append(ClassConditionalNorm(spatial_dims, c_out, num_classes))
            else:
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
        if self.class_norm:
            self.seed_norm = ClassConditionalNorm(0, seed, num_classes)
            self.norms = nn.ModuleList(norms)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            if labels is None:
                raise ValueError("a class-conditional generator needs labels")
            z = torch.cat([z, nn.functional.one_hot(labels, self.num_classes).to(z.dtype)], 1)
        if not self.class_norm:
            x = self.project(z).view(z.shape[0], *self.seed_shape)
            return torch.tanh(self.body(x))
        x = torch.relu(self.seed_norm(self.project(z), labels)).view(z.shape[0], *self.seed_shape)
        for conv, norm in zip(self.body[:-1], self.norms):
            x = torch.relu(norm(conv(x), labels))
        return torch.tanh(self.body[-1](x))


class DCGANDiscriminator(nn.Module):
    """image -> one logit per image (no sigmoid: the loss works on logits, stable under fp16).

    With ``num_classes`` > 0 it is a projection discriminator (Miyato & Koyama 2018): the class
    embedding's inner product with the pooled features is added to the logit. ``multiscale``:
    the projection is made at every stage (on its globally pooled features), not only the last,
    so coarse and fine features both answer for the class. ``aux_classifier``: a linear head on
    the last features predicts the class (AC-GAN, Odena et al. 2017), read by ``classify``.
    ``norm`` is batch norm for DCGAN; a WGAN-GP critic needs a per-sample norm
    (``LAYER_NORM``), since its gradient penalty is defined per sample (Gulrajani et al. 2017).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        image_size: int,
        width: int,
        num_classes: int = 0,
        norm: str | tuple = "BATCH",
        multiscale: bool = False,
        aux_classifier: bool = False,
    ) -> None:
        from monai.networks.blocks import Convolution
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
        feat = chans[-1] * 4**spatial_dims
        self.head = nn.Linear(feat, 1)
        self.embed = nn.Embedding(num_classes, feat) if num_classes else None
        # one embedding per earlier stage, against that stage's channel means
        self.stage_embeds = (nn.ModuleList(nn.Embedding(num_classes, c) for c in chans[:-1])
                             if num_classes and multiscale else None)
        self.classifier = nn.Linear(feat, num_classes) if num_classes and aux_classifier else None

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pooled = []
        for i, block in enumerate(self.body):
            x = block(x)
            if self.stage_embeds is not None and i < len(self.stage_embeds):
                pooled.append(x.flatten(2).mean(2))
        return x.flatten(1), pooled

    def _logit(self, h: torch.Tensor, pooled: list[torch.Tensor],
               labels: torch.Tensor | None) -> torch.Tensor:
        logit = self.head(h).squeeze(1)
        if self.embed is not None:
            if labels is None:
                raise ValueError("a class-conditional discriminator needs labels")
            logit = logit + (self.embed(labels) * h).sum(1)
            if self.stage_embeds is not None:
                for emb, p in zip(self.stage_embeds, pooled):
                    logit = logit + (emb(labels) * p).sum(1)
        return logit

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h, pooled = self._features(x)
        return self._logit(h, pooled, labels)

    def classify(self, x: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(real/fake logit, class logits) from one pass; needs ``aux_classifier``."""
        if self.classifier is None:
            raise ValueError("this discriminator has no auxiliary classifier")
        h, pooled = self._features(x)
        return self._logit(h, pooled, labels), self.classifier(h)


def init_dcgan_weights(module: nn.Module) -> None:
    """N(0, 0.02) conv/linear weights and N(1, 0.02) batch-norm scales as in the DCGAN paper
    (MONAI's ``normal_init``); GroupNorm/LayerNorm scales, which it leaves alone, likewise."""
    from monai.networks.utils import normal_init
    # normal_init assumes every BatchNorm has a scale; ClassConditionalNorm's has none (its
    # per-class scales are embeddings, started at 1)
    module.apply(lambda m: None if isinstance(m, nn.modules.batchnorm._NormBase)
                 and m.weight is None else normal_init(m))
    for m in module.modules():
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

# (axis, start): class c's slice of a parameter is index start + c along axis
ClassSlice = tuple[int, int]


def class_parameters(module: nn.Module) -> dict[str, ClassSlice]:
    """The parameters of ``module`` (state-dict names) that hold one slice per class, and where.

    Per-class aggregation (``server.aggregation``, ``class-weighted-aggregation``) weights each
    class's slice by the hospitals' slices of that class, so the networks that own these
    parameters say which they are: a ``ClassConditionalNorm``'s scale and shift rows, a
    projection discriminator's class embeddings (every stage's with ``multiscale``), an AC-GAN
    head's rows, and the generator's one-hot input columns of its first linear layer."""
    out: dict[str, ClassSlice] = {}
    for prefix, m in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(m, ClassConditionalNorm):
            out[f"{dot}scale.weight"] = out[f"{dot}shift.weight"] = (0, 0)
        elif isinstance(m, DCGANGenerator) and m.num_classes:
            out[f"{dot}project.0.weight"] = (1, m.latent_dim)  # (seed, latent + classes)
        elif isinstance(m, DCGANDiscriminator):
            if m.embed is not None:
                out[f"{dot}embed.weight"] = (0, 0)
            for i, _ in enumerate(m.stage_embeds or ()):
                out[f"{dot}stage_embeds.{i}.weight"] = (0, 0)
            if m.classifier is not None:
                out[f"{dot}classifier.weight"] = out[f"{dot}classifier.bias"] = (0, 0)
    return out
