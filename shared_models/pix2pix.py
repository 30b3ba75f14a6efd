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
``perceptual-loss`` w adds w x L_perc(G(a), b) (Zhao et al. 2018; ``shared_models.perceptual``)
in the frozen feature network the hospital supplies (``StepContext.perceptual_net``), likewise a
term of each pair's own loss under DP-SGD.

``cascade = k > 1`` (``ModelConfig``; Nie et al. 2017's auto-context, Wei et al. 2018's cascade
of cGANs): k UNets, o_1 = G_1(a), o_j = G_j(cat(a, o_{j-1})), each stage with its own conditional
PatchGAN D_j judging (a, b) against (a, o_j) (``CascadeGenerator`` / ``CascadeDiscriminator`` in
``shared_models.translation_networks``). They stay the two components ``generator`` and
``discriminator`` (the stages are ModuleLists inside them), so every preset shares and
aggregates each stage by its role's rule, and ``sample`` (``fedsynth sample --input``) runs the
whole cascade. The cascade 1 networks are today's, state dicts unchanged.

- ``cascade-training = "end-to-end"``: every step trains every stage, the losses summed over the
  stages' outputs (deep supervision): D = sum_j 0.5 (BCE(D_j(a, b), 1) + BCE(D_j(a, o_j), 0)),
  G = sum_j [BCE(D_j(a, o_j), 1) + lambda L1(o_j, b) + gradient term]; o_j's gradient reaches the
  earlier stages through its input.
- ``"stagewise"``: the round the coordinator signed names the one stage s trained
  (``TrainConfig.cascade_stage``, ``StepContext.cascade_stage``): stages < s run without
  gradients, their parameters and D_1..D_{s-1} do not require grad, so they stay exactly as
  received; stages > s are not run. Every hospital trains the same stage in a round.

DP-SGD: the same per-pair losses, summed over the trained stages, in each of the two releases
(D, then G); frozen stages require no grad, so they get neither clipping nor noise. ``loss-l1``
(and ``d-real`` / ``d-fake``) are the last trained stage's.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch.nn.functional import binary_cross_entropy_with_logits as bce

from .config import ModelConfig
from .capabilities import AUGMENT, CASCADE, COLOUR, DP, GRADIENT_LOSS, PERCEPTUAL, R1
from .dp import per_sample_norms, sample_rate
from .family import FamilyBase, Nets, Optimizers, StepContext, eval_forward
from .losses import gradient_difference
from .perceptual import perceptual_loss
from .translation_networks import (CascadeDiscriminator, CascadeGenerator, PatchGAN, UNetGenerator,
                                   init_normal, set_requires_grad)

L1_WEIGHT = 100.0  # lambda of eq. 4


