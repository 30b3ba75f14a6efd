"""Adversarial autoencoder over label maps ("aae", Makhzani et al. 2015): stage 1 of two-stage
synthesis, a generator of new masks (Costa et al. 2017 sample vessel trees this way, then
synthesise the image from them with a mask-conditioned GAN: ``maskgan``).

Components:

- ``encoder``: a K-channel mask -> a latent code (DCGAN discriminator body, a linear head to
  ``latent_dim``);
- ``decoder``: a latent code -> K mask channels (DCGAN generator; tanh, read as the probability
  (x + 1) / 2 of each label at each pixel);
- ``latent_discriminator``: a latent code -> one logit, "drawn from the prior N(0, I)" vs
  "an encoded mask" (an MLP, as the paper's).

One step (sec. 2 of the paper): the latent discriminator learns prior samples -> real, encoded
masks -> fake; then encoder and decoder minimise the reconstruction loss (binary cross-entropy
per pixel and label) plus the encoder's adversarial term (make encoded masks look drawn from the
prior). Sampling decodes prior noise and thresholds at one half: masks in {0, 1}.
Batches hold ``mask`` of the ``masked`` layout (the image is not used).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.functional import binary_cross_entropy as bce_prob
from torch.nn.functional import binary_cross_entropy_with_logits as bce

from .config import ModelConfig
from .family import FamilyBase, Nets, Optimizers, StepContext, eval_forward
from .networks import DCGANDiscriminator, DCGANGenerator, init_dcgan_weights


class MaskEncoder(nn.Module):
    """(B, K, S, ...) masks -> (B, latent_dim) codes."""

    def __init__(self, spatial_dims: int, in_channels: int, image_size: int, width: int,
                 latent_dim: int) -> None:
        super().__init__()
        body = DCGANDiscriminator(spatial_dims, in_channels, image_size, width)
        self.body = body.body
        self.head = nn.Linear(body.head.in_features, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x * 2.0 - 1.0).flatten(1))


class LatentDiscriminator(nn.Module):
    """(B, latent_dim) -> (B,) logits: prior sample or encoded mask."""

    def __init__(self, latent_dim: int, width: int) -> None:
        super().__init__()
        hidden = max(4 * width, 16)
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(1)


def _probability(decoded: torch.Tensor) -> torch.Tensor:
    return ((decoded.float() + 1.0) * 0.5).clamp(1e-6, 1.0 - 1e-6)


class AdversarialAutoencoder(FamilyBase):
    name = "aae"
    components = ("encoder", "decoder", "latent_discriminator")
    batch_keys = ("mask",)
    task = "generation"  # noise -> mask
    data_layout = "masked"
    output = "mask"  # what sample() draws: K-channel masks in {0, 1}, not an image
    generators = ("encoder", "decoder")  # both at lr_g and shared by every preset
    samplers = ("decoder",)  # sample() decodes prior noise; the encoder draws nothing
    # the moving averages (ema-decay, server-ema-decay) have never covered the encoder/decoder
    # (they kept ``generator`` / ``g_*`` only): declared as it is, not changed here
    ema_components = ()

    def build(self, cfg: ModelConfig) -> Nets:
        k = max(cfg.num_classes, 1)
        enc = MaskEncoder(cfg.spatial_dims, k, cfg.image_size, cfg.width, cfg.latent_dim)
        dec = DCGANGenerator(cfg.spatial_dims, cfg.latent_dim, k, cfg.image_size, cfg.width)
        disc = LatentDiscriminator(cfg.latent_dim, cfg.width)
        for net in (enc, dec, disc):
            init_dcgan_weights(net)
        return {"encoder": enc, "decoder": dec, "latent_discriminator": disc}

    def train_step(
        self, batch: dict[str, torch.Tensor], nets: Nets, opts: Optimizers, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        enc, dec, disc = nets["encoder"], nets["decoder"], nets["latent_discriminator"]
        x = batch["mask"].float()
        with ctx.autocast():
            z_fake = enc(x)
            z_prior = torch.randn_like(z_fake)
            d_real = disc(z_prior).float()
            d_fake = disc(z_fake.detach()).float()
            loss_d = 0.5 * (bce(d_real, torch.ones_like(d_real))
                            + bce(d_fake, torch.zeros_like(d_fake)))
            loss_d = loss_d + ctx.prox_term("latent_discriminator", disc)
        ctx.step(loss_d, opts["latent_discriminator"])

        for p in disc.parameters():
            p.requires_grad_(False)
        try:
            with ctx.autocast():
                recon = bce_prob(_probability(dec(z_fake)), x)
                pred = disc(z_fake).float()
                adv = bce(pred, torch.ones_like(pred))
                loss_g = (recon + adv + ctx.prox_term("encoder", enc)
                          + ctx.prox_term("decoder", dec))
            ctx.step(loss_g, opts["encoder"], opts["decoder"])
        finally:
            for p in disc.parameters():
                p.requires_grad_(True)
        return {"loss-g": loss_g.detach(), "loss-d": loss_d.detach(),
                "d-real": torch.sigmoid(d_real.detach()).mean(),
                "d-fake": torch.sigmoid(d_fake.detach()).mean()}

    @torch.no_grad()
    def sample(self, nets: Nets, noise: torch.Tensor, labels: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Masks in {0, 1} (B, K, ...) decoded from prior noise (B, latent_dim)."""
        return (eval_forward(nets["decoder"], noise) > 0).float()

    @torch.no_grad()
    def evaluate_holdout(self, nets: Nets, holdout: dict[str, torch.Tensor],
                         device: torch.device) -> dict[str, float]:
        """Held-out masks: the reconstruction's mean absolute error (masks in {0, 1}) and the
        latent discriminator's view of prior vs encoded codes."""
        x = holdout.get("mask")
        if x is None or len(x) == 0:
            return {"eval-mae": float("nan"), "eval-examples": 0}
        x = x.to(device).float()
        z = eval_forward(nets["encoder"], x)
        recon = (eval_forward(nets["decoder"], z) > 0).float()
        disc = nets["latent_discriminator"]
        real = torch.sigmoid(eval_forward(disc, torch.randn_like(z))).mean()
        fake = torch.sigmoid(eval_forward(disc, z)).mean()
        mae, real, fake = torch.stack([(recon - x).abs().mean(), real, fake]).tolist()
        return {"eval-mae": mae, "eval-d-real": real, "eval-d-fake": fake,
                "eval-examples": len(x)}
