"""The downstream lesion classifier: what synthetic slices are worth to a model trained on them.

Shared by the hospital's evaluation (``client.trainer``: intended-class accuracy on its own slices),
``fedsynth evaluate`` and ``make bench-utility`` (``fedsynth.utility``). No Flower import.

Intended-class accuracy: a classifier trained on REAL slices reads each synthetic slice; the
share read as the class the generator was asked for, balanced over classes. A generator that
ignores its label scores chance (1 / classes) however realistic its slices; the bar compares it
with the same classifier's balanced accuracy on held-out real slices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn


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


def train_classifier(train: Mapping[str, torch.Tensor], classes: int, seed: int,
                     budget: ClassifierBudget = ClassifierBudget()) -> nn.Module:
    """A classifier trained on ``train`` (``image`` (N, 1, S, S) in [-1, 1], ``label`` int64) for
    ``budget.steps`` steps of ``budget.batch`` images with random horizontal flips; eval mode."""
    x, y = train["image"].float(), train["label"].long()
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
    return net.eval()


@torch.no_grad()
def predict(net: nn.Module, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Class probabilities (N, classes), in chunks."""
    return torch.cat([torch.softmax(net(images[i:i + chunk].float()), 1)
                      for i in range(0, len(images), chunk)])


def balanced_accuracy(truth: torch.Tensor, predicted: torch.Tensor, classes: int
                      ) -> tuple[float, list[float]]:
    """Mean of the per-class recalls over the classes present, and each class's (NaN if absent)."""
    per = []
    for k in range(classes):
        mask = truth == k
        per.append(float((predicted[mask] == k).float().mean()) if mask.any() else math.nan)
    present = [v for v in per if not math.isnan(v)]
    return (float(sum(present) / len(present)) if present else math.nan), per


def intended_class_accuracy(net: nn.Module, synthetic: Mapping[str, torch.Tensor], classes: int
                            ) -> tuple[float, list[float]]:
    """Balanced accuracy of ``net`` (trained on real slices) on ``synthetic`` slices against the
    class each was generated for; and per intended class."""
    return balanced_accuracy(synthetic["label"].long(),
                             predict(net, synthetic["image"]).argmax(1), classes)


def score(net: nn.Module, held: Mapping[str, torch.Tensor], classes: int) -> dict[str, float]:
    """Balanced accuracy and macro one-vs-rest AUC of ``net`` on ``held``."""
    from sklearn.metrics import roc_auc_score

    prob = predict(net, held["image"])
    truth = held["label"].long()
    bacc, _ = balanced_accuracy(truth, prob.argmax(1), classes)
    try:
        auc = float(roc_auc_score(truth.numpy(), prob.numpy(), multi_class="ovr",
                                  average="macro", labels=list(range(classes))))
    except ValueError:  # a class absent from the held-out set: AUC undefined for it
        auc = math.nan
    return {"bacc": bacc, "auc": auc}


def train_and_score(train: Mapping[str, torch.Tensor], held: Mapping[str, torch.Tensor],
                    classes: int, seed: int, budget: ClassifierBudget = ClassifierBudget(),
                    synthetic: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """``score`` on ``held`` of a classifier trained on ``train`` (``train_classifier``); with
    ``synthetic``, also its intended-class accuracy (``intended``) on those slices."""
    if len(train["label"]) == 0 or len(held["label"]) == 0:
        return {"bacc": math.nan, "auc": math.nan, "intended": math.nan}
    net = train_classifier(train, classes, seed, budget)
    out = score(net, held, classes)
    if synthetic is not None:
        out["intended"] = intended_class_accuracy(net, synthetic, classes)[0]
    return out
