"""WGAN-GP (Gulrajani et al. 2017): a Wasserstein critic with a gradient penalty.

Critic loss (eq. 3): L = E[D(x~)] - E[D(x)] + lambda * E[(||grad_x^ D(x^)||_2 - 1)^2], with
x^ = eps x + (1 - eps) x~ on random lines between real and generated samples, lambda = 10.
Generator loss: -E[D(G(z))]. ``n_critic`` = 5 critic updates per generator update and Adam with
beta1 = 0, beta2 = 0.9 (Algorithm 1); the learning rates come from ``TrainConfig``. The critic has no
batch norm (it would make the penalty depend on the other samples of the batch, sec. 4): layer norm
instead. Components are named as in DCGAN (``generator``, ``discriminator``), so every strategy and
preset works unchanged.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .config import ModelConfig, TrainConfig
from .capabilities import AUGMENT, DP, R1
from .dp import per_sample_norms, sample_rate
from .family import FamilyBase, Nets, Optimizers, StepContext, eval_forward
from .networks import LAYER_NORM, DCGANDiscriminator, DCGANGenerator, init_dcgan_weights

GP_WEIGHT = 10.0  # lambda of eq. 3
N_CRITIC = 5  # critic iterations per generator iteration (Algorithm 1)
ADAM_BETAS = (0.0, 0.9)  # Algorithm 1


def gradient_penalty(critic: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor
                     ) -> torch.Tensor:
    """E[(||grad D(x^)||_2 - 1)^2] at random interpolates x^ (eq. 3), computed in fp32."""
    eps = torch.rand((real.shape[0],) + (1,) * (real.ndim - 1), device=real.device)
    mixed = (eps * real.float() + (1 - eps) * fake.float()).requires_grad_(True)
    with torch.autocast(device_type=real.device.type, enabled=False):
        out = critic(mixed)
    (grad,) = torch.autograd.grad(out.sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


class WGANGP(FamilyBase):
    name = "wgan-gp"
    components = ("generator", "discriminator")
    batch_keys = ("image",)
    task = "generation"
    data_layout = "image"
    supports = frozenset({AUGMENT, DP})
    lacks = {R1: "it has its own gradient penalty"}

    def __init__(self, n_critic: int = N_CRITIC, gp_weight: float = GP_WEIGHT) -> None:
        if n_critic < 1:
            raise ValueError(f"n_critic must be >= 1, got {n_critic}")
        self.n_critic = n_critic
        self.gp_weight = gp_weight

    def build(self, cfg: ModelConfig) -> Nets:
        if cfg.num_classes:
            raise ValueError("family 'wgan-gp' is unconditional: set model num_classes to 0")
        g = DCGANGenerator(cfg.spatial_dims, cfg.latent_dim, cfg.channels, cfg.image_size,
                           cfg.width)
        d = DCGANDiscriminator(cfg.spatial_dims, cfg.channels, cfg.image_size, cfg.width,
                               norm=LAYER_NORM)
        nets = per_sample_norms({"generator": g, "discriminator": d}, cfg.norm)
        init_dcgan_weights(g)
        init_dcgan_weights(d)
        return nets

    def dp_plan(self, data: Mapping[str, torch.Tensor], batch_size: int) -> tuple[float, int]:
        """``n_critic`` releases per step: every critic update (its real term and the gradient
        penalty at real/fake interpolates), each on its own Poisson sample."""
        return sample_rate(batch_size, self.dp_records(data)), self.n_critic

    def dp_step(self, nets: Nets, opts: Optimizers, ctx: StepContext) -> dict[str, torch.Tensor]:
        """The DP path of ``train_step`` (shared_models.dp): per record, -D(x) + lambda * the
        penalty at its interpolate, clipped and noised; E[D(G(z))] and G's step are public."""
        from torch.func import grad as func_grad

        g, d, dp = nets["generator"], nets["discriminator"], ctx.dp
        b = dp.batch_size

        def critic_term(ex: dict[str, torch.Tensor]) -> torch.Tensor:
            x, fake, eps = ex["image"].float(), ex["fake"].float(), ex["eps"]
            mixed = eps * x + (1 - eps) * fake
            gx = func_grad(lambda m: d(m).float().sum())(mixed)
            penalty = (gx.flatten(1).norm(2, dim=1) - 1) ** 2
            return (-d(x).float() + self.gp_weight * penalty).mean()

        for _ in range(self.n_critic):
            real = dp.poisson(("image",))
            n = len(real["image"])
            with torch.no_grad():
                real["fake"] = g(dp.randn(n, g.latent_dim)).float()
                fake = g(dp.randn(b, g.latent_dim))
            real["eps"] = dp.rand(n, *([1] * (real["image"].ndim - 1)))
            public = d(fake).float().mean() + ctx.prox_term("discriminator", d)
            dp.step({"discriminator": d}, [(critic_term, real)], [opts["discriminator"]], public)
        d.requires_grad_(False)
        try:
            loss_g = -d(g(dp.randn(b, g.latent_dim))).float().mean() + ctx.prox_term("generator", g)
            ctx.step(loss_g, opts["generator"])
        finally:
            d.requires_grad_(True)
        return {"loss-g": loss_g.detach()}  # the critic's terms are statistics of the records

    def adam_betas(self, train: TrainConfig) -> tuple[float, float]:
        return ADAM_BETAS  # the paper's (0, 0.9), whatever TrainConfig says

    def draw(self, data: Mapping[str, torch.Tensor], batch_size: int,
             balanced: bool = False) -> dict[str, torch.Tensor]:
        """``n_critic`` independent batches stacked along dim 0: one per critic update."""
        images = data["image"]
        n = len(images)
        if n == 0:
            raise ValueError("family 'wgan-gp': no training examples")
        idx = torch.randint(n, (self.n_critic * min(batch_size, n),), device=images.device)
        return {"image": images[idx]}

    def train_step(
        self, batch: dict[str, torch.Tensor], nets: Nets, opts: Optimizers, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        """``n_critic`` critic updates on the batch's chunks, then one generator update."""
        if ctx.dp is not None:
            return self.dp_step(nets, opts, ctx)
        g, d = nets["generator"], nets["discriminator"]
        real_all = batch["image"]
        if real_all.shape[0] % self.n_critic == 0 and real_all.shape[0] >= self.n_critic:
            chunks = list(real_all.chunk(self.n_critic))
        else:  # a batch not drawn by ``draw``: every critic update sees all of it
            chunks = [real_all] * self.n_critic
        for real in chunks:
            z = torch.randn(real.shape[0], g.latent_dim, device=real.device)
            with ctx.autocast():
                with torch.no_grad():
                    fake = g(z)
                # DiffAugment (ctx.small_data): the critic sees both through the same policy
                real, fake = ctx.small_data.view(real), ctx.small_data.view(fake)
                d_real = d(real).float().mean()
                d_fake = d(fake).float().mean()
            gp = gradient_penalty(d, real, fake)
            loss_d = d_fake - d_real + self.gp_weight * gp + ctx.prox_term("discriminator", d)
            ctx.step(loss_d, opts["discriminator"])

        b = chunks[-1].shape[0]
        z = torch.randn(b, g.latent_dim, device=real_all.device)
        d.requires_grad_(False)
        try:
            with ctx.autocast():
                loss_g = (-d(ctx.small_data.view(g(z))).float().mean()
                          + ctx.prox_term("generator", g))
            ctx.step(loss_g, opts["generator"])
        finally:
            d.requires_grad_(True)
        return {
            "loss-g": loss_g.detach(),
            "loss-d": loss_d.detach(),
            "loss-gp": gp.detach(),
            # the critic's estimate of the Wasserstein-1 distance (the paper's progress curve)
            "w-distance": (d_real - d_fake).detach(),
        }

    @torch.no_grad()
    def sample(self, nets: Nets, noise: torch.Tensor, labels: torch.Tensor | None = None
               ) -> torch.Tensor:
        return eval_forward(nets["generator"], noise)
