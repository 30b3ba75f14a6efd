"""The local trainer: a round's GAN work on the hospital's device, from received weights.

The hot loop draws batches by index from a tensor already on the device and calls the family's
``train_step``; losses stay on the device and are reduced with one host sync at the end, so the
trainer adds nothing per step to a bare PyTorch loop (``make bench`` measures the ratio).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from fedsynth import protocol
from shared_models import ModelConfig, StepContext, TrainConfig, encode, get_family
from shared_models.codec import decode_into
from shared_models.family import GanFamily, Nets
from shared_models.quality import FeatureNet, frechet_distance, mmd_rbf

log = logging.getLogger(__name__)


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` takes the first CUDA GPU when one answers, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but no CUDA GPU is available")
    return device


def pick_amp(device: torch.device, requested: str = "auto") -> torch.dtype | None:
    """Mixed precision on GPUs only: bf16 where supported (no scaler needed), else fp16."""
    if requested == "off" or device.type != "cuda":
        return None
    if requested == "fp16":
        return torch.float16
    if requested == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


@dataclass
class LocalResult:
    arrays: dict[str, np.ndarray]
    metrics: dict[str, float]


class LocalTrainer:
    """Holds the nets of one model config on one device, reused across rounds in a warm process."""

    def __init__(self, model: ModelConfig, device: torch.device, amp: str = "auto") -> None:
        self.model = model
        self.family: GanFamily = get_family(model.family)
        self.device = device
        self.amp_dtype = pick_amp(device, amp)
        self.nets: Nets = self.family.build(model)
        for net in self.nets.values():
            net.to(device)
            if device.type == "cuda" and model.spatial_dims == 2:
                net.to(memory_format=torch.channels_last)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def load(self, arrays: Mapping[str, np.ndarray]) -> None:
        decode_into(self.nets, arrays)

    def _context(self, train: TrainConfig) -> StepContext:
        anchor = None
        if train.prox_mu > 0:
            anchor = {c: [p.detach().clone() for p in n.parameters()] for c, n in self.nets.items()}
        scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        return StepContext(device=self.device, amp_dtype=self.amp_dtype, scaler=scaler,
                           prox_mu=train.prox_mu, anchor=anchor)

    def fit(self, data: Mapping[str, torch.Tensor], train: TrainConfig, seed: int,
            examples: Mapping[str, int] | None = None) -> LocalResult:
        """``train.local_steps`` steps on random batches drawn from ``data``.

        ``data`` maps batch keys to tensors of equal length (N, C, ...) in [-1, 1]; one index draw
        serves every key, so paired keys stay paired. ``examples`` gives per-component example
        counts for the aggregation weights (default: N for every component).
        """
        n = len(next(iter(data.values())))
        if n == 0:
            raise ValueError("no training images")
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        on_device = {k: self._to_device(v) for k, v in data.items()}
        opts = self.family.optimizers(self.nets, train)
        ctx = self._context(train)
        for net in self.nets.values():
            net.train()
        batch = min(train.batch_size, n)
        totals: dict[str, torch.Tensor] = {}
        for _ in range(train.local_steps):
            idx = torch.randint(n, (batch,), device=self.device)
            out = self.family.train_step({k: v[idx] for k, v in on_device.items()},
                                         self.nets, opts, ctx)
            for k, v in out.items():
                totals[k] = totals[k] + v if k in totals else v.clone()
        # the one host sync of the round
        keys = sorted(totals)
        means = (torch.stack([totals[k] for k in keys]) / train.local_steps).tolist()
        seconds = time.perf_counter() - t0
        metrics: dict[str, float] = dict(zip(keys, means))
        counts = {c: n for c in self.family.components} | dict(examples or {})
        metrics.update({
            "train-seconds": seconds,
            "steps": train.local_steps,
            "images-per-second": train.local_steps * batch / seconds,
            protocol.NUM_EXAMPLES: n,
            **{protocol.examples_key(c): counts[c] for c in self.family.components},
        })
        arrays = encode(self.nets, self.family.components, train.wire_dtype)
        return LocalResult(arrays=arrays, metrics=metrics)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
            if t.ndim == 4 and t.is_floating_point():
                t = t.contiguous(memory_format=torch.channels_last)
        return t

    @torch.no_grad()
    def evaluate(self, holdout: Mapping[str, torch.Tensor], seed: int) -> dict[str, float]:
        """Quality on held-out local slices: D's view of real vs fake, feature distances."""
        images = holdout["image"]
        gen = torch.Generator().manual_seed(seed)
        n = len(images)
        noise = torch.randn(max(n, 2), self.model.latent_dim, generator=gen).to(self.device)
        fake = self.family.sample(self.nets, noise).float().cpu()
        d = self.nets["discriminator"]
        d.eval()
        try:
            d_real = torch.sigmoid(d(images.to(self.device)).float()).mean().item()
            d_fake = torch.sigmoid(d(fake.to(self.device)).float()).mean().item()
        finally:
            d.train()
        feat = FeatureNet(self.model.channels)
        fr, ff = feat(images.float().cpu()).numpy(), feat(fake).numpy()
        return {
            "eval-d-real": d_real,
            "eval-d-fake": d_fake,
            "eval-frechet": frechet_distance(fr, ff) if n >= 2 else float("nan"),
            "eval-mmd": mmd_rbf(fr, ff),
            "eval-examples": n,
        }
