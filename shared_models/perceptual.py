"""The perceptual (deep-supervision) loss of Zhao et al. 2018, without downloading weights.

Zhao et al. compare the synthetic and the real image in the feature maps of a fixed network. Here
that network is a checkpoint the HOSPITAL supplies as a local file, hash-pinned in its settings
(``perceptual-network`` and ``perceptual-network-sha256``, ``client.settings``); nothing is
fetched, and the coordinator never sends or sees it. The architecture is fixed (``FeatureNet``),
so a checkpoint is only a state dict of tensors, loaded with ``torch.load(weights_only=True)``
(no pickled code runs) and ``load_state_dict(strict=True)``:

    FeatureNet(spatial_dims, channels): three 3x3(x3) convolutions with LeakyReLU(0.2),
      conv1: channels -> 16, stride 1      feature map 1 (full size)
      conv2: 16 -> 32,       stride 2      feature map 2 (1/2)
      conv3: 32 -> 64,       stride 2      feature map 3 (1/4)
    state-dict keys: conv1.weight, conv1.bias, conv2.weight, conv2.bias, conv3.weight, conv3.bias

L_perc(x, y) = (1/3) sum_l mean |F_l(x) - F_l(y)| (L1 per layer, averaged over the layers). The
net is frozen (no gradient to its weights; gradients flow to the generator through it).

Making a checkpoint: ``python -m shared_models.perceptual out.pt --spatial-dims 2 [--channels 1]
[--seed 0]`` saves a seeded FeatureNet's state dict and prints its SHA-256 (a random-feature
network, which already scores structure; a hospital with a network of this architecture trained
on its own images, e.g. as an autoencoder's encoder, saves that instead with the same
``torch.save(net.state_dict(), path)``). Training the feature network by the federation itself
is left (issue 22 item 6's second option).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn


class FeatureNet(nn.Module):
    """The fixed feature network of ``perceptual-loss`` (module docstring)."""

    WIDTHS = (16, 32, 64)

    def __init__(self, spatial_dims: int = 2, channels: int = 1) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        w1, w2, w3 = self.WIDTHS
        self.conv1 = conv(channels, w1, 3, 1, 1)
        self.conv2 = conv(w1, w2, 3, 2, 1)
        self.conv3 = conv(w2, w3, 3, 2, 1)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        act = nn.functional.leaky_relu
        f1 = act(self.conv1(x), 0.2)
        f2 = act(self.conv2(f1), 0.2)
        return [f1, f2, act(self.conv3(f2), 0.2)]


def perceptual_loss(net: FeatureNet, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """L_perc(fake, real): the mean over the layers of the L1 between their feature maps."""
    with torch.no_grad():
        targets = net.features(real.float())
    outs = net.features(fake.float())
    return sum((o - t).abs().mean() for o, t in zip(outs, targets)) / len(outs)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_feature_net(path: Path, sha256: str, spatial_dims: int, channels: int,
                     device: torch.device | None = None) -> FeatureNet:
    """The hospital's pinned FeatureNet, frozen; ``ValueError`` (one line) when the file is
    missing, its SHA-256 is not ``sha256``, or its tensors do not fit the architecture."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"perceptual-network {path} is not a file")
    got = sha256_of(path)
    if got != sha256.strip().lower():
        raise ValueError(f"perceptual-network {path} has SHA-256 {got}, not the pinned "
                         f"perceptual-network-sha256 {sha256.strip() or '(none)'}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = FeatureNet(spatial_dims, channels)
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"perceptual-network {path} is not a {spatial_dims}D FeatureNet with "
                         f"{channels} channel(s): {first}") from None
    net.requires_grad_(False)
    net.eval()
    return net.to(device) if device is not None else net


def save_feature_net(path: Path, spatial_dims: int = 2, channels: int = 1, seed: int = 0) -> str:
    """Save a seeded FeatureNet's state dict at ``path``; its SHA-256 (to pin)."""
    torch.manual_seed(seed)
    torch.save(FeatureNet(spatial_dims, channels).state_dict(), path)
    return sha256_of(Path(path))


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="save a FeatureNet checkpoint for perceptual-loss")
    p.add_argument("path", type=Path)
    p.add_argument("--spatial-dims", type=int, choices=(2, 3), default=2)
    p.add_argument("--channels", type=int, choices=(1, 3), default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    digest = save_feature_net(a.path, a.spatial_dims, a.channels, a.seed)
    print(f'perceptual-network = "{a.path.resolve()}"\nperceptual-network-sha256 = "{digest}"')


if __name__ == "__main__":
    main()
