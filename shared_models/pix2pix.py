"""pix2pix (Isola et al. 2017): paired translation a -> b with a conditional PatchGAN.

Objective (eq. 4): G* = arg min_G max_D L_cGAN(G, D) + lambda * L_L1(G), lambda = 100, where
L_cGAN (eq. 1) = E[log D(a, b)] + E[log(1 - D(a, G(a)))] with D seeing the input concatenated to
the real or translated image, and L_L1 (eq. 3) = E[||b - G(a)||_1]. D's loss is halved (sec. 3.3),
G uses the non-saturating form. Losses work on logits (stable under fp16). No noise input: as in
the paper, dropout would be the only stochasticity, and it is off here (small local batches).
Batches hold paired ``a`` (input) and ``b`` (target) tensors, drawn with one shared index.

``gradient-loss`` w (``TrainConfig``, carried in ``StepContext``) adds w x L_GDL(G(a), b), the
image-gradient-difference loss of Nie et al. 2017 (``shared_models.losses``), to G's loss, 2D and
3D; under DP-SGD it is a term of each pair's own generator loss, clipped and noised with it.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch.nn.functional import binary_cross_entropy_with_logits as bce

from .config import ModelConfig
from .capabilities import AUGMENT, COLOUR, DP, GRADIENT_LOSS, R1
from .dp import per_sample_norms, sample_rate
from .family import FamilyBase, Nets, Optimizers, StepContext, eval_forward
from .losses import gradient_difference
from .translation_networks import PatchGAN, UNetGenerator, init_normal, set_requires_grad

L1_WEIGHT = 100.0  # lambda of eq. 4


class Pix2Pix(FamilyBase):
    name = "pix2pix"
    components = ("generator", "discriminator")
    batch_keys = ("a", "b")
    task = "translation"
    data_layout = "paired"
    supports = frozenset({AUGMENT, R1, DP, GRADIENT_LOSS, COLOUR})  # augment/R1: each pair as one image

    def __init__(self, l1_weight: float = L1_WEIGHT) -> None:
        self.l1_weight = l1_weight

    def build(self, cfg: ModelConfig) -> Nets:
        g = UNetGenerator(cfg.spatial_dims, cfg.channels, cfg.channels, cfg.image_size, cfg.width)
        d = PatchGAN(cfg.spatial_dims, 2 * cfg.channels, cfg.image_size, cfg.width)
        nets = per_sample_norms({"generator": g, "discriminator": d}, cfg.norm)
        init_normal(g)
        init_normal(d)
        return nets

    def dp_plan(self, data: Mapping[str, torch.Tensor], batch_size: int) -> tuple[float, int]:
        """Two releases per step: D (both its terms see the real input a) and G (adversarial and
        L1 terms see a and b), each on its own Poisson sample of the pairs."""
        return sample_rate(batch_size, self.dp_records(data)), 2

    def dp_step(self, nets: Nets, opts: Optimizers, ctx: StepContext) -> dict[str, torch.Tensor]:
        """The DP path of ``train_step`` (shared_models.dp): both updates are per-pair losses,
        clipped and noised; only FedProx is public."""
        g, d, dp = nets["generator"], nets["discriminator"], ctx.dp

        def d_term(ex: dict[str, torch.Tensor]) -> torch.Tensor:
            a, b = ex["a"], ex["b"]
            with torch.no_grad():
                fake = g(a)
            real_logit = d(torch.cat([a, b], 1)).float()
            fake_logit = d(torch.cat([a, fake], 1)).float()
            return 0.5 * (bce(real_logit, torch.ones_like(real_logit))
                          + bce(fake_logit, torch.zeros_like(fake_logit)))

        def g_term(ex: dict[str, torch.Tensor]) -> torch.Tensor:
            a, b = ex["a"], ex["b"]
            fake = g(a)
            pred = d(torch.cat([a, fake], 1)).float()
            return (bce(pred, torch.ones_like(pred))
                    + self.l1_weight * (fake.float() - b.float()).abs().mean()
                    + self._gradient_term(fake, b, ctx))

        with ctx.autocast():
            dp.step({"discriminator": d}, [(d_term, dp.poisson(("a", "b")))],
                    [opts["discriminator"]], ctx.prox_term("discriminator", d))
        set_requires_grad([d], False)
        try:
            with ctx.autocast():
                dp.step({"generator": g}, [(g_term, dp.poisson(("a", "b")))],
                        [opts["generator"]], ctx.prox_term("generator", g))
        finally:
            set_requires_grad([d], True)
        return {}  # every loss here is a statistic of the sampled pairs: none travels

    def train_step(
        self, batch: dict[str, torch.Tensor], nets: Nets, opts: Optimizers, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        if ctx.dp is not None:
            return self.dp_step(nets, opts, ctx)
        g, d = nets["generator"], nets["discriminator"]
        a, b = batch["a"], batch["b"]

        # D: (a, b) -> real, (a, G(a)) -> fake; 0.5 * the sum, as in sec. 3.3.
        # ctx.small_data: each (a, b) pair is augmented as one image (the same shift and cutout
        # on both channels), real and fake alike; R1 on the real pairs.
        aug = ctx.small_data
        with ctx.autocast():
            fake = g(a)
            real_seen = aug.real_view(torch.cat([a, b], 1))
            d_real = d(real_seen).float()
            d_fake = d(aug.view(torch.cat([a, fake.detach()], 1))).float()
            loss_d = 0.5 * (bce(d_real, torch.ones_like(d_real))
                            + bce(d_fake, torch.zeros_like(d_fake)))
            loss_d = loss_d + aug.r1(d_real, real_seen) + ctx.prox_term("discriminator", d)
        ctx.step(loss_d, opts["discriminator"])

        # G: fool the updated D + lambda * L1 to the target (eq. 4).
        set_requires_grad([d], False)
        try:
            with ctx.autocast():
                pred = d(aug.view(torch.cat([a, fake], 1))).float()
                loss_adv = bce(pred, torch.ones_like(pred))
                loss_l1 = (fake.float() - b.float()).abs().mean()
                loss_grad = self._gradient_term(fake, b, ctx)
                loss_g = (loss_adv + self.l1_weight * loss_l1 + loss_grad
                          + ctx.prox_term("generator", g))
            ctx.step(loss_g, opts["generator"])
        finally:
            set_requires_grad([d], True)
        out = {
            "loss-g": loss_g.detach(),
            "loss-d": loss_d.detach(),
            "loss-l1": loss_l1.detach(),
            "d-real": torch.sigmoid(d_real.detach()).mean(),
            "d-fake": torch.sigmoid(d_fake.detach()).mean(),
        }
        if ctx.gradient_loss > 0:
            out["loss-gradient"] = loss_grad.detach()
        return out

    @staticmethod
    def _gradient_term(fake: torch.Tensor, b: torch.Tensor, ctx: StepContext
                       ) -> torch.Tensor | float:
        """``gradient-loss`` x L_GDL(G(a), b); 0 (no work) when the setting is off."""
        if ctx.gradient_loss <= 0:
            return 0.0
        return ctx.gradient_loss * gradient_difference(fake, b, ctx.gradient_loss_power)

    @torch.no_grad()
    def sample(self, nets: Nets, noise: torch.Tensor, labels: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Translate the input batch ``noise`` (domain a images, in [-1, 1]) to domain b."""
        return eval_forward(nets["generator"], noise)
