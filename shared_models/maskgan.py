"""Mask-conditioned synthesis ("maskgan"): a label map in, an image out, 2D or 3D.

The pix2pix recipe (Isola et al. 2017; Guibas et al. 2017 synthesise fundus images from vessel
maps this way) with the label map as the input domain: the generator is the U-Net of
``translation_networks`` fed the one-hot map (background + the run's K mask labels, channel k =
``DataConfig.mask_labels[k]``), the conditional PatchGAN sees the one-hot map beside the real or
synthetic image, and the objective is pix2pix's eq. 4: L_cGAN + lambda * L_L1 (lambda = 100).
MONAI 1.6 has SPADE blocks (``monai.networks.blocks.SPADE``, inside ``SPADENet``'s VAE-GAN); the
one-hot U-Net is kept here because it reuses the federation's tested pix2pix networks, codec
shapes and evaluation, and the skip connections carry the mask's geometry to the output as well.

Lesion-aware weighting (Jiang et al. 2018's tumour-aware loss): with ``lesion_weight`` w
(``TrainConfig``, carried in ``StepContext``), every pixel inside the union of the masks counts
w times in the L1 term, and every PatchGAN patch by 1 + (w - 1) x (its masked fraction) in both
adversarial terms; both weightings are normalised by their mean, so w = 1 is plain pix2pix and
a larger w moves the effort to the lesion without changing the overall loss scale.

Batches hold ``mask`` (B, K, ...) in {0, 1} and ``image`` (B, 1, ...) of the ``masked`` data
layout (:mod:`client.datasets`), drawn with one index. ``sample`` takes K-channel masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .capabilities import COLOUR
from .config import ModelConfig
from .family import FamilyBase, Nets, Optimizers, StepContext, eval_forward
from .translation_networks import PatchGAN, UNetGenerator, init_normal, set_requires_grad

L1_WEIGHT = 100.0  # lambda of pix2pix's eq. 4


def one_hot(mask: torch.Tensor) -> torch.Tensor:
    """K mask channels -> K + 1 (background first: 1 where no label is)."""
    mask = mask.float()
    background = 1.0 - mask.amax(1, keepdim=True).clamp(0, 1) if mask.shape[1] else \
        torch.ones_like(mask[:, :1])
    return torch.cat([background, mask], 1)


def pixel_weights(mask: torch.Tensor, lesion_weight: float) -> torch.Tensor:
    """(B, 1, ...) weights: ``lesion_weight`` inside the union of the masks, 1 outside."""
    union = mask.float().amax(1, keepdim=True)
    return 1.0 + (lesion_weight - 1.0) * union


def _patch_weights(weights: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Pixel weights averaged over each PatchGAN cell, normalised to mean 1."""
    pool = F.adaptive_avg_pool2d if logits.ndim == 4 else F.adaptive_avg_pool3d
    w = pool(weights, logits.shape[2:])
    return w / w.mean()


def _bce(logits: torch.Tensor, target: float, weights: torch.Tensor | None) -> torch.Tensor:
    t = torch.full_like(logits, target)
    return F.binary_cross_entropy_with_logits(logits, t, weight=weights)


class MaskGan(FamilyBase):
    name = "maskgan"
    components = ("generator", "discriminator")
    batch_keys = ("mask", "image")
    pair_keys = ("mask", "image")  # local evaluation: SSIM/PSNR/MAE of G(mask) against the image
    task = "translation"
    data_layout = "masked"
    supports = frozenset({COLOUR})  # e.g. vessel tree -> colour fundus (Costa et al. 2017)

    def __init__(self, l1_weight: float = L1_WEIGHT) -> None:
        self.l1_weight = l1_weight

    def build(self, cfg: ModelConfig) -> Nets:
        labels = max(cfg.num_classes, 1)
        # resize-convolution up path: the transposed one drew a checkerboard (translation_networks)
        g = UNetGenerator(cfg.spatial_dims, labels + 1, cfg.channels, cfg.image_size, cfg.width,
                          upsample="resize")
        d = PatchGAN(cfg.spatial_dims, labels + 1 + cfg.channels, cfg.image_size, cfg.width)
        init_normal(g)
        init_normal(d)
        return {"generator": g, "discriminator": d}

    def train_step(
        self, batch: dict[str, torch.Tensor], nets: Nets, opts: Optimizers, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        g, d = nets["generator"], nets["discriminator"]
        cond, real = one_hot(batch["mask"]), batch["image"]
        weighted = ctx.lesion_weight != 1.0
        w_pix = pixel_weights(batch["mask"], ctx.lesion_weight) if weighted else None

        with ctx.autocast():
            fake = g(cond)
            d_real = d(torch.cat([cond, real], 1)).float()
            d_fake = d(torch.cat([cond, fake.detach()], 1)).float()
            w_patch = _patch_weights(w_pix, d_real) if w_pix is not None else None
            loss_d = 0.5 * (_bce(d_real, 1.0, w_patch) + _bce(d_fake, 0.0, w_patch))
            loss_d = loss_d + ctx.prox_term("discriminator", d)
        ctx.step(loss_d, opts["discriminator"])

        set_requires_grad([d], False)
        try:
            with ctx.autocast():
                pred = d(torch.cat([cond, fake], 1)).float()
                loss_adv = _bce(pred, 1.0, w_patch)
                err = (fake.float() - real.float()).abs()
                loss_l1 = ((err * w_pix).mean() / w_pix.mean() if w_pix is not None
                           else err.mean())
                loss_g = loss_adv + self.l1_weight * loss_l1 + ctx.prox_term("generator", g)
            ctx.step(loss_g, opts["generator"])
        finally:
            set_requires_grad([d], True)
        return {
            "loss-g": loss_g.detach(),
            "loss-d": loss_d.detach(),
            "loss-l1": loss_l1.detach(),
            "d-real": torch.sigmoid(d_real.detach()).mean(),
            "d-fake": torch.sigmoid(d_fake.detach()).mean(),
        }

    @torch.no_grad()
    def sample(self, nets: Nets, noise: torch.Tensor, labels: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Images for the K-channel masks ``noise`` (the family's input, in {0, 1})."""
        return eval_forward(nets["generator"], one_hot(noise))

    # ------------------------------------------------------------------ coordinator grid

    def grid_inputs(self, cfg: ModelConfig, n: int) -> torch.Tensor:
        """Fixed synthetic masks for the coordinator's sample grid (it holds no patient mask):
        per sample and label, a disc (ball in 3D) at a seeded position and radius."""
        gen = torch.Generator().manual_seed(1234)
        labels, size, dims = max(cfg.num_classes, 1), cfg.image_size, cfg.spatial_dims
        axes = torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * dims, indexing="ij")
        out = torch.zeros((n, labels) + (size,) * dims)
        for i in range(n):
            for k in range(labels):
                centre = (0.25 + 0.5 * torch.rand(dims, generator=gen)) * size
                radius = size * (0.08 + 0.12 * float(torch.rand(1, generator=gen)))
                dist = sum((a - c) ** 2 for a, c in zip(axes, centre))
                out[i, k] = (dist <= radius ** 2).float()
        return out

    def show_input(self, masks: torch.Tensor) -> torch.Tensor:
        """A K-channel mask as one grey image in [-1, 1]: label k at grey (k + 1) / K."""
        k = masks.shape[1]
        level = torch.arange(1, k + 1, dtype=torch.float32).view(1, k, *[1] * (masks.ndim - 2))
        grey = (masks.float() * level).amax(1, keepdim=True) / max(k, 1)
        return grey * 2.0 - 1.0
