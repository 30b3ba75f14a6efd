"""What a generator's images are worth to a hospital, measured on its own slices, locally.

Used by ``fedsynth evaluate CHECKPOINT DATA_DIR`` (a hospital scores a global model on its own
data) and by ``make bench-utility`` (``bench/utility.py``):

- fidelity and diversity: the Fréchet Radiomics Distance (``shared_models.quality``, frd-score's
  radiomic features), the Fréchet distance on the fixed ``FeatureNet`` and precision / recall /
  density / coverage (prdc) of generated slices against the held-out real ones;
- for conditional models, utility: a small MONAI ``DenseNet`` trained on the real training slices
  alone, on those plus class-balanced synthetic slices (augmentation), and on synthetic slices
  only (train on synthetic, test on real: TSTR); balanced accuracy and macro one-vs-rest AUC on
  the held-out real slices; and intended-class accuracy (``shared_models.downstream``): the
  real-only classifier's balanced accuracy on the synthetic slices against their intended class.

Everything runs in this process on arrays already at the hospital; nothing is sent anywhere.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from shared_models.downstream import (ClassifierBudget, classifier,  # noqa: F401 - re-exported
                                      intended_class_accuracy, train_and_score, train_classifier)
from shared_models.quality import (FeatureNet, frechet_distance, frechet_radiomics_distance,
                                   prdc, radiomics_features)

FRD_MAX_IMAGES = 128  # radiomic features of at most this many real and generated slices


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
    real = train_and_score(train, held, classes, seed, budget, synthetic=synthetic)
    aug = train_and_score(concat(train, synthetic), held, classes, seed, budget)
    tstr = train_and_score(synthetic, held, classes, seed, budget)
    return {"real-bacc": real["bacc"], "real-auc": real["auc"],
            "augmented-bacc": aug["bacc"], "augmented-auc": aug["auc"],
            "tstr-bacc": tstr["bacc"], "tstr-auc": tstr["auc"],
            # the real-only classifier reading the synthetic slices: their intended class?
            "intended-class-accuracy": real["intended"],
            "intended-class-ratio": (real["intended"] / real["bacc"] if real["bacc"] > 0
                                     else math.nan),
            "augmentation-gain": aug["bacc"] - real["bacc"],
            "tstr-ratio": tstr["bacc"] / real["bacc"] if real["bacc"] > 0 else math.nan}


def class_balanced_labels(per_class: int, classes: int) -> torch.Tensor:
    return torch.arange(classes).repeat_interleave(per_class)


def describe(value: Any) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else (
        f"{value:.3f}" if isinstance(value, float) else str(value))
