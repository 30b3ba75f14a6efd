"""The checkerboard score (shared_models.quality.checkerboard_score) and the resize-convolution
U-Net that maskgan uses against it (shared_models.translation_networks, issue 21)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared_models import ModelConfig, StepContext, TrainConfig, get_family
from shared_models.maskgan import one_hot
from shared_models.quality import checkerboard_score
from shared_models.translation_networks import PatchGAN, UNetGenerator, init_normal

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _blob(n: int) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n]
    return np.exp(-((yy - n / 2) ** 2 + (xx - n / 3) ** 2) / (n * 1.5))[None, None]


def test_score_finds_a_faint_checkerboard_on_a_smooth_image() -> None:
    n = 32
    yy, xx = np.mgrid[:n, :n]
    board = ((yy + xx) % 2 * 2 - 1)[None, None] * 0.05  # 5 % of the blob's peak
    smooth = _blob(n)
    assert checkerboard_score(smooth) < 1e-4
    assert checkerboard_score(smooth + board) > 100 * checkerboard_score(smooth)
    stripes = ((xx % 2) * 2 - 1)[None, None] * 0.05  # the Nyquist column alone counts too
    assert checkerboard_score(smooth + stripes) > 100 * checkerboard_score(smooth)
    noise = np.random.default_rng(0).normal(size=(8, 1, n, n))
    assert checkerboard_score(noise) == pytest.approx((2 * n - 1) / n**2, rel=0.1)
    assert checkerboard_score(np.ones((2, 1, n, n))) == 0.0  # no power once the mean is gone


def test_score_reads_3d_volumes() -> None:
    n = 8
    zz, yy, xx = np.mgrid[:n, :n, :n]
    smooth = np.exp(-((zz - 4) ** 2 + (yy - 4) ** 2 + (xx - 3) ** 2) / 8.0)[None, None]
    board = ((zz + yy + xx) % 2 * 2 - 1)[None, None] * 0.05
    assert checkerboard_score(smooth + board) > 10 * checkerboard_score(smooth)


def _trained_generator(upsample: str, steps: int, seed: int) -> float:
    """maskgan's training step on a few masks, with either up path; the generator's score on
    the coordinator's grid masks afterwards."""
    fam = get_family("maskgan")
    cfg = ModelConfig(family="maskgan", image_size=16, width=4, num_classes=1)
    torch.manual_seed(seed)
    nets = {"generator": UNetGenerator(2, 2, 1, 16, 4, upsample=upsample),
            "discriminator": PatchGAN(2, 3, 16, 4)}
    for net in nets.values():
        init_normal(net)
    masks = fam.grid_inputs(cfg, 8)
    batch = {"mask": masks, "image": masks * 1.6 - 0.8}  # the image follows its mask
    opts = fam.optimizers(nets, TrainConfig())
    for _ in range(steps):
        fam.train_step(batch, nets, opts, StepContext())
    nets["generator"].eval()
    with torch.no_grad():
        return checkerboard_score(nets["generator"](one_hot(masks)))


@pytest.mark.parametrize("seed", [0, 1])
def test_resize_generator_draws_less_checkerboard_than_deconv(seed: int) -> None:
    for steps in (0, 5):
        deconv, resize = (_trained_generator(u, steps, seed) for u in ("deconv", "resize"))
        assert resize < 0.2 * deconv, (steps, resize, deconv)


@pytest.mark.parametrize("dims,size", [(2, 32), (3, 16)])
def test_maskgan_builds_the_resize_unet_in_2d_and_3d(dims: int, size: int) -> None:
    cfg = ModelConfig(family="maskgan", image_size=size, width=4, spatial_dims=dims,
                      num_classes=1)
    g = get_family("maskgan").build(cfg)["generator"]
    assert g.upsample == "resize"
    kinds = {type(m).__name__ for m in g.modules()}
    assert "UpSample" in kinds and not any("Transpose" in k for k in kinds), kinds
    deconv = UNetGenerator(dims, 2, 1, size, 4)  # pix2pix / cascade keep the transposed path
    assert any("Transpose" in type(m).__name__ for m in deconv.modules())
    with pytest.raises(ValueError, match="upsample"):
        UNetGenerator(dims, 2, 1, size, 4, upsample="bilinear")
