"""Progressive growing of GANs (PGAN; Karras et al. 2017): from 4 px up to the run's image size.

Stage s trains resolution 4 * 2**s; the last stage is the run's ``image-size`` (16 px: stages
0, 1, 2). When stage s >= 1 starts, its new blocks fade in: G's output is
``alpha * to_rgb_s(block_s(x)) + (1 - alpha) * up(to_rgb_{s-1}(x))`` and D reads
``alpha * block_s(from_rgb_s(img)) + (1 - alpha) * from_rgb_{s-1}(down(img))`` (the paper's
sec. 2, fig. 2), the real images blended between the two resolutions the same way.

**The schedule is the coordinator's round.** A hospital computes (stage, alpha) from the round
number of the coordinator's signed train message and the run's ``pgan-rounds-per-stage`` R
(a model setting, so it is signed with the message and stored in every checkpoint), so every
hospital trains the same stage and alpha in a round (``schedule``): rounds 1..R train 4 px;
each later stage has R fade-in rounds (alpha = 1/(R+1), ..., R/(R+1), constant within a
round) and R stable rounds (alpha = 1); after the last stage's stable rounds it stays there.
``FamilyBase.at_round`` is the hook: the hospital calls it after loading the round's weights
(``client/round.py``, train and evaluate), the coordinator before each sample grid
(``server/federation.py``), ``fedsynth sample`` with the checkpoint's round
(``fedsynth/generation.py``). Without the hook (a notebook) the nets are at the final stage.

**Components never change shape.** Every block of every stage is allocated from the start;
a round trains and uses only the active stage's blocks. The blocks of later stages (and the
previous stage's to_rgb/from_rgb once its fade-in is over) get no gradient (Adam skips a
parameter whose gradient is None), so a hospital returns them unchanged and the mean keeps
them: aggregation, validation, checkpoints and resume are the generic ones, and a resumed run
continues at the stage of its next round. Components: ``generator``, ``discriminator``.

What is the paper's, written here (MONAI has no equivalent of any of the three): the
equalised learning rate (``EqConv``/``EqLinear``: weights N(0, 1), scaled at run time by He's
constant), pixelwise feature normalisation in G (``pixel_norm``), and the minibatch standard
deviation feature in D's last block (``minibatch_stddev``, groups of 4). Not the paper's: the
loss is the non-saturating GAN loss (as dcgan) rather than WGAN-GP, and G's output is clamped
to [-1, 1] when sampled. Samples at a stage below the last are upsampled (nearest) to the run's
image size, so grids, evaluations and exports keep one size.

DP-SGD (``dp_plan`` / ``dp_step``): as dcgan, one release per step (D's real term per record);
D's minibatch-stddev feature is computed over groups of one record in that step (a record's
gradient must not depend on the other records), for reals and fakes alike.
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
from .dp import sample_rate
from .family import FamilyBase, Nets, Optimizers, StepContext, eval_forward

LRELU = 0.2


def stages(image_size: int) -> int:
    """Number of stages from 4 px to ``image_size`` (16 px: 3)."""
    return int(math.log2(image_size)) - 1


def schedule(server_round: int, rounds_per_stage: int, image_size: int) -> tuple[int, float]:
    """(stage, alpha) of a coordinator round (1-based); see the module docstring."""
    r, last = max(1, rounds_per_stage), stages(image_size) - 1
    t = max(server_round, 1) - 1
    if t < r:
        return 0, 1.0
    stage, within = 1 + (t - r) // (2 * r), (t - r) % (2 * r)
    if stage > last:
        return last, 1.0
    return stage, (within + 1) / (r + 1) if within < r else 1.0


def pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Karras et al. sec. 4.2: each pixel's feature vector to unit mean square."""
    return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + eps)


