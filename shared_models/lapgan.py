"""LAPGAN (Denton et al. 2015): a Laplacian pyramid of adversarial networks, one G/D per level.

The pyramid of an image I (size S) has ``LEVELS`` = 3 levels, as the paper's CIFAR-10 model
(8 -> 16 -> 32): I_2 = I, I_{k-1} = d(I_k) (2x2 mean pooling), and the band-pass residual of
level k >= 1 is h_k = I_k - u(I_{k-1}) (u: bilinear / trilinear upsampling). Then
I_k = u(I_{k-1}) + h_k exactly, and I = u(u(I_0) + h_1) + h_2 (``reconstruct``).

- ``g_0`` / ``d_0``: an unconditional DCGAN at the coarsest size S/4 (``shared_models.networks``;
  a fully connected G/D when S/4 is 4 px, as the paper's coarsest level was).
- ``g_k`` (k = 1, 2): takes the upsampled coarser image l = u(I_{k-1}) and a noise plane, and
  outputs the residual h (a linear output: residuals span [-2, 2]). ``d_k`` judges l + h given
  l (their concatenation), real h_k against G_k's.

Training follows the paper: every level is trained on the hospital's real pyramid (level k's G
and D see the real coarse image, never level k-1's samples), with the non-saturating GAN loss;
sampling runs coarse to fine, and the image is clamped to [-1, 1]. The three levels are fixed
(the family's components are known from its name, before any image size), so the coarsest size
follows the run's ``image-size``: 4 px at 16, 8 px at 32, 16 px at 64.

Components ``g_0, g_1, g_2`` (generators) and ``d_0, d_1, d_2`` (discriminators), each shared
and aggregated by the preset's rule for its role, like CycleGAN's ``g_*`` / ``d_*``.

DP-SGD (``dp_plan`` / ``dp_step``): 2 releases per step. The discriminators' step is one joint
release: a record's loss is the sum over the levels of D_k's real term and (k >= 1) its fake
term, which is conditioned on the record's own coarse image and so a real-data term too (as
pix2pix's D(a, G(a))). The generators' step is the second release: G_1 and G_2's losses see the
record's coarse image; G_0's (noise only, through the released D_0) is post-processing, an
ordinary step.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.functional import binary_cross_entropy_with_logits as bce

from .capabilities import AUGMENT, DP, R1, UA_GAN
from .config import ModelConfig
from .dp import per_sample_norms, sample_rate
from .family import FamilyBase, Nets, Optimizers, StepContext, eval_forward
from .networks import DCGANDiscriminator, DCGANGenerator, init_dcgan_weights

LEVELS = 3


def downsample(x: torch.Tensor) -> torch.Tensor:
    """d: 2x2 (2x2x2) mean pooling, 2D or 3D (by the tensor's rank)."""
    return (F.avg_pool2d if x.ndim == 4 else F.avg_pool3d)(x, 2)


def upsample(x: torch.Tensor) -> torch.Tensor:
    """u: x2 bilinear (trilinear) interpolation."""
    return F.interpolate(x, scale_factor=2, mode="bilinear" if x.ndim == 4 else "trilinear",
                         align_corners=False)


def pyramid(image: torch.Tensor, levels: int = LEVELS
            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(images I_0 .. I_{L-1}, coarsest first; residuals h_1 .. h_{L-1}, h_k = I_k - u(I_{k-1}))."""
    images = [image]
    for _ in range(levels - 1):
        images.insert(0, downsample(images[0]))
    residuals = [images[k] - upsample(images[k - 1]) for k in range(1, levels)]
    return images, residuals


def reconstruct(coarse: torch.Tensor, residuals: list[torch.Tensor]) -> torch.Tensor:
    """I_{L-1} from I_0 and the residuals: I_k = u(I_{k-1}) + h_k."""
    image = coarse
    for h in residuals:
        image = upsample(image) + h
    return image


class CoarseMLPGenerator(nn.Module):
    """z -> a tiny image (B, C, 4, 4[, 4]) in [-1, 1]: a fully connected G_0 (Denton et al.'s
    coarsest level was fully connected), for pyramids whose coarsest level is 4 px."""

    def __init__(self, spatial_dims: int, latent_dim: int, channels: int, size: int,
                 width: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.num_classes = 0
        self.shape = (channels,) + (size,) * spatial_dims
        hidden = width * 8
        self.body = nn.Sequential(nn.Linear(latent_dim, hidden), nn.BatchNorm1d(hidden),
                                  nn.ReLU(inplace=True), nn.Linear(hidden, math.prod(self.shape)))

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return torch.tanh(self.body(z)).view(z.shape[0], *self.shape)


class CoarseMLPDiscriminator(nn.Module):
    """A tiny image -> one logit: the fully connected D_0 beside ``CoarseMLPGenerator``."""

    def __init__(self, spatial_dims: int, channels: int, size: int, width: int) -> None:
        super().__init__()
        hidden = width * 8
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(channels * size ** spatial_dims, hidden),
                                  nn.LeakyReLU(0.2, inplace=True), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.body(x).squeeze(1)


class ResidualGenerator(nn.Module):
    """(l = u(I_{k-1}), a noise plane) -> the band-pass residual h_k, at level k's full size.

    Three 3x3 convolutions (the paper's CIFAR G_k: ReLU convolutions at one resolution); the
    output is linear, since residuals are differences of images in [-1, 1]."""

    def __init__(self, spatial_dims: int, channels: int, width: int) -> None:
        from monai.networks.blocks import Convolution
        super().__init__()
        self.spatial_dims = spatial_dims
        self.body = nn.Sequential(
            Convolution(spatial_dims, channels + 1, width, kernel_size=3, act="RELU",
                        norm="BATCH", bias=False),
            Convolution(spatial_dims, width, width, kernel_size=3, act="RELU", norm="BATCH",
                        bias=False),
            Convolution(spatial_dims, width, channels, kernel_size=3, conv_only=True),
        )

    def forward(self, coarse_up: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([coarse_up, noise], 1))


def _noise_plane(like: torch.Tensor, randn=None) -> torch.Tensor:
    shape = (like.shape[0], 1) + tuple(like.shape[2:])
    return randn(*shape) if randn is not None else torch.randn(shape, device=like.device,
                                                               dtype=like.dtype)


class LAPGAN(FamilyBase):
    """Three-level Laplacian pyramid GAN (Denton et al. 2015), 2D or 3D."""

    name = "lapgan"
    components = tuple(f"g_{k}" for k in range(LEVELS)) + tuple(f"d_{k}" for k in range(LEVELS))
    batch_keys = ("image",)
    task = "generation"
    data_layout = "image"
    supports = frozenset({DP})
    lacks = {
        AUGMENT: "its discriminators judge a residual given the real coarse image; DiffAugment "
                 "of the pair is not implemented",
        R1: "no R1 penalty in its discriminator steps",
        UA_GAN: "UA-GAN's coordinator trains one generator against odds on noise-only fakes; "
                "lapgan's finer generators are conditioned on real coarse images",
    }

    def build(self, cfg: ModelConfig) -> Nets:
        dims, c, w = cfg.spatial_dims, cfg.channels, cfg.width
        coarse = cfg.image_size // 2 ** (LEVELS - 1)
        if coarse >= 8:
            g0: nn.Module = DCGANGenerator(dims, cfg.latent_dim, c, coarse, w)
            d0: nn.Module = DCGANDiscriminator(dims, c, coarse, w)
        else:
            g0 = CoarseMLPGenerator(dims, cfg.latent_dim, c, coarse, w)
            d0 = CoarseMLPDiscriminator(dims, c, coarse, w)
        nets: Nets = {"g_0": g0}
        for k in range(1, LEVELS):
            nets[f"g_{k}"] = ResidualGenerator(dims, c, w)
        nets["d_0"] = d0
        for k in range(1, LEVELS):
            nets[f"d_{k}"] = DCGANDiscriminator(dims, 2 * c, coarse * 2 ** k, w)
        nets = per_sample_norms(nets, cfg.norm)
        for net in nets.values():
            init_dcgan_weights(net)
        return nets

    # -- the adversarial terms of one level
    @staticmethod
    def _d_input(coarse_up: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """What D_k sees: the image l + h, given l (concatenated)."""
        return torch.cat([coarse_up, coarse_up + residual], 1)

    def _level_d_loss(self, nets: Nets, k: int, images: list[torch.Tensor],
                      residuals: list[torch.Tensor], fake: torch.Tensor) -> torch.Tensor:
        d = nets[f"d_{k}"]
        if k == 0:
            real_logit, fake_logit = d(images[0]).float(), d(fake.detach()).float()
        else:
            up = upsample(images[k - 1])
            real_logit = d(self._d_input(up, residuals[k - 1])).float()
            fake_logit = d(self._d_input(up, fake.detach())).float()
        return (bce(real_logit, torch.ones_like(real_logit))
                + bce(fake_logit, torch.zeros_like(fake_logit)))

    def _level_g_loss(self, nets: Nets, k: int, images: list[torch.Tensor],
                      fake: torch.Tensor) -> torch.Tensor:
        d = nets[f"d_{k}"]
        logit = (d(fake) if k == 0 else d(self._d_input(upsample(images[k - 1]), fake))).float()
        return bce(logit, torch.ones_like(logit))

    def _fakes(self, nets: Nets, images: list[torch.Tensor], z: torch.Tensor,
               planes: list[torch.Tensor]) -> list[torch.Tensor]:
        """G_0(z), then G_k(u(real I_{k-1}), noise_k): each level from the real coarser image."""
        return [nets["g_0"](z)] + [nets[f"g_{k}"](upsample(images[k - 1]), planes[k - 1])
                                   for k in range(1, LEVELS)]

    def train_step(
        self, batch: dict[str, torch.Tensor], nets: Nets, opts: Optimizers, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        if ctx.dp is not None:
            return self.dp_step(nets, opts, ctx)
        real = batch["image"]
        images, residuals = pyramid(real)
        z = torch.randn(real.shape[0], nets["g_0"].latent_dim, device=real.device)
        planes = [_noise_plane(images[k]) for k in range(1, LEVELS)]
        out: dict[str, torch.Tensor] = {}
        discs = [f"d_{k}" for k in range(LEVELS)]
        gens = [f"g_{k}" for k in range(LEVELS)]
        with ctx.autocast():
            fakes = self._fakes(nets, images, z, planes)
            d_losses = [self._level_d_loss(nets, k, images, residuals, fakes[k])
                        for k in range(LEVELS)]
            loss_d = sum(d_losses) + sum(ctx.prox_term(c, nets[c]) for c in discs)
        # the levels are independent: one backward of the sum steps every D by its own loss
        ctx.step(loss_d, *(opts[c] for c in discs))
        with ctx.autocast():
            g_losses = [self._level_g_loss(nets, k, images, fakes[k]) for k in range(LEVELS)]
            loss_g = sum(g_losses) + sum(ctx.prox_term(c, nets[c]) for c in gens)
        ctx.step(loss_g, *(opts[c] for c in gens))
        # the protocol's metric keys (protocol/keys.py): sums over the levels, D's odds at the
        # finest level
        up = upsample(images[-2])
        d_last = nets[f"d_{LEVELS - 1}"]
        with torch.no_grad():
            d_real = torch.sigmoid(d_last(self._d_input(up, residuals[-1])).float()).mean()
            d_fake = torch.sigmoid(d_last(self._d_input(up, fakes[-1])).float()).mean()
        out.update({"loss-g": loss_g.detach(), "loss-d": loss_d.detach(),
                    "d-real": d_real, "d-fake": d_fake})
        return out

    # -- DP-SGD
    def dp_plan(self, data: Mapping[str, torch.Tensor], batch_size: int) -> tuple[float, int]:
        """Two releases per step: the discriminators' joint step and the generators' joint step
        (G_1, G_2 see the record's real coarse image), each on its own Poisson sample."""
        return sample_rate(batch_size, self.dp_records(data)), 2

    def _dp_records(self, nets: Nets, ctx: StepContext) -> dict[str, torch.Tensor]:
        """A Poisson sample of the images with each record's own (secret) noise beside it."""
        dp = ctx.dp
        records = dp.poisson(("image",))
        images, _ = pyramid(records["image"])
        for k in range(1, LEVELS):
            records[f"noise{k}"] = _noise_plane(images[k], dp.randn)
        return records

    def dp_step(self, nets: Nets, opts: Optimizers, ctx: StepContext) -> dict[str, torch.Tensor]:
        """The DP path of ``train_step`` (shared_models.dp; the module docstring says what is a
        release). D_0's fake term and G_0's loss, on fresh noise only, are public."""
        dp = ctx.dp
        discs = {f"d_{k}": nets[f"d_{k}"] for k in range(LEVELS)}
        gens = {f"g_{k}": nets[f"g_{k}"] for k in range(LEVELS)}
        b = dp.batch_size

        def d_term(ex: dict[str, torch.Tensor]) -> torch.Tensor:
            images, residuals = pyramid(ex["image"])
            real0 = nets["d_0"](images[0]).float()
            loss = bce(real0, torch.ones_like(real0))
            for k in range(1, LEVELS):  # G_k's fake is conditioned on this record's coarse image
                with torch.no_grad():
                    fake = nets[f"g_{k}"](upsample(images[k - 1]), ex[f"noise{k}"])
                loss = loss + self._level_d_loss(nets, k, images, residuals, fake)
            return loss

        def g_term(ex: dict[str, torch.Tensor]) -> torch.Tensor:
            images, _ = pyramid(ex["image"])
            loss = torch.zeros((), device=ex["image"].device)
            for k in range(1, LEVELS):
                fake = nets[f"g_{k}"](upsample(images[k - 1]), ex[f"noise{k}"])
                loss = loss + self._level_g_loss(nets, k, images, fake)
            return loss

        z0 = dp.randn(b, nets["g_0"].latent_dim)
        with ctx.autocast():
            fake0 = nets["g_0"](z0)
            d_fake0 = nets["d_0"](fake0.detach()).float()
            public_d = (bce(d_fake0, torch.zeros_like(d_fake0))
                        + sum(ctx.prox_term(c, n) for c, n in discs.items()))
            dp.step(discs, [(d_term, self._dp_records(nets, ctx))],
                    [opts[c] for c in discs], public_d)
        # G_0: noise through the released D_0, an ordinary step (post-processing)
        with ctx.autocast():
            loss_g0 = (self._level_g_loss(nets, 0, [fake0], fake0)
                       + ctx.prox_term("g_0", gens["g_0"]))
        ctx.step(loss_g0, opts["g_0"])
        finer = {c: n for c, n in gens.items() if c != "g_0"}
        for net in discs.values():
            net.requires_grad_(False)
        try:
            with ctx.autocast():
                dp.step(finer, [(g_term, self._dp_records(nets, ctx))],
                        [opts[c] for c in finer],
                        sum(ctx.prox_term(c, n) for c, n in finer.items()))
        finally:
            for net in discs.values():
                net.requires_grad_(True)
        # only what is computed from released weights and fresh noise travels: level 0's G loss
        # and D_0's odds on its fakes
        return {"loss-g": loss_g0.detach(), "d-fake": torch.sigmoid(d_fake0.detach()).mean()}

    judge_component = f"d_{LEVELS - 1}"

    def judge(self, nets: Nets, images: torch.Tensor, labels: torch.Tensor | None = None
              ) -> torch.Tensor:
        """The finest D's logit on whole images: the image given its own upsampled coarse one."""
        up = upsample(downsample(images))
        return nets[self.judge_component](self._d_input(up, images - up))

    @torch.no_grad()
    def sample(self, nets: Nets, noise: torch.Tensor, labels: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Coarse to fine: I_0 = G_0(z), I_k = u(I_{k-1}) + G_k(u(I_{k-1}), noise); in [-1, 1]."""
        image = eval_forward(nets["g_0"], noise)
        for k in range(1, LEVELS):
            up = upsample(image)
            image = up + eval_forward(nets[f"g_{k}"], up, _noise_plane(up))
        return image.clamp(-1.0, 1.0)
