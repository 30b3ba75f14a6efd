"""Image-to-image networks for pix2pix and CycleGAN, one class for 2D and 3D (``spatial_dims``).

- ``UNetGenerator``: MONAI's ``UNet`` (skip connections, as in Isola et al. 2017, sec. 3.2.1) with a
  tanh output, so translations live in [-1, 1] like the inputs. ``upsample="deconv"`` (pix2pix,
  cascade: their measured figures are of this network) keeps MONAI's stride-2 transposed
  convolutions; ``"resize"`` (maskgan) is ``ResizeUNet``: nearest upsampling then a convolution.
- ``ResnetGenerator``: the CycleGAN generator of Zhu et al. 2017 (appendix 7.2, after Johnson et al.
  2016): c7s1-w, two stride-2 down-convolutions, ``n_blocks`` residual blocks, two up-convolutions,
  c7s1-C with tanh; instance norm. MONAI has no such network, so it is written here from MONAI
  ``Convolution`` blocks (zero padding instead of the paper's reflection padding: MONAI's block has
  no padding mode, and at 32-128 px the border effect is small).
- ``PatchGAN``: MONAI's ``PatchDiscriminator`` (a list of feature maps) reduced to its last map, the
  grid of per-patch logits (Isola et al. 2017, sec. 3.2.2).
- ``CascadeGenerator`` / ``CascadeDiscriminator``: pix2pix's ``cascade = k > 1`` (Nie et al. 2017's
  auto-context, Wei et al. 2018's cascade of cGANs): k UNets, stage 1 on the input a, stage j >= 2
  on (a, stage j-1's output) concatenated; one PatchGAN per stage. Held as ModuleLists inside the
  one ``generator`` / ``discriminator`` component, so every stage is shared and aggregated by the
  preset's rule for its role (``stages.<j-1>.*`` in the state dict).
"""

from __future__ import annotations

import torch
from torch import nn

# MONAI is imported where a network is built: a process that only validates settings (fedsynth
# launch, status) then pays torch's import, not MONAI's ~3.5 s more (BENCHMARKS.md, "The test loop")

LEAKY = ("LEAKYRELU", {"negative_slope": 0.2})


def unet_levels(image_size: int) -> int:
    """Down-sampling stages of the UNet: down to 4 px at the bottom, at most 5 stages."""
    levels = 0
    size = image_size
    while size > 4 and levels < 5:
        size //= 2
        levels += 1
    return levels


UPSAMPLE = ("deconv", "resize")


def resize_unet(*args, **kwargs) -> nn.Module:  # type: ignore[no-untyped-def]
    """MONAI's ``UNet`` with every up layer a resize-convolution (Odena et al. 2016, "Deconvolution
    and checkerboard artifacts"): a stride-2 transposed convolution with kernel 3 overlaps its
    output unevenly (kernel not divisible by the stride), so alternate pixels receive 1 or 2 taps
    and the image carries a period-2 grid (the checkerboard of docs/img/maskgan-grid.png). Nearest
    upsampling (MONAI ``UpSample``, ``mode="nontrainable"``) then a stride-1 convolution gives
    every output pixel the same number of taps. Built by overriding ``UNet._get_up_layer`` so
    the rest of MONAI's network (skips, down path, norm/act/dropout ordering) stays as tested;
    the module is made here because MONAI is imported only where a network is built."""
    from monai.networks.blocks import Convolution, UpSample
    from monai.networks.nets import UNet

    class ResizeUNet(UNet):
        def _get_up_layer(self, in_channels: int, out_channels: int, strides: int,
                          is_top: bool) -> nn.Module:
            if self.num_res_units > 0:
                raise ValueError("ResizeUNet is built with num_res_units = 0")
            up = UpSample(self.dimensions, scale_factor=strides, mode="nontrainable",
                          interp_mode="nearest", align_corners=None, pre_conv=None)
            conv = Convolution(self.dimensions, in_channels, out_channels, strides=1,
                               kernel_size=self.up_kernel_size, act=self.act, norm=self.norm,
                               dropout=self.dropout, bias=self.bias, conv_only=is_top,
                               adn_ordering=self.adn_ordering)
            return nn.Sequential(up, conv)

    return ResizeUNet(*args, **kwargs)