def minibatch_stddev(x: torch.Tensor, group: int = 4) -> torch.Tensor:
    """Karras et al. sec. 3: one more channel, the mean over features and pixels of the standard
    deviation across a group of records (groups of ``min(group, batch)``, which must divide)."""
    b = x.shape[0]
    g = min(group, b)
    while b % g:
        g -= 1
    y = x.float().reshape(g, b // g, *x.shape[1:])
    y = (y.var(0, unbiased=False) + 1e-8).sqrt().mean(tuple(range(1, y.ndim - 1)))  # (b/g,)
    y = y.repeat(g).to(x.dtype).view(b, 1, *([1] * (x.ndim - 2)))
    return torch.cat([x, y.expand(b, 1, *x.shape[2:])], 1)


class EqConv(nn.Module):
    """Convolution with the equalised learning rate: w ~ N(0, 1), times sqrt(2 / fan_in)."""

    def __init__(self, dims: int, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.dims = dims
        self.weight = nn.Parameter(torch.randn(cout, cin, *([kernel] * dims)))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale = math.sqrt(2.0 / (cin * kernel ** dims))
        self.pad = kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv2d if self.dims == 2 else F.conv3d
        return conv(x, self.weight * self.scale, self.bias, padding=self.pad)


class EqLinear(nn.Module):
    """Linear layer with the equalised learning rate."""

    def __init__(self, cin: int, cout: int, gain: float = math.sqrt(2.0)) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale = gain / math.sqrt(cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


def _up(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="nearest") if factor > 1 else x


def _down(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    if factor <= 1:
        return x
    return (F.avg_pool2d if x.ndim == 4 else F.avg_pool3d)(x, factor)


def _widths(width: int, n: int) -> list[int]:
    """Channels per stage: 8 x width at 4 px, halving per stage, at least ``width``."""
    return [max(width, width * 8 >> s) for s in range(n)]


class _Staged(nn.Module):
    """The active stage and fade-in alpha, set by ``PGAN.at_round`` (default: the last stage)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n_stages, self.stage, self.alpha = n, n - 1, 1.0


class PGGenerator(_Staged):
    def __init__(self, dims: int, latent: int, channels: int, size: int, width: int) -> None:
        super().__init__(stages(size))
        self.latent_dim, self.num_classes, self.dims = latent, 0, dims
        w = _widths(width, self.n_stages)
        self.w0 = w[0]
        self.first = EqLinear(latent, w[0] * 4 ** dims, gain=math.sqrt(2.0) / 4)
        self.first_conv = EqConv(dims, w[0], w[0], 3)
        self.blocks = nn.ModuleList(
            [nn.Identity()] + [nn.ModuleList([EqConv(dims, w[s - 1], w[s], 3),
                                              EqConv(dims, w[s], w[s], 3)])
                               for s in range(1, self.n_stages)])
        self.to_rgb = nn.ModuleList([EqConv(dims, w[s], channels, 1) for s in range(self.n_stages)])

    def _block(self, s: int, x: torch.Tensor) -> torch.Tensor:
        if s == 0:
            x = self.first(pixel_norm(x)).view(x.shape[0], self.w0, *([4] * self.dims))
            x = pixel_norm(F.leaky_relu(x, LRELU))
            return pixel_norm(F.leaky_relu(self.first_conv(x), LRELU))
        x = _up(x)
        for conv in self.blocks[s]:
            x = pixel_norm(F.leaky_relu(conv(x), LRELU))
        return x

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images at the active stage's resolution, 4 * 2**stage."""
        x = self._block(0, z)
        for s in range(1, self.stage):
            x = self._block(s, x)
        if self.stage == 0:
            return self.to_rgb[0](x)
        new = self.to_rgb[self.stage](self._block(self.stage, x))
        if self.alpha >= 1.0:
            return new
        return self.alpha * new + (1 - self.alpha) * _up(self.to_rgb[self.stage - 1](x))


class PGDiscriminator(_Staged):
    def __init__(self, dims: int, channels: int, size: int, width: int) -> None:
        super().__init__(stages(size))
        self.dims, self.size, self.group = dims, size, 4
        w = _widths(width, self.n_stages)
        self.from_rgb = nn.ModuleList([EqConv(dims, channels, w[s], 1)
                                       for s in range(self.n_stages)])
        self.blocks = nn.ModuleList(
            [nn.Identity()] + [nn.ModuleList([EqConv(dims, w[s], w[s], 3),
                                              EqConv(dims, w[s], w[s - 1], 3)])
                               for s in range(1, self.n_stages)])
        self.last_conv = EqConv(dims, w[0] + 1, w[0], 3)
        self.last_fc = EqLinear(w[0] * 4 ** dims, w[0])
        self.out = EqLinear(w[0], 1, gain=1.0)

    def _block(self, s: int, x: torch.Tensor) -> torch.Tensor:
        for conv in self.blocks[s]:
            x = F.leaky_relu(conv(x), LRELU)
        return _down(x)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """One logit per image; images larger than the active resolution are pooled down to it."""
        res = 4 * 2 ** self.stage
        x = _down(x, x.shape[-1] // res)
        h = F.leaky_relu(self.from_rgb[self.stage](x), LRELU)
        if self.stage > 0:
            h = self._block(self.stage, h)
            if self.alpha < 1.0:
                old = F.leaky_relu(self.from_rgb[self.stage - 1](_down(x)), LRELU)
                h = self.alpha * h + (1 - self.alpha) * old
        for s in range(self.stage - 1, 0, -1):
            h = self._block(s, h)
        h = F.leaky_relu(self.last_conv(minibatch_stddev(h, self.group)), LRELU)
        h = F.leaky_relu(self.last_fc(h.flatten(1)), LRELU)
        return self.out(h).squeeze(1)


class PGAN(FamilyBase):
    """Progressive growing GAN (Karras et al. 2017), 2D or 3D, stage schedule from the round."""

    name = "pgan"
    components = ("generator", "discriminator")
    batch_keys = ("image",)
    task = "generation"
    data_layout = "image"
    supports = frozenset({DP})
    lacks = {
        AUGMENT: "its discriminator's input resolution changes with the stage; DiffAugment of "
                 "the blended reals is not implemented",
        R1: "no R1 penalty in its discriminator step",
        UA_GAN: "UA-GAN's coordinator trains the generator without the round's stage and "
                "fade-in alpha",
    }

    def build(self, cfg: ModelConfig) -> Nets:
        dims, c, s, w = cfg.spatial_dims, cfg.channels, cfg.image_size, cfg.width
        return {"generator": PGGenerator(dims, cfg.latent_dim, c, s, w),
                "discriminator": PGDiscriminator(dims, c, s, w)}

    def at_round(self, nets: Nets, cfg: ModelConfig, server_round: int) -> None:
        """Every net at the round's (stage, alpha) (``schedule``)."""
        stage, alpha = schedule(server_round, cfg.pgan_rounds_per_stage, cfg.image_size)
        for net in nets.values():
            if isinstance(net, _Staged):
                net.stage, net.alpha = stage, alpha

    @staticmethod
    def reals(image: torch.Tensor, d: PGDiscriminator) -> torch.Tensor:
        """Real images at the active resolution, blended during a fade-in like G's output."""
        x = _down(image, image.shape[-1] // (4 * 2 ** d.stage))
        if d.stage > 0 and d.alpha < 1.0:
            x = d.alpha * x + (1 - d.alpha) * _up(_down(x))
        return x

    def train_step(
        self, batch: dict[str, torch.Tensor], nets: Nets, opts: Optimizers, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        if ctx.dp is not None:
            return self.dp_step(nets, opts, ctx)
        g, d = nets["generator"], nets["discriminator"]
        real = self.reals(batch["image"], d)
        b = real.shape[0]
        z = torch.randn(b, g.latent_dim, device=real.device)
        ones = torch.ones(b, device=real.device)
        zeros = torch.zeros_like(ones)
        with ctx.autocast():
            fake = g(z)
            d_real, d_fake = d(real).float(), d(fake.detach()).float()
            loss_d = (bce(d_real, ones) + bce(d_fake, zeros)
                      + ctx.prox_term("discriminator", d))
        ctx.step(loss_d, opts["discriminator"])
        with ctx.autocast():
            loss_g = bce(d(fake).float(), ones) + ctx.prox_term("generator", g)
        ctx.step(loss_g, opts["generator"])
        return {"loss-g": loss_g.detach(), "loss-d": loss_d.detach(),
                "d-real": torch.sigmoid(d_real.detach()).mean(),
                "d-fake": torch.sigmoid(d_fake.detach()).mean()}

    def dp_plan(self, data: Mapping[str, torch.Tensor], batch_size: int) -> tuple[float, int]:
        """One release per step: D's real term (G sees only fakes through the released D)."""
        return sample_rate(batch_size, self.dp_records(data)), 1

    def dp_step(self, nets: Nets, opts: Optimizers, ctx: StepContext) -> dict[str, torch.Tensor]:
        """dcgan's DP path at the active stage; D's stddev feature over groups of one record."""
        g, d, dp = nets["generator"], nets["discriminator"], ctx.dp
        records = dp.poisson(("image",))
        b = dp.batch_size
        z = dp.randn(b, g.latent_dim)
        ones, zeros = torch.ones(b, device=z.device), torch.zeros(b, device=z.device)

        def real_term(ex: dict[str, torch.Tensor]) -> torch.Tensor:
            logit = d(self.reals(ex["image"], d)).float()
            return bce(logit, torch.ones_like(logit))

        group, d.group = d.group, 1
        try:
            with ctx.autocast():
                fake = g(z)
                d_fake = d(fake.detach()).float()
                public = bce(d_fake, zeros) + ctx.prox_term("discriminator", d)
                dp.step({"discriminator": d}, [(real_term, records)], [opts["discriminator"]],
                        public)
            with ctx.autocast():
                loss_g = bce(d(fake).float(), ones) + ctx.prox_term("generator", g)
            ctx.step(loss_g, opts["generator"])
        finally:
            d.group = group
        return {"loss-g": loss_g.detach(), "d-fake": torch.sigmoid(d_fake.detach()).mean()}

    @torch.no_grad()
    def sample(self, nets: Nets, noise: torch.Tensor, labels: torch.Tensor | None = None
               ) -> torch.Tensor:
        """G at its stage, upsampled (nearest) to the run's image size, clamped to [-1, 1]."""
        g = nets["generator"]
        out = eval_forward(g, noise)
        full = 4 * 2 ** (g.n_stages - 1)
        return _up(out, full // out.shape[-1]).clamp(-1.0, 1.0)
