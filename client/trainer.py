"""The local trainer: a round's GAN work on the hospital's device, from received weights.

The hot loop asks the family to draw a batch (by index, from tensors already on the device: one
shared index for paired keys, one per domain for unpaired ones) and calls its ``train_step``;
losses stay on the device and are reduced with one host sync at the end, so the trainer adds
nothing per step to a bare PyTorch loop (``make bench`` measures the ratio). The UA-GAN
discriminator round (``LocalTrainer.ua_round``, ``discriminator_round``) runs the same way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric

from protocol import keys as protocol  # names only: the trainer needs no Flower
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits as bce

from shared_models import ModelConfig, StepContext, TrainConfig, encode, get_family
from shared_models.capabilities import check_model, check_supported
from shared_models.codec import decode_into
from shared_models.downstream import ClassifierBudget, intended_class_accuracy, train_classifier
from shared_models.dp import PrivateSteps
from shared_models.family import GanFamily, Nets
from shared_models.quality import (FeatureNet, frechet_distance, frechet_radiomics_distance,
                                   mmd_rbf, prdc, radiomics_features)
from shared_models.small_data import GeneratorEMA, SmallData

if TYPE_CHECKING:
    from .ceilings import Deadline

log = logging.getLogger(__name__)

EVAL_CHUNK = 32  # held-out images translated per forward pass (bounds device memory)
# Radiomic features (FRD) of at most this many held-out and generated images per evaluation: the
# per-round cost stays bounded (~10 ms an image at 32 px on one core), whatever the hospital holds.
FRD_MAX_IMAGES = 64


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` takes the first CUDA GPU when one answers, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"device {requested!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {requested!r} requested but no CUDA GPU is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {requested!r}: only {torch.cuda.device_count()} GPU(s)")
    return device


def pick_amp(device: torch.device, requested: str = "auto") -> torch.dtype | None:
    """Mixed precision on GPUs only: bf16 where supported (no scaler needed), else fp16."""
    if requested not in ("auto", "off", "bf16", "fp16"):
        raise ValueError(f"amp {requested!r}: use auto, off, bf16 or fp16")
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
    # DP-SGD (shared_models.dp): releases made and their Poisson rate; the hospital's
    # accountant (client.privacy) charges exactly these, never sent
    dp_releases: int = 0
    dp_sample_rate: float = 0.0


class LocalTrainer:
    """Holds the nets of one model config on one device, reused across rounds in a warm process."""

    def __init__(self, model: ModelConfig, device: torch.device, amp: str = "auto") -> None:
        self.model = model
        self.family: GanFamily = get_family(model.family)
        if device.type == "cuda" and device.index is None:  # "cuda" means the current GPU
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        if device.type == "cuda":
            torch.cuda.set_device(device)  # so bf16 support is asked of the chosen GPU
            torch.backends.cudnn.benchmark = True
            torch.set_float32_matmul_precision("high")  # TF32 for Linear layers too
        self.amp_dtype = pick_amp(device, amp)
        self.memory_format = (torch.channels_last if model.spatial_dims == 2
                              else torch.channels_last_3d)
        self.nets: Nets = self.family.build(model)
        for net in self.nets.values():
            net.to(device)
            if device.type == "cuda":
                net.to(memory_format=self.memory_format)
        # device copies of the (per-process cached) training tensors: uploaded once, not per round
        self._on_device: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # radiomic features of the held-out slices: computed once, they do not change per round
        self._real_radiomics: tuple[torch.Tensor, np.ndarray] | None = None
        self._real_classifier: tuple[torch.Tensor, int, torch.nn.Module] | None = None
        self._feature_net: FeatureNet | None = None  # fixed weights: built once, not per round

    def load(self, arrays: Mapping[str, np.ndarray]) -> None:
        decode_into(self.nets, arrays)

    def reset(self, seed: int = 0) -> None:
        """Fresh initial weights (same seed, same weights), e.g. for a hospital's first round."""
        torch.manual_seed(seed)
        fresh = self.family.build(self.model)
        for name, net in self.nets.items():
            net.load_state_dict(fresh[name].state_dict())

    def _context(self, train: TrainConfig | None = None) -> StepContext:
        """The step context of a round on this trainer's device: autocast at ``amp_dtype``, a
        grad scaler under fp16, FedProx anchored at the current weights when ``train`` asks."""
        anchor = None
        if train is not None and train.prox_mu > 0:
            anchor = {c: [p.detach().clone() for p in n.parameters()] for c, n in self.nets.items()}
        scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        return StepContext(device=self.device, amp_dtype=self.amp_dtype, scaler=scaler,
                           prox_mu=train.prox_mu if train is not None else 0.0, anchor=anchor,
                           small_data=SmallData.from_train(train),
                           lesion_weight=train.lesion_weight if train is not None else 1.0,
                           **({"gradient_loss": train.gradient_loss,
                               "gradient_loss_power": train.gradient_loss_power,
                               "lesion_cycle_weight": train.lesion_cycle_weight}
                              if train is not None else {}))

    def prepare(self, net: nn.Module) -> nn.Module:
        """``net`` on this trainer's device, in its memory format (as the trainer's own nets)."""
        net.to(self.device)
        if self.device.type == "cuda":
            net.to(memory_format=self.memory_format)
        return net

    def ua_round(self, d: nn.Module, opt: torch.optim.Optimizer, real: torch.Tensor,
                 fakes: torch.Tensor, *, steps: int, batch_size: int,
                 generator: torch.Generator, real_labels: torch.Tensor | None = None,
                 fake_labels: torch.Tensor | None = None,
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """A UA-GAN discriminator round (``client.ua_gan``) on this trainer's device and precision.

        ``d`` (with ``opt``) is the caller's, not one of ``self.nets``. The real slices (and
        labels) go to the device through the upload-once cache; the fakes are the message's,
        uploaded for this round only. See ``discriminator_round``.
        """
        fakes = fakes.to(self.device)
        if self.device.type == "cuda":
            fakes = fakes.contiguous(memory_format=self.memory_format)
        return discriminator_round(
            d, opt, self._to_device(real).float(), fakes, steps=steps, batch_size=batch_size,
            ctx=self._context(), generator=generator,
            real_labels=self._to_device(real_labels) if real_labels is not None else None,
            fake_labels=fake_labels.to(self.device) if fake_labels is not None else None)

    def fit(self, data: Mapping[str, torch.Tensor], train: TrainConfig, seed: int,
            examples: Mapping[str, int] | None = None,
            reply: tuple[tuple[str, ...], Callable[[str, str], bool] | None] | None = None,
            deadline: "Deadline | None" = None, server_round: int = 0,
            perceptual_net: nn.Module | None = None) -> LocalResult:
        """``train.local_steps`` steps on batches the family draws from ``data``.

        ``data`` maps batch keys to tensors (N, C, ...) in [-1, 1] (labels: int64 (N,)). How a
        batch is drawn is the family's: one shared index for paired keys, independent draws per
        domain for unpaired ones (an empty domain is left out). ``examples`` overrides the
        family's per-component counts (the aggregation weights; 0 for a component this hospital
        could not train). ``reply`` = (components, include) says what goes back to the
        coordinator (see ``client.ua_gan.reply_plan``); default: every component.
        ``deadline`` (``client.ceilings.Deadline``) is checked before each step: past it the
        round raises and sends nothing. ``server_round``: the round the coordinator signed (a
        stagewise pix2pix cascade trains the stage it names). ``perceptual_net``: the hospital's
        pinned feature network (``shared_models.perceptual``), needed when ``perceptual-loss``
        is on. Losses stay on the device; one
        host sync at the end.
        """
        counts = self.family.examples(data) | dict(examples or {})
        unknown = set(counts) - set(self.family.components)
        if unknown:
            raise ValueError(f"examples for unknown component(s) {sorted(unknown)}; "
                             f"family {self.family.name!r} has {list(self.family.components)}")
        if not any(counts.values()):
            raise ValueError("no training images")
        check_supported(self.family, train)
        check_model(self.family, self.model, train)  # channels = 3: the colour families only
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        on_device = {k: self._to_device(v) for k, v in data.items()}
        opts = self.family.optimizers(self.nets, train)
        ctx = self._context(train)
        ctx.cascade_stage = train.cascade_stage(self.model.cascade, server_round)
        if train.perceptual_loss > 0:
            if perceptual_net is None:
                raise ValueError("perceptual-loss > 0 needs the hospital's perceptual-network")
            ctx.perceptual_loss = train.perceptual_loss
            ctx.perceptual_net = perceptual_net.to(self.device)
        if train.dp:  # DP-SGD: the family draws secret Poisson batches itself (shared_models.dp)
            rate, _per_step = self.family.dp_plan(data, train.batch_size)
            ctx.dp = PrivateSteps(on_device, train.batch_size, rate, train.dp_noise_multiplier,
                                  train.dp_max_grad_norm, self.device)
            if ctx.amp_dtype == torch.float16:  # per-record gradients in fp16 would underflow
                ctx.amp_dtype, ctx.scaler = None, None
        # ema-decay: the generator sent back is its moving average over this round's steps
        ema = (GeneratorEMA(self.nets, self.family.ema_components, train.ema_decay)
               if train.ema_decay > 0 else None)
        for net in self.nets.values():
            net.train()
        data_seconds = time.perf_counter() - t0
        images = 0
        totals: dict[str, torch.Tensor] = {}
        for step in range(train.local_steps):
            if deadline is not None:
                deadline.check(step)
            if ctx.dp is not None:
                batch: dict[str, torch.Tensor] = {}
                images += train.batch_size  # the expected count: the drawn one stays here
            else:
                batch = self.family.draw(on_device, train.batch_size, train.class_balanced)
                images += sum(len(batch[k]) for k in self.family.batch_keys if k in batch)
            out = self.family.train_step(batch, self.nets, opts, ctx)
            if ema is not None:
                ema.update()
            for k, v in out.items():
                totals[k] = totals[k] + v if k in totals else v.clone()
        if ema is not None:
            ema.apply()
        # the one host sync of the round
        keys = sorted(totals)
        means = ((torch.stack([totals[k].float() for k in keys]) / train.local_steps).tolist()
                 if keys else [])
        seconds = time.perf_counter() - t0
        metrics: dict[str, float] = dict(zip(keys, means))
        metrics.update({
            "train-seconds": seconds,
            "data-seconds": data_seconds,
            "steps": train.local_steps,
            "images-per-second": images / seconds,
            protocol.NUM_EXAMPLES: max(counts.values()),
            **{protocol.examples_key(c): int(counts.get(c, 0)) for c in self.family.components},
        })
        components, include = reply or (self.family.components, None)
        arrays = encode(self.nets, components, train.wire_dtype, include)
        if ctx.dp is not None:
            return LocalResult(arrays=arrays, metrics=metrics, dp_releases=ctx.dp.releases,
                               dp_sample_rate=ctx.dp.sample_rate)
        return LocalResult(arrays=arrays, metrics=metrics)

    def idle(self, train: TrainConfig,
             reply: tuple[tuple[str, ...], Callable[[str, str], bool] | None] | None = None
             ) -> LocalResult:
        """A round this hospital cannot train (it holds nothing the family uses): the current
        weights, and zero examples for every component, so the aggregate ignores it."""
        metrics: dict[str, float] = {
            "train-seconds": 0.0, "data-seconds": 0.0, "steps": 0, "images-per-second": 0.0,
            protocol.NUM_EXAMPLES: 0,
            **{protocol.examples_key(c): 0 for c in self.family.components}}
        components, include = reply or (self.family.components, None)
        return LocalResult(arrays=encode(self.nets, components, train.wire_dtype, include),
                           metrics=metrics)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return t
        hit = self._on_device.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        d = t.to(self.device)
        if d.ndim == 2 + self.model.spatial_dims and d.is_floating_point():
            d = d.contiguous(memory_format=self.memory_format)
        self._on_device[id(t)] = (t, d)
        return d

    @torch.no_grad()
    def evaluate(self, holdout: Mapping[str, torch.Tensor], seed: int,
                 classifier_steps: int = 0) -> dict[str, float]:
        """Quality on held-out local data, the way the field measures the family's task.

        Translation: SSIM, PSNR and MAE of the translated ``a`` against its paired ``b`` (only
        ``eval-examples`` 0 when the hospital holds no held-out pairs, e.g. a CycleGAN hospital
        with one domain). Generation: D's view of real vs fake,
        Fréchet distance / MMD and precision / recall / density / coverage on the fixed
        ``FeatureNet``'s features, and the Fréchet Radiomics Distance (``eval-frd``, on at most
        ``FRD_MAX_IMAGES`` of each). Conditional generation, with ``classifier_steps``: the
        intended-class accuracy (``shared_models.downstream``) of a classifier trained for that
        many steps on the held-out real slices. Only these scalars leave the hospital (and at a
        hospital that requires DP, not even they: client/evaluation.py).
        """
        if self.family.task == "translation":
            return self._evaluate_translation(holdout)
        own = self.family.evaluate_holdout(self.nets, holdout, self.device)  # aae: its masks
        return own if own is not None else self._evaluate_generation(holdout, seed,
                                                                     classifier_steps)

    def _evaluate_translation(self, holdout: Mapping[str, torch.Tensor]) -> dict[str, float]:
        key_a, key_b = self.family.pair_keys  # maskgan: mask -> image
        a, b = holdout.get(key_a), holdout.get(key_b)
        if a is None or b is None or len(a) == 0 or len(a) != len(b):
            # left out, not NaN: the coordinator's mean is weighted by eval-examples, and a NaN
            # at weight 0 would still make the federation's mean NaN (NaN * 0 is NaN), hiding
            # the hospitals that do hold pairs
            return {"eval-examples": 0}
        dims = self.model.spatial_dims
        win = min(11, self.model.image_size)
        ssim = SSIMMetric(dims, data_range=2.0, win_size=win)  # images live in [-1, 1]
        psnr = PSNRMetric(max_val=2.0)
        abs_err = []
        for start in range(0, len(a), EVAL_CHUNK):
            x = a[start:start + EVAL_CHUNK].to(self.device)
            y = b[start:start + EVAL_CHUNK].to(self.device).float()
            fake = self.family.sample(self.nets, x).float()
            ssim(fake, y)
            psnr(fake, y)
            abs_err.append((fake - y).abs().flatten(1).mean(1))
        values = torch.stack([ssim.aggregate().float().reshape(()),
                              psnr.aggregate().float().reshape(()),
                              torch.cat(abs_err).mean()]).tolist()  # one host sync
        return {"eval-ssim": values[0], "eval-psnr": values[1], "eval-mae": values[2],
                "eval-examples": len(a)}

    def _evaluate_generation(self, holdout: Mapping[str, torch.Tensor], seed: int,
                             classifier_steps: int = 0) -> dict[str, float]:
        images = holdout["image"]
        labels = holdout.get("label")
        gen = torch.Generator().manual_seed(seed)
        n = len(images)
        noise = torch.randn(max(n, 2), self.model.latent_dim, generator=gen).to(self.device)
        if labels is not None:
            labels = labels.to(self.device)
            if n < 2:
                labels = labels.repeat(2)[:2]
        fake = self.family.sample(self.nets, noise, labels).float().cpu()
        real_labels = labels[:n] if labels is not None else None
        d = self.nets[self.family.judge_component]
        judge = self.family.judge
        d.eval()
        try:
            d_real = torch.sigmoid(judge(self.nets, images.to(self.device), real_labels)
                                   .float()).mean()
            d_fake = torch.sigmoid(judge(self.nets, fake.to(self.device), labels).float()).mean()
            d_real_v, d_fake_v = torch.stack([d_real, d_fake]).tolist()
        finally:
            d.train()
        feat = self._feature_net
        if feat is None:
            feat = self._feature_net = FeatureNet(self.model.channels)
        fr, ff = feat(images.float().cpu()).numpy(), feat(fake).numpy()
        coverage = prdc(fr, ff[:n])
        intended = {}
        if labels is not None and self.model.num_classes and classifier_steps > 0:
            acc = self._intended_class_accuracy(images, real_labels, fake, labels.cpu(),
                                                classifier_steps)
            if acc is not None:  # left out, not NaN: the federation's mean is over those with it
                intended["eval-intended-class-accuracy"] = acc
        return {
            **intended,
            "eval-d-real": d_real_v,
            "eval-d-fake": d_fake_v,
            "eval-frechet": frechet_distance(fr, ff) if n >= 2 else float("nan"),
            "eval-mmd": mmd_rbf(fr, ff),
            "eval-frd": frechet_radiomics_distance(self._radiomics_of(images),
                                                   radiomics_features(fake[:FRD_MAX_IMAGES])),
            **{f"eval-{k}": v for k, v in coverage.items()},
            "eval-examples": n,
        }

    def _intended_class_accuracy(self, images: torch.Tensor, labels: torch.Tensor,
                                 fake: torch.Tensor, intended: torch.Tensor, steps: int
                                 ) -> float | None:
        """The real-slice classifier's balanced accuracy on ``fake`` against ``intended``; the
        classifier is trained once per held-out tensor and step count, kept across rounds.
        None where the held-out slices hold one class: nothing to tell classes apart with."""
        if len(images) < 2 or len(torch.unique(labels)) < 2:
            return None
        kept = self._real_classifier
        if kept is None or kept[0] is not images or kept[1] != steps:
            # evaluate runs under no_grad; its seed must not reset the round's random stream
            with torch.enable_grad(), torch.random.fork_rng(devices=[]):
                net = train_classifier({"image": images.float().cpu(), "label": labels.cpu()},
                                       self.model.num_classes, seed=0,
                                       budget=ClassifierBudget(steps=steps))
            kept = self._real_classifier = (images, steps, net)
        return intended_class_accuracy(kept[2], {"image": fake, "label": intended},
                                       self.model.num_classes)[0]

    def _radiomics_of(self, images: torch.Tensor) -> np.ndarray:
        """Radiomic features of the first ``FRD_MAX_IMAGES`` held-out images, kept across rounds
        (the held-out tensor is the per-process cached one)."""
        kept = self._real_radiomics
        if kept is None or kept[0] is not images:
            kept = self._real_radiomics = (images, radiomics_features(images[:FRD_MAX_IMAGES]))
        return kept[1]


def discriminator_round(d: nn.Module, opt: torch.optim.Optimizer, real: torch.Tensor,
                        fakes: torch.Tensor, *, steps: int, batch_size: int, ctx: StepContext,
                        generator: torch.Generator, real_labels: torch.Tensor | None = None,
                        fake_labels: torch.Tensor | None = None,
                        ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Train ``d`` for ``steps`` on real vs fakes; return (logits, d logit / d fake, metrics).

    Tensors are on ``ctx.device`` already. Every batch index comes from ``generator`` (a CPU
    generator: the same draws on any device), drawn for all steps before the first and uploaded
    once. Each step runs under ``ctx.autocast()`` and ``ctx.step`` (grad scaler under fp16). The
    final pass runs in eval mode and fp32, so each image's logit depends on that image only and
    its input gradient is exactly what the coordinator's chain rule needs. Loss, D(real) and
    D(fake) stay on the device; logits, gradients and their means come back in ONE copy.
    """
    n_real, n_fake = min(batch_size, len(real)), min(batch_size, len(fakes))
    draws = [torch.cat([torch.randint(len(real), (n_real,), generator=generator),
                        torch.randint(len(fakes), (n_fake,), generator=generator)])
             for _ in range(steps)]  # per step: real indices, then fake indices (as drawn)
    index = (torch.stack(draws) if draws else torch.empty(0, n_real + n_fake, dtype=torch.int64)
             ).to(ctx.device, non_blocking=True)
    totals = torch.zeros(3, device=ctx.device)  # loss-d, d-real, d-fake
    d.train()
    for step in range(steps):
        ri, fi = index[step, :n_real], index[step, n_real:]
        rl = real_labels[ri] if real_labels is not None else None
        fl = fake_labels[fi] if fake_labels is not None else None
        with ctx.autocast():
            out_real = d(real[ri], rl)
            out_fake = d(fakes[fi], fl)
            loss = (bce(out_real, torch.ones_like(out_real))
                    + bce(out_fake, torch.zeros_like(out_fake)))
        ctx.step(loss, opt)
        with torch.no_grad():
            totals += torch.stack([loss.detach().float(), torch.sigmoid(out_real.float()).mean(),
                                   torch.sigmoid(out_fake.float()).mean()])
    d.eval()
    try:
        x = fakes.detach().float().clone().requires_grad_(True)
        logits = d(x, fake_labels)
        (grads,) = torch.autograd.grad(logits.sum(), x)
    finally:
        d.train()
    # the one host sync of the round: logits, input gradients and the step means in one copy
    n = len(fakes)
    packed = torch.cat([logits.detach().float().reshape(-1), grads.float().reshape(-1),
                        totals / max(steps, 1)]).cpu().numpy()
    means = packed[-3:]
    metrics = {"loss-d": float(means[0]), "d-real": float(means[1]), "d-fake": float(means[2])}
    return (packed[:n].reshape(logits.shape).copy(),
            packed[n:-3].reshape(grads.shape).copy(), metrics)
