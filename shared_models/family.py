"""What a GAN family is, and the registry of families.

A family declares its components once (``components``); the codec, checkpoints, aggregation and
metrics are generic over that declaration, so adding a family never touches them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Protocol

import torch
from torch import nn

from .config import ModelConfig, TrainConfig
from .dp import PrivacyError, PrivateSteps
from .small_data import SmallData

Nets = dict[str, nn.Module]
Optimizers = dict[str, torch.optim.Optimizer]


@dataclass
class StepContext:
    """Everything a training step needs besides data, nets and optimisers.

    ``amp_dtype`` None means fp32. With fp16 a ``scaler`` is required (bf16 needs none).
    ``anchor`` holds the round's received global parameters, per component, for FedProx.
    ``small_data``: what the discriminator sees (augmentation) and its R1 penalty.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    prox_mu: float = 0.0
    anchor: dict[str, list[torch.Tensor]] | None = None
    # DP-SGD of this round (shared_models.dp): set, the family takes its ``dp_step`` path, which
    # draws its own Poisson batches from ``dp.data`` (the batch handed to train_step is empty).
    dp: PrivateSteps | None = None
    # DiffAugment policy and R1 weight of the round (shared_models.small_data); off by default
    small_data: SmallData = field(default_factory=SmallData)
    # mask-conditioned families: weight of the masked pixels in the L1 / adversarial terms
    lesion_weight: float = 1.0
    # pix2pix: weight and exponent of the image-gradient-difference loss (shared_models.losses)
    gradient_loss: float = 0.0
    gradient_loss_power: int = 2
    # cyclegan: weight of the cycle and identity L1 inside the batch's lesion masks
    lesion_cycle_weight: float = 0.0
    # pix2pix cascade, stagewise: the one stage (1-based) this round trains, earlier ones frozen;
    # None: every stage (end-to-end, or a single stage)
    cascade_stage: int | None = None
    # pix2pix: weight of the perceptual loss and the hospital's frozen feature network
    # (shared_models.perceptual); the net is set whenever the weight is > 0
    perceptual_loss: float = 0.0
    perceptual_net: nn.Module | None = None

    def autocast(self) -> torch.autocast:
        return torch.autocast(
            device_type=self.device.type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        )

    def prox_term(self, component: str, net: nn.Module) -> torch.Tensor | float:
        """FedProx: mu/2 * ||w - w_global||^2 (Li et al. 2020, eq. 2); 0 when disabled."""
        if self.prox_mu <= 0 or self.anchor is None or component not in self.anchor:
            return 0.0
        total = sum(((p - a) ** 2).sum() for p, a in zip(net.parameters(), self.anchor[component]))
        return 0.5 * self.prox_mu * total

    def step(self, loss: torch.Tensor, *optimizers: torch.optim.Optimizer) -> None:
        """One backward, then a step of each optimiser (through the grad scaler under fp16).

        Several optimisers share one backward when one loss trains several components (the two
        CycleGAN generators)."""
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            for optimizer in optimizers:
                self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()