class Pix2Pix(FamilyBase):
    name = "pix2pix"
    components = ("generator", "discriminator")
    batch_keys = ("a", "b")
    task = "translation"
    data_layout = "paired"
    # augment/R1: each pair as one image
    supports = frozenset({AUGMENT, R1, DP, GRADIENT_LOSS, COLOUR, CASCADE, PERCEPTUAL})

    def __init__(self, l1_weight: float = L1_WEIGHT) -> None:
        self.l1_weight = l1_weight

    def build(self, cfg: ModelConfig) -> Nets:
        k = getattr(cfg, "cascade", 1)
        if k > 1:
            g: torch.nn.Module = CascadeGenerator(k, cfg.spatial_dims, cfg.channels,
                                                  cfg.image_size, cfg.width)
            d: torch.nn.Module = CascadeDiscriminator(k, cfg.spatial_dims, 2 * cfg.channels,
                                                      cfg.image_size, cfg.width)
        else:
            g = UNetGenerator(cfg.spatial_dims, cfg.channels, cfg.channels, cfg.image_size,
                              cfg.width)
            d = PatchGAN(cfg.spatial_dims, 2 * cfg.channels, cfg.image_size, cfg.width)
        nets = per_sample_norms({"generator": g, "discriminator": d}, cfg.norm)
        init_normal(g)
        init_normal(d)
        return nets

    # -- the cascade's stages (a single stage is the cascade of one) --------------------------

    @staticmethod
    def _stages(nets: Nets) -> int:
        g = nets["generator"]
        return len(g.stages) if isinstance(g, CascadeGenerator) else 1

    def _trained(self, nets: Nets, ctx: StepContext) -> list[int]:
        """The 0-based stages this step trains: all, or stagewise the round's one."""
        k = self._stages(nets)
        s = ctx.cascade_stage
        return list(range(k)) if s is None else [min(s, k) - 1]

    @staticmethod
    def _outputs(g: torch.nn.Module, a: torch.Tensor, trained: list[int]) -> list[torch.Tensor]:
        """o_1 .. o_{last trained}; the stages before the first trained run without gradients."""
        if not isinstance(g, CascadeGenerator):
            return [g(a)]
        return g.outputs(a, upto=trained[-1] + 1, frozen=trained[0])

    @staticmethod
    def _judge(d: torch.nn.Module, j: int, x: torch.Tensor) -> torch.Tensor:
        return d(x, j) if isinstance(d, CascadeDiscriminator) else d(x)

    def _frozen(self, nets: Nets, trained: list[int]) -> list[torch.nn.Module]:
        """The stage modules (G's and D's) this step does not train."""
        if self._stages(nets) == 1:
            return []
        return [net.stages[j] for net in (nets["generator"], nets["discriminator"])
                for j in range(len(net.stages)) if j not in trained]

    # -- DP-SGD ----------------------------------------------------------------------------

    def dp_plan(self, data: Mapping[str, torch.Tensor], batch_size: int) -> tuple[float, int]:
        """Two releases per step: D (both its terms see the real input a) and G (adversarial and
        L1 terms see a and b), each on its own Poisson sample of the pairs; a cascade's stages
        are summed inside each release."""
        return sample_rate(batch_size, self.dp_records(data)), 2

    def dp_step(self, nets: Nets, opts: Optimizers, ctx: StepContext) -> dict[str, torch.Tensor]:
        """The DP path of ``train_step`` (shared_models.dp): both updates are per-pair losses,
        clipped and noised; only FedProx is public."""
        g, d, dp = nets["generator"], nets["discriminator"], ctx.dp
        trained = self._trained(nets, ctx)

        def d_term(ex: dict[str, torch.Tensor]) -> torch.Tensor:
            a, b = ex["a"], ex["b"]
            with torch.no_grad():
                fakes = self._outputs(g, a, trained)
            total = 0.0
            for j in trained:
                real_logit = self._judge(d, j, torch.cat([a, b], 1)).float()
                fake_logit = self._judge(d, j, torch.cat([a, fakes[j]], 1)).float()
                total = total + 0.5 * (bce(real_logit, torch.ones_like(real_logit))
                                       + bce(fake_logit, torch.zeros_like(fake_logit)))
            return total

        def g_term(ex: dict[str, torch.Tensor]) -> torch.Tensor:
            a, b = ex["a"], ex["b"]
            fakes = self._outputs(g, a, trained)
            total = 0.0
            for j in trained:
                pred = self._judge(d, j, torch.cat([a, fakes[j]], 1)).float()
                total = total + (bce(pred, torch.ones_like(pred))
                                 + self.l1_weight * (fakes[j].float() - b.float()).abs().mean()
                                 + self._gradient_term(fakes[j], b, ctx)
                                 + self._perceptual_term(fakes[j], b, ctx))
            return total

        frozen = self._frozen(nets, trained)
        set_requires_grad(frozen, False)
        try:
            with ctx.autocast():
                dp.step({"discriminator": d}, [(d_term, dp.poisson(("a", "b")))],
                        [opts["discriminator"]], ctx.prox_term("discriminator", d))
            set_requires_grad([d], False)
            with ctx.autocast():
                dp.step({"generator": g}, [(g_term, dp.poisson(("a", "b")))],
                        [opts["generator"]], ctx.prox_term("generator", g))
        finally:
            set_requires_grad([d, g], True)
        return {}  # every loss here is a statistic of the sampled pairs: none travels

    # -- the step --------------------------------------------------------------------------

    def train_step(
        self, batch: dict[str, torch.Tensor], nets: Nets, opts: Optimizers, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        if ctx.dp is not None:
            return self.dp_step(nets, opts, ctx)
        g, d = nets["generator"], nets["discriminator"]
        a, b = batch["a"], batch["b"]
        trained = self._trained(nets, ctx)
        frozen = self._frozen(nets, trained)

        # D: (a, b) -> real, (a, G(a)) -> fake; 0.5 * the sum, as in sec. 3.3 (per trained stage).
        # ctx.small_data: each (a, b) pair is augmented as one image (the same shift and cutout
        # on both channels), real and fake alike; R1 on the real pairs.
        aug = ctx.small_data
        set_requires_grad(frozen, False)
        try:
            with ctx.autocast():
                fakes = self._outputs(g, a, trained)
                real_seen = aug.real_view(torch.cat([a, b], 1))
                loss_d = 0.0
                for j in trained:
                    d_real = self._judge(d, j, real_seen).float()
                    d_fake = self._judge(d, j, aug.view(torch.cat([a, fakes[j].detach()], 1))
                                         ).float()
                    loss_d = loss_d + 0.5 * (bce(d_real, torch.ones_like(d_real))
                                             + bce(d_fake, torch.zeros_like(d_fake)))
                    loss_d = loss_d + aug.r1(d_real, real_seen)
                loss_d = loss_d + ctx.prox_term("discriminator", d)
            ctx.step(loss_d, opts["discriminator"])

            # G: fool the updated D + lambda * L1 to the target (eq. 4), per trained stage.
            set_requires_grad([d], False)
            with ctx.autocast():
                loss_g = 0.0
                loss_grad = 0.0
                loss_perc = 0.0
                for j in trained:
                    pred = self._judge(d, j, aug.view(torch.cat([a, fakes[j]], 1))).float()
                    loss_l1 = (fakes[j].float() - b.float()).abs().mean()
                    grad_j = self._gradient_term(fakes[j], b, ctx)
                    perc_j = self._perceptual_term(fakes[j], b, ctx)
                    loss_grad = loss_grad + grad_j
                    loss_perc = loss_perc + perc_j
                    loss_g = (loss_g + bce(pred, torch.ones_like(pred))
                              + self.l1_weight * loss_l1 + grad_j + perc_j)
                loss_g = loss_g + ctx.prox_term("generator", g)
            ctx.step(loss_g, opts["generator"])
        finally:
            set_requires_grad([d, g], True)
        out = {
            "loss-g": loss_g.detach(),
            "loss-d": loss_d.detach(),
            "loss-l1": loss_l1.detach(),
            "d-real": torch.sigmoid(d_real.detach()).mean(),
            "d-fake": torch.sigmoid(d_fake.detach()).mean(),
        }
        if ctx.gradient_loss > 0:
            out["loss-gradient"] = loss_grad.detach()
        if ctx.perceptual_loss > 0:
            out["loss-perceptual"] = loss_perc.detach()
        return out

    @staticmethod
    def _perceptual_term(fake: torch.Tensor, b: torch.Tensor, ctx: StepContext
                         ) -> torch.Tensor | float:
        """``perceptual-loss`` x L_perc(G(a), b) in the hospital's feature net; 0 when off."""
        if ctx.perceptual_loss <= 0:
            return 0.0
        if ctx.perceptual_net is None:
            raise ValueError("perceptual-loss > 0 needs the hospital's perceptual-network")
        return ctx.perceptual_loss * perceptual_loss(ctx.perceptual_net, fake, b)

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
        """Translate the input batch ``noise`` (domain a images, in [-1, 1]) to domain b, through
        every stage of a cascade."""
        return eval_forward(nets["generator"], noise)
