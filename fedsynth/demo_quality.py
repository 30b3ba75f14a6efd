"""The demo's last word on quality: its final generator's Fréchet distance beside real vs real.

The demo built its hospitals itself, on this machine, so it can score the result against them
here (a deployed coordinator holds no image; there the hospitals score the model on their held-out
slices and only scalars leave). Every real slice of every demo hospital (as each hospital's
ClientApp loads it, ``client.datasets``) is shuffled with a fixed seed and cut into two disjoint
halves A and B. The floor is the Fréchet distance between A and B (``shared_models.quality``: fixed
random conv features), i.e. what two samples of the same real distribution score at these sizes;
the model's distance is that of |A| slices from the last checkpoint's generator (the
coordinator's moving average where the run keeps one, as ``fedsynth sample`` draws) to the same
B. The factor model / floor is what the demo prints: 1 would be indistinguishable from real.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from shared_models import ModelConfig, get_family
from shared_models.codec import decode_into
from shared_models.quality import FeatureNet, frechet_distance

SPLIT_SEED = 7


def real_slices(hospitals: Sequence[Mapping[str, Any]], model: ModelConfig
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every slice (training and held out) of the hospitals, with labels for labelled families."""
    from client.datasets import local_data
    from client.settings import HospitalSettings

    images, labels = [], []
    for h in hospitals:
        d = local_data(HospitalSettings.from_mapping(h), model)
        for part in (d.train, d.holdout):
            if "image" in part and len(part["image"]):
                images.append(part["image"])
                if "label" in part:
                    labels.append(part["label"])
    x = torch.cat(images).float()
    return x, (torch.cat(labels) if labels and len(labels) == len(images) else None)


def frechet_vs_floor(checkpoint: Path, hospitals: Sequence[Mapping[str, Any]]
                     ) -> dict[str, float]:
    """{"frechet", "floor", "factor", "real", "generated"} for the checkpoint's generator."""
    from server.run_folder import load_checkpoint

    arrays, meta = load_checkpoint(checkpoint, ema=True)
    model = ModelConfig(**meta["model"])
    family = get_family(str(meta["family"]))
    if family.task != "generation":
        raise ValueError(f"family {family.name!r} translates; no Fréchet distance of samples")
    nets = family.build(model)
    decode_into(nets, arrays)
    real, labels = real_slices(hospitals, model)
    order = torch.randperm(len(real), generator=torch.Generator().manual_seed(SPLIT_SEED))
    half = len(real) // 2
    a, b = order[:half], order[half:2 * half]
    feat = FeatureNet(model.channels)
    fb = feat(real[b]).numpy()
    floor = frechet_distance(feat(real[a]).numpy(), fb)
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    noise = torch.randn(half, model.latent_dim, generator=gen)
    # labelled families: the same class mix as half A
    fake_labels = labels[a] if (labels is not None and model.num_classes) else None
    fake = family.sample(nets, noise, fake_labels).float()
    fd = frechet_distance(feat(fake).numpy(), fb)
    return {"frechet": fd, "floor": floor, "factor": fd / floor if floor > 0 else float("inf"),
            "real": float(len(real)), "generated": float(half)}