class UNetGenerator(nn.Module):
    """(B, C_in, S, S[, S]) -> (B, C_out, ...) in [-1, 1]; channels double per level up to 8w.
    ``upsample``: ``"deconv"`` (MONAI's transposed convolutions) or ``"resize"`` (nearest
    upsampling + convolution, no checkerboard: ``resize_unet``)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, image_size: int,
                 width: int, dropout: float = 0.0, upsample: str = "deconv") -> None:
        from monai.networks.nets import UNet
        super().__init__()
        if upsample not in UPSAMPLE:
            raise ValueError(f"upsample must be one of {UPSAMPLE}, not {upsample!r}")
        levels = unet_levels(image_size)
        channels = tuple(min(width * 2**i, width * 8) for i in range(levels + 1))
        build = UNet if upsample == "deconv" else resize_unet
        self.upsample = upsample
        self.net = build(spatial_dims, in_channels, out_channels, channels=channels,
                         strides=(2,) * levels, kernel_size=3, up_kernel_size=3, num_res_units=0,
                         act=LEAKY, norm="INSTANCE", dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(x))


class _ResBlock(nn.Module):
    """x + conv-norm-relu-conv-norm(x) at constant width (Zhu et al. 2017, appendix 7.2 "R")."""

    def __init__(self, spatial_dims: int, channels: int) -> None:
        from monai.networks.blocks import Convolution
        super().__init__()
        self.body = nn.Sequential(
            Convolution(spatial_dims, channels, channels, kernel_size=3, act="RELU",
                        norm="INSTANCE"),
            Convolution(spatial_dims, channels, channels, kernel_size=3, act=None,
                        norm="INSTANCE"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """CycleGAN generator: (B, C_in, S, ...) -> (B, C_out, S, ...) in [-1, 1]; S divisible by 4."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, width: int,
                 n_blocks: int = 6) -> None:
        from monai.networks.blocks import Convolution
        super().__init__()
        w = width
        layers: list[nn.Module] = [
            Convolution(spatial_dims, in_channels, w, kernel_size=7, act="RELU", norm="INSTANCE"),
            Convolution(spatial_dims, w, 2 * w, strides=2, kernel_size=3, act="RELU",
                        norm="INSTANCE"),
            Convolution(spatial_dims, 2 * w, 4 * w, strides=2, kernel_size=3, act="RELU",
                        norm="INSTANCE"),
        ]
        layers += [_ResBlock(spatial_dims, 4 * w) for _ in range(n_blocks)]
        layers += [
            Convolution(spatial_dims, 4 * w, 2 * w, strides=2, kernel_size=3, padding=1,
                        output_padding=1, is_transposed=True, act="RELU", norm="INSTANCE"),
            Convolution(spatial_dims, 2 * w, w, strides=2, kernel_size=3, padding=1,
                        output_padding=1, is_transposed=True, act="RELU", norm="INSTANCE"),
            Convolution(spatial_dims, w, out_channels, kernel_size=7, conv_only=True),
        ]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(x))


class PatchGAN(nn.Module):
    """image(s) -> (B, 1, P, P[, P]) patch logits; ``num_layers_d`` 3 from 64 px up, else 2."""

    def __init__(self, spatial_dims: int, in_channels: int, image_size: int, width: int,
                 norm: str = "BATCH") -> None:
        from monai.networks.nets import PatchDiscriminator
        super().__init__()
        self.net = PatchDiscriminator(spatial_dims, channels=width, in_channels=in_channels,
                                      out_channels=1, num_layers_d=3 if image_size >= 64 else 2,
                                      norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[-1]


class CascadeGenerator(nn.Module):
    """k refining UNets: o_1 = G_1(a), o_j = G_j(cat(a, o_{j-1})); ``forward`` gives o_k."""

    def __init__(self, stages: int, spatial_dims: int, channels: int, image_size: int,
                 width: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            UNetGenerator(spatial_dims, channels if j == 0 else 2 * channels, channels,
                          image_size, width) for j in range(stages))

    def outputs(self, a: torch.Tensor, upto: int | None = None,
                frozen: int = 0) -> list[torch.Tensor]:
        """[o_1, ..., o_upto] (default all); the first ``frozen`` stages run without gradients
        (stagewise training: their outputs are inputs, not trained)."""
        outs: list[torch.Tensor] = []
        for j, stage in enumerate(list(self.stages)[: upto or len(self.stages)]):
            x = a if j == 0 else torch.cat([a, outs[-1].to(a.dtype)], 1)
            if j < frozen:
                with torch.no_grad():
                    outs.append(stage(x))
            else:
                outs.append(stage(x))
        return outs

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.outputs(a)[-1]


class CascadeDiscriminator(nn.Module):
    """One conditional PatchGAN per cascade stage; ``forward(x, stage)`` is stage's (0-based)."""

    def __init__(self, stages: int, spatial_dims: int, in_channels: int, image_size: int,
                 width: int, norm: str = "BATCH") -> None:
        super().__init__()
        self.stages = nn.ModuleList(PatchGAN(spatial_dims, in_channels, image_size, width, norm)
                                    for _ in range(stages))

    def forward(self, x: torch.Tensor, stage: int = -1) -> torch.Tensor:
        return self.stages[stage](x)


def init_normal(module: nn.Module, std: float = 0.02) -> None:
    """N(0, 0.02) conv weights, N(1, 0.02) batch-norm scales, as both papers initialise
    (Isola et al. 2017, sec. 3.3): MONAI's ``normal_init``."""
    from monai.networks.utils import normal_init
    module.apply(lambda m: normal_init(m, std))


def set_requires_grad(nets: list[nn.Module], flag: bool) -> None:
    """Freeze a discriminator while its generator steps (saves the D weight gradients)."""
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)
