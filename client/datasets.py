"""What a hospital trains on: its cached DICOM slices turned into the tensors a family needs.

Held-out slices (every ``holdout_every``-th) never train; they feed the local evaluation.
Everything here stays at the hospital.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from shared_models import ModelConfig

from .cache import load_slices
from .dicom import DicomSettings, ScanReport
from .settings import HospitalSettings

log = logging.getLogger(__name__)


@dataclass
class LocalData:
    """Training and held-out tensors by batch key (``image`` for DCGAN), plus the scan report."""

    train: dict[str, torch.Tensor]
    holdout: dict[str, torch.Tensor]
    report: ScanReport

    @property
    def num_train(self) -> int:
        return len(next(iter(self.train.values())))


_DATA: dict[tuple, LocalData] = {}  # warm per process: a Ray actor or a long-lived worker


def local_data(hospital: HospitalSettings, model: ModelConfig) -> LocalData:
    """Load (once per process) the slices for ``model``'s image size and split off a hold-out."""
    key = (hospital, model.image_size, model.family)
    if key in _DATA:
        return _DATA[key]
    settings = DicomSettings(image_size=model.image_size, modalities=hospital.modalities)
    slices = load_slices(hospital.data_dir, settings, hospital.cache_dir)
    log.info("%s: %s", hospital.name, slices.report.summary())
    images = torch.from_numpy(slices.images.copy())
    held = torch.zeros(len(images), dtype=torch.bool)
    if len(images) >= 2 * hospital.holdout_every:
        held[:: hospital.holdout_every] = True
    holdout = images[held] if held.any() else images
    _DATA[key] = LocalData(train={"image": images[~held]}, holdout={"image": holdout},
                           report=slices.report)
    return _DATA[key]
