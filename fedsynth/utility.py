"""What a generator's images are worth to a hospital, measured on its own slices, locally.

Used by ``fedsynth evaluate CHECKPOINT DATA_DIR`` (a hospital scores a global model on its own
data) and by ``make bench-utility`` (``bench/utility.py``):

- fidelity and diversity: the Fréchet Radiomics Distance (``shared_models.quality``, frd-score's
  radiomic features), the Fréchet distance on the fixed ``FeatureNet`` and precision / recall /
  density / coverage (prdc) of generated slices against the held-out real ones;
- for conditional models, utility: a small MONAI ``DenseNet`` trained on the real training slices
  alone, on those plus class-balanced synthetic slices (augmentation), and on synthetic slices
  only (train on synthetic, test on real: TSTR); balanced accuracy and macro one-vs-rest AUC on
  the held-out real slices.

Everything runs in this process on arrays already at the hospital; nothing is sent anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from shared_models.quality import (FeatureNet, frechet_distance, frechet_radiomics_distance,
                                   prdc, radiomics_features)

FRD_MAX_IMAGES = 128  # radiomic features of at most this many real and generated slices


@dataclass(frozen=True)
class ClassifierBudget:
    """The downstream classifier's training: the same in every row that is compared."""

    steps: int = 300
    batch: int = 32
    lr: float = 2e-3


def classifier(image_size: int, classes: int) -> nn.Module:
    """A small 2D MONAI ``DenseNet`` (16 initial features, growth 8, blocks of 3, 3, 3 layers).

    Chosen on the lesion data set (``fedsynth.lesion_data`` seed 5, 32 px, trained on the pooled
    real slices, scored on the held-out ones, two classifier seeds): balanced accuracy 0.78 and
    0.77 after 300 steps, where MONAI's ``Classifier`` reached 0.58 / 0.66 (8/16/32 channels,
    residual units) and 0.69 / 0.64 (16/32/64, batch norm) after 800; DenseNet121 is too slow
    for CPU benches. ``image_size`` is unused (the network pools globally).
    """
    from monai.networks.nets import DenseNet

    del image_size
    return DenseNet(spatial_dims=2, in_channels=1, out_channels=classes, init_features=16,
                    growth_rate=8, block_config=(3, 3, 3), bn_size=2)


def train_and_score(train: Mapping[str, torch.Tensor], held: Mapping[str, torch.Tensor],
                    classes: int, seed: int, budget: ClassifierBudget = ClassifierBudget()
                    ) -> dict[str, float]:
    """Balanced accuracy and macro one-vs-rest AUC on ``held`` of a classifier trained on
    ``train`` (``image`` (N, 1, S, S) in [-1, 1], ``label`` int64) for ``budget.steps`` steps of
    ``budget.batch`` images with random horizontal flips."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    x, y = train["image"].float(), train["label"].long()
    if len(x) == 0 or len(held["label"]) == 0:
        return {"bacc": math.nan, "auc": math.nan}
    torch.manual_seed(seed)
    net = classifier(x.shape[-1], classes)
    opt = torch.optim.Adam(net.parameters(), lr=budget.lr)
    net.train()
    for _ in range(budget.steps):
        idx = torch.randint(len(x), (min(budget.batch, len(x)),))
        xb = x[idx]
        flip = torch.rand(len(xb)) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        loss = nn.functional.cross_entropy(net(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        prob = torch.softmax(net(held["image"].float()), 1).numpy()
    truth = held["label"].numpy()
    bacc = float(balanced_accuracy_score(truth, prob.argmax(1)))
    try:
        auc = float(roc_auc_score(truth, prob, multi_class="ovr", average="macro",
                                  labels=list(range(classes))))
    except ValueError:  # a class absent from the held-out set: AUC undefined for it
        auc = math.nan
    return {"bacc": bacc, "auc": auc}


def concat(*parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in ("image", "label")}


def fidelity(real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """FRD, FeatureNet Fréchet distance, precision / recall / density / coverage."""
    feat = FeatureNet(real.shape[1])
    fr, ff = feat(real.float()).numpy(), feat(fake.float()).numpy()
    return {"frd": frechet_radiomics_distance(radiomics_features(real[:FRD_MAX_IMAGES]),
                                              radiomics_features(fake[:FRD_MAX_IMAGES])),
            "frechet": frechet_distance(fr, ff) if len(fr) >= 2 else math.nan,
            **prdc(fr, ff)}


def utility(train: Mapping[str, torch.Tensor], held: Mapping[str, torch.Tensor],
            synthetic: Mapping[str, torch.Tensor], classes: int, seed: int,
            budget: ClassifierBudget = ClassifierBudget()) -> dict[str, float]:
    """Real-only, augmented and synthetic-only (TSTR) classifiers on ``held``; gain and ratio."""
    real = train_and_score(train, held, classes, seed, budget)
    aug = train_and_score(concat(train, synthetic), held, classes, seed, budget)
    tstr = train_and_score(synthetic, held, classes, seed, budget)
    return {"real-bacc": real["bacc"], "real-auc": real["auc"],
            "augmented-bacc": aug["bacc"], "augmented-auc": aug["auc"],
            "tstr-bacc": tstr["bacc"], "tstr-auc": tstr["auc"],
            "augmentation-gain": aug["bacc"] - real["bacc"],
            "tstr-ratio": tstr["bacc"] / real["bacc"] if real["bacc"] > 0 else math.nan}


def class_balanced_labels(per_class: int, classes: int) -> torch.Tensor:
    return torch.arange(classes).repeat_interleave(per_class)


def describe(value: Any) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else (
        f"{value:.3f}" if isinstance(value, float) else str(value))