class GanFamily(Protocol):
    """The contract every GAN family meets. Batches are dicts of tensors already on the device."""

    name: str
    components: tuple[str, ...]
    # which batch keys the family trains on, e.g. ("image",) or ("a", "b")
    batch_keys: tuple[str, ...]
    # "generation" (noise [+ label] -> image) or "translation" (image of domain a -> domain b)
    task: str
    # how a hospital's slices become batches: "image", "labelled", "paired" or "unpaired"
    data_layout: str
    # the adversarial roles, a partition of ``components`` (learning rates, private D presets)
    generators: tuple[str, ...]
    discriminators: tuple[str, ...]
    samplers: tuple[str, ...]  # what ``sample`` runs (a checkpoint must hold them)
    ema_components: tuple[str, ...]  # what a moving average (ema-decay, server-ema-decay) keeps
    supports: frozenset[str]  # capabilities (shared_models.capabilities)
    lacks: Mapping[str, str]  # capability -> why not, for the refusal
    output: str  # what ``sample`` draws: "image", or "mask" (K-channel masks)
    pair_keys: tuple[str, str]  # translation: local evaluation compares sample(a) with b

    def build(self, cfg: ModelConfig) -> Nets: ...

    def optimizers(self, nets: Nets, train: TrainConfig) -> Optimizers: ...

    def examples(self, data: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Examples that train each component, for the per-component aggregation weights."""
        ...

    def draw(self, data: Mapping[str, torch.Tensor], batch_size: int,
             balanced: bool = False) -> dict[str, torch.Tensor]:
        """One training batch from the local tensors (index draws on their device, no sync);
        ``balanced``: every class of ``label`` equally likely (train class-balanced)."""
        ...

    def train_step(
        self, batch: dict[str, torch.Tensor], nets: Nets, opts: Optimizers, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        """One optimisation step of every trained component; returns detached loss tensors.

        Returns tensors, not floats: converting to Python would synchronise the device on
        every step. The caller reduces them once at the end of the local work.
        """
        ...

    def sample(self, nets: Nets, noise: torch.Tensor, labels: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Generation: images from noise (+ labels). Translation: ``noise`` is the input batch."""
        ...

    def grid_inputs(self, cfg: ModelConfig, n: int) -> torch.Tensor | None: ...

    def show_input(self, inputs: torch.Tensor) -> torch.Tensor: ...

    def evaluate_holdout(self, nets: Nets, holdout: dict[str, torch.Tensor],
                         device: torch.device) -> dict[str, float] | None: ...


class FamilyBase:
    """Defaults shared by the families: paired keys drawn with one index, one count for all.

    Every fact about a family is asked of the family: which components are generators (default:
    those named ``generator`` or ``g_*``, the only place that name rule lives), what it supports
    (``shared_models.capabilities``), and its optional hooks, here with their defaults.
    """

    name = ""
    components: tuple[str, ...] = ()
    batch_keys: tuple[str, ...] = ()
    optional_keys: tuple[str, ...] = ()  # drawn with the same index when the data has them
    task = "generation"
    data_layout = "image"
    output = "image"  # what sample() draws; "mask": K-channel masks in {0, 1} (aae)
    pair_keys: tuple[str, str] = ("a", "b")  # translation: evaluate sample(a) against b
    supports: frozenset[str] = frozenset()  # capabilities (shared_models.capabilities)
    lacks: Mapping[str, str] = {}  # capability -> why the family has none (refusal message)

    @property
    def generators(self) -> tuple[str, ...]:
        """Generator side: trained at ``lr_g``, shared by every preset. Default: the components
        named ``generator`` or ``g_*``; a family with other names declares the tuple."""
        return tuple(c for c in self.components if c == "generator" or c.startswith("g_"))

    @property
    def discriminators(self) -> tuple[str, ...]:
        """The other components: discriminators and critics (``lr_d``; private under local-d)."""
        return tuple(c for c in self.components if c not in self.generators)

    @property
    def samplers(self) -> tuple[str, ...]:
        """The components ``sample`` runs: a checkpoint must hold them, and their norm
        statistics decide batch-statistics sampling (``server.images``)."""
        return self.generators

    @property
    def ema_components(self) -> tuple[str, ...]:
        """What the moving averages keep (``ema-decay`` at a hospital, ``server-ema-decay``)."""
        return self.generators

    # the discriminator whose odds a hospital's evaluation reports (eval-d-real / eval-d-fake)
    judge_component = "discriminator"

    def judge(self, nets: Nets, images: torch.Tensor, labels: torch.Tensor | None = None
              ) -> torch.Tensor:
        """``judge_component``'s logit on whole images (lapgan: its finest level's D)."""
        return nets[self.judge_component](images, labels)

    def at_round(self, nets: Nets, cfg: ModelConfig, server_round: int) -> None:
        """Put ``nets`` in the state of coordinator round ``server_round`` before they train or
        sample (pgan: the round's stage and fade-in alpha); nothing by default. Called by the
        hospital after loading a round's weights, the coordinator before a sample grid and
        ``fedsynth sample`` with the checkpoint's round."""

    def grid_inputs(self, cfg: ModelConfig, n: int) -> torch.Tensor | None:
        """The coordinator's fixed sample-grid inputs when the family has its own (maskgan:
        phantom masks); None: the default ones (seeded noise, or phantom slices)."""
        return None

    def show_input(self, inputs: torch.Tensor) -> torch.Tensor:
        """A translation input as the grey image shown beside its output (as is by default)."""
        return inputs

    def evaluate_holdout(self, nets: Nets, holdout: dict[str, torch.Tensor],
                         device: torch.device) -> dict[str, float] | None:
        """The family's own held-out evaluation (aae); None: the hospital's generic one."""
        return None

    def adam_betas(self, train: TrainConfig) -> tuple[float, float]:
        return (train.beta1, train.beta2)

    def dp_plan(self, data: Mapping[str, torch.Tensor], batch_size: int) -> tuple[float, int]:
        """DP accounting of one local step: (Poisson sample rate q, DP releases per step).

        A family without a ``dp_step`` cannot train under DP; the hospital refuses the round."""
        raise PrivacyError(f"family {self.name!r} has no differentially private training")

    def dp_records(self, data: Mapping[str, torch.Tensor]) -> int:
        return _length(data, self.batch_keys)

    def optimizers(self, nets: Nets, train: TrainConfig) -> Optimizers:
        """One Adam per component: ``generators`` at ``lr_g``, the rest (discriminators,
        critics) at ``lr_d``."""
        return {c: adam(nets[c].parameters(), train.lr_g if c in self.generators else train.lr_d,
                        self.adam_betas(train))
                for c in self.components}

    def examples(self, data: Mapping[str, torch.Tensor]) -> dict[str, int]:
        n = _length(data, self.batch_keys)
        return {c: n for c in self.components}

    def class_slices(self, nets: Nets) -> dict[str, tuple[int, int]]:
        """The per-class parameters, as codec keys -> (axis, start): class c's slice is index
        start + c along axis (``class-weighted-aggregation`` weights it by the hospitals' slices
        of class c). None by default: an unconditional family has no per-class parameters."""
        return {}

    def class_examples(self, data: Mapping[str, torch.Tensor], num_classes: int
                       ) -> list[int] | None:
        """Training slices per class (``label``), for per-class aggregation weights; None
        where the data has no labels."""
        labels = data.get("label")
        if self.data_layout != "labelled" or labels is None or num_classes < 1:
            return None
        return [int(n) for n in torch.bincount(labels.long().cpu(), minlength=num_classes)]

    def draw(self, data: Mapping[str, torch.Tensor], batch_size: int,
             balanced: bool = False) -> dict[str, torch.Tensor]:
        """Paired keys: ONE index draw serves every key, so pairs and labels stay aligned.

        ``balanced`` (labelled data): each record is drawn with weight 1 / (its class's count),
        so every class present is equally likely; without labels it changes nothing."""
        n = _length(data, self.batch_keys)
        if n == 0:
            raise ValueError(f"family {self.name!r}: no training examples")
        first = data[self.batch_keys[0]]
        labels = data.get("label")
        if balanced and labels is not None and len(labels) == n:
            weights = 1.0 / torch.bincount(labels)[labels].float()
            idx = torch.multinomial(weights, min(batch_size, n), replacement=True)
        else:
            idx = torch.randint(n, (min(batch_size, n),), device=first.device)
        keys = self.batch_keys + tuple(k for k in self.optional_keys
                                       if k in data and len(data[k]) == n)
        return {k: data[k][idx] for k in keys}


def _length(data: Mapping[str, torch.Tensor], keys: tuple[str, ...]) -> int:
    """Common length of the paired ``keys``; a missing key or unequal lengths is a caller error."""
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"training data lacks batch key(s) {missing}; has {sorted(data)}")
    lengths = {len(data[k]) for k in keys}
    if len(lengths) != 1:
        raise ValueError(f"paired batch keys {keys} have unequal lengths "
                         f"{[len(data[k]) for k in keys]}")
    return lengths.pop()


def eval_forward(net: nn.Module, *args: torch.Tensor | None) -> torch.Tensor:
    """``net(*args)`` in eval mode (batch-norm running statistics) without gradients, restoring
    the mode after (MONAI's ``eval_mode``)."""
    from monai.networks.utils import eval_mode

    with eval_mode(net):
        return net(*args)


def adam(params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float]
         ) -> torch.optim.Optimizer:
    """Adam, fused on CUDA: one kernel per step, and no host read-back of the grad scaler's
    ``found_inf`` (plain Adam under fp16 synchronises on it at every step)."""
    params = list(params)
    return torch.optim.Adam(params, lr, betas, fused=bool(params) and params[0].is_cuda)
