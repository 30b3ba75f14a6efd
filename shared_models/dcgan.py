"""DCGAN (Radford et al. 2016) for single-modality slice synthesis: components G and D.

Loss: the non-saturating GAN loss of Goodfellow et al. 2014 (sec. 3), on logits:
D maximises log D(x) + log(1 - D(G(z))); G maximises log D(G(z)).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits as bce
from torch.nn.functional import cross_entropy as ce

from .config import ModelConfig
from .capabilities import AUGMENT, COLOUR, DP, R1, UA_GAN
from .dp import per_sample_norms, sample_rate
from .family import FamilyBase, Nets, Optimizers, StepContext, eval_forward
from .networks import DCGANDiscriminator, DCGANGenerator, init_dcgan_weights

# AC-GAN's class term beside the adversarial one (Odena et al. 2017 weigh them alike)
AC_WEIGHT = 1.0


class DCGAN(FamilyBase):
    """Unconditional (or, with ``num_classes``, projection-conditional) DCGAN."""

    name = "dcgan"
    components = ("generator", "discriminator")
    batch_keys = ("image",)
    optional_keys = ("label",)
    task = "generation"
    data_layout = "image"
    supports = frozenset({AUGMENT, R1, DP, UA_GAN, COLOUR})  # cdcgan inherits them

    def build(self, cfg: ModelConfig) -> Nets:
        cond = cfg.conditioning_set
        g = DCGANGenerator(cfg.spatial_dims, cfg.latent_dim, cfg.channels, cfg.image_size,
                           cfg.width, cfg.num_classes, class_norm="cbn" in cond)
        d = DCGANDiscriminator(cfg.spatial_dims, cfg.channels, cfg.image_size, cfg.width,
                               cfg.num_classes, multiscale="multiscale" in cond,
                               aux_classifier="acgan" in cond)
        nets = per_sample_norms({"generator": g, "discriminator": d}, cfg.norm)
        init_dcgan_weights(g)
        init_dcgan_weights(d)
        return nets

    def dp_plan(self, data: Mapping[str, torch.Tensor], batch_size: int) -> tuple[float, int]:
        """One release per step: D's real term (G sees only fakes through the released D)."""
        return sample_rate(batch_size, self.dp_records(data)), 1

    def dp_step(self, nets: Nets, opts: Optimizers, ctx: StepContext) -> dict[str, torch.Tensor]:
        """The DP path of ``train_step`` (shared_models.dp): D's real term per record, clipped and
        noised; its fake term and the generator's step are post-processing."""
        g, d, dp = nets["generator"], nets["discriminator"], ctx.dp
        keys = ("image", "label") if g.num_classes else ("image",)
        real = dp.poisson(keys)
        b = dp.batch_size
        z = dp.randn(b, g.latent_dim)
        # fake labels uniform over the classes: never copied from the sampled records
        labels = dp.randint(g.num_classes, b) if g.num_classes else None
        ones, zeros = torch.ones(b, device=z.device), torch.zeros(b, device=z.device)

        def real_term(ex: dict[str, torch.Tensor]) -> torch.Tensor:
            if d.classifier is not None:  # AC-GAN: the class term is a real-data term too
                logit, cls = d.classify(ex["image"], ex["label"])
                return bce(logit.float(), torch.ones_like(logit.float())) + AC_WEIGHT * ce(
                    cls.float(), ex["label"])
            logit = d(ex["image"], ex.get("label")).float()
            return bce(logit, torch.ones_like(logit))

        with ctx.autocast():
            fake = g(z, labels)
            d_fake = d(fake.detach(), labels)
            public = bce(d_fake.float(), zeros) + ctx.prox_term("discriminator", d)
            dp.step({"discriminator": d}, [(real_term, real)], [opts["discriminator"]], public)
        with ctx.autocast():
            loss_g = _generator_loss(d, fake, labels, ones) + ctx.prox_term("generator", g)
        ctx.step(loss_g, opts["generator"])
        # only what is computed from released weights and fakes: a loss on the sampled records
        # would be a non-private statistic of them
        return {"loss-g": loss_g.detach(),
                "d-fake": torch.sigmoid(d_fake.detach().float()).mean()}

    def train_step(
        self, batch: dict[str, torch.Tensor], nets: Nets, opts: Optimizers, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        if ctx.dp is not None:
            return self.dp_step(nets, opts, ctx)
        g: nn.Module = nets["generator"]
        d: nn.Module = nets["discriminator"]
        real = batch["image"]
        labels = batch.get("label")
        z = torch.randn(real.shape[0], g.latent_dim, device=real.device)
        ones = torch.ones(real.shape[0], device=real.device)
        zeros = torch.zeros_like(ones)

        # Discriminator: real -> 1, fake -> 0 (fake detached: G is not updated here).
        # ctx.small_data: D sees real and fake through the same DiffAugment policy; R1 on reals.
        aug = ctx.small_data
        with ctx.autocast():
            fake = g(z, labels)
            real_seen = aug.real_view(real)
            if d.classifier is not None:
                # AC-GAN: D learns the class from real slices only (a fake's class is what G
                # is asked to make, not evidence); G below is scored by that classifier
                d_real, cls_real = d.classify(real_seen, labels)
                class_term = AC_WEIGHT * ce(cls_real.float(), labels)
            else:
                d_real, class_term = d(real_seen, labels), 0.0
            d_fake = d(aug.view(fake.detach()), labels)
            loss_d = bce(d_real.float(), ones) + bce(d_fake.float(), zeros) + class_term
            loss_d = loss_d + aug.r1(d_real, real_seen) + ctx.prox_term("discriminator", d)
        ctx.step(loss_d, opts["discriminator"])

        # Generator: non-saturating loss, fake -> 1 through the updated D (and the augmentation).
        with ctx.autocast():
            loss_g = (_generator_loss(d, aug.view(fake), labels, ones)
                      + ctx.prox_term("generator", g))
        ctx.step(loss_g, opts["generator"])

        return {
            "loss-g": loss_g.detach(),
            "loss-d": loss_d.detach(),
            "d-real": torch.sigmoid(d_real.detach().float()).mean(),
            "d-fake": torch.sigmoid(d_fake.detach().float()).mean(),
        }

    @torch.no_grad()
    def sample(self, nets: Nets, noise: torch.Tensor, labels: torch.Tensor | None = None
               ) -> torch.Tensor:
        return eval_forward(nets["generator"], noise, labels)


def _generator_loss(d: nn.Module, fake: torch.Tensor, labels: torch.Tensor | None,
                    ones: torch.Tensor) -> torch.Tensor:
    """Non-saturating loss through D, plus (AC-GAN) D's classifier's cross-entropy on the
    intended class: G is rewarded for slices D reads as the class asked for."""
    if d.classifier is None or labels is None:
        return bce(d(fake, labels).float(), ones)
    logit, cls = d.classify(fake, labels)
    return bce(logit.float(), ones) + AC_WEIGHT * ce(cls.float(), labels)
