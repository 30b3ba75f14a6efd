"""Typed settings shared by coordinator and hospitals.

They travel to hospitals as flat ``ConfigRecord`` scalars (see ``to_flat``/``from_flat``), never as
code: a hospital rebuilds the networks from these numbers, it never evaluates anything it received.
Each field carries its one-line help and, where it is a run setting, its key: the run
configuration (``server/run_config.py``) is built from these fields, so a setting is added by
adding a field here (or to the coordinator's ``FederationConfig``) and nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

# Run-sent patterns are checked (length cap, what RE2 cannot compile) and matched by RE2, a
# linear-time engine, in one place: shared_models/patterns.py.
from .patterns import MAX_PATTERN_CHARS, check_pattern  # noqa: F401 - part of this module's API
# Every field is a ``setting`` of the one settings toolkit (shared_models/settings.py).
from .settings import Codec, setting  # noqa: F401 - ``setting`` is part of this module's API

T = TypeVar("T")


@dataclass(frozen=True)
class ModelConfig:
    """What network to build: identical on every side of the federation."""

    family: str = setting("dcgan", "GAN family: dcgan, cdcgan, wgan-gp, lapgan (3-level "
                          "Laplacian pyramid), pgan (progressive growing), pix2pix, cyclegan, maskgan (mask -> image), "
                          "aae (masks)")
    image_size: int = setting(32, "square slices (2D) or cubes (3D): a power of two, 16 to 256")
    channels: int = setting(1, "image channels: 1 (grey) or 3 (colour photographs: fundus, "
                            "dermoscopy, pathology; RGB in [-1, 1] per channel; dcgan, cdcgan, "
                            "pix2pix, maskgan; 2D)")
    latent_dim: int = setting(64, "size of the generator's noise vector")
    width: int = setting(32, "channels of the widest-resolution layer; deeper layers double it")
    spatial_dims: int = setting(2, "2 (slices) or 3 (volumes: dcgan, wgan-gp, lapgan, pgan, "
                                   "pix2pix, maskgan, aae)")
    num_classes: int = setting(0, "classes of a conditional family (from data's classes)",
                               run=False)
    conditioning: str = setting(
        "projection", "how a conditional family (cdcgan) carries the class, comma separated: "
        "projection (D's class embedding on its last features, always on), multiscale (also on "
        "every earlier stage), acgan (D also classifies, G is scored by it), cbn (class-"
        "conditional batch norm in G)", sep=",")
    cascade: int = setting(1, "pix2pix: stages of a refining cascade (Nie et al. 2017, Wei et "
                           "al. 2018), 1 to 4: stage j >= 2 takes the input and stage j-1's "
                           "output (auto-context) and refines it; 1: one stage")
    # pgan: the stage schedule (shared_models.pgan.schedule), a model setting so that it is signed
    # with every round's message and stored in every checkpoint's model
    pgan_rounds_per_stage: int = setting(
        4, "pgan: rounds of fade-in and rounds of stable training per resolution (4 px first, "
        "doubling to image-size); every hospital derives the stage from the round number")
    # "group" (BatchNorm layers swapped for GroupNorm, shared_models.dp) when the run trains with
    # DP (train dp-noise-multiplier > 0): derived by the run configuration, so every side builds
    # the same architecture.
    norm: str = setting("batch", "normalisation: batch (as published) or group (DP runs)",
                        run=False)

    def __post_init__(self) -> None:
        size = self.image_size
        if size < 16 or size > 256 or size & (size - 1):
            raise ValueError(f"image_size must be a power of two in [16, 256], got {size}")
        if self.pgan_rounds_per_stage < 1:
            raise ValueError(f"pgan_rounds_per_stage must be >= 1, got {self.pgan_rounds_per_stage}")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (colour), got {self.channels}")
        if self.channels == 3 and self.spatial_dims != 2:
            raise ValueError("channels = 3 (colour) is for 2D images (spatial-dims 2): colour "
                             "modalities are photographs, not volumes")
        if self.latent_dim < 1 or self.width < 1 or self.num_classes < 0:
            raise ValueError("latent_dim and width must be >= 1, num_classes >= 0")
        unknown = set(self.conditioning_set) - set(CONDITIONING)
        if unknown or "projection" not in self.conditioning_set:
            raise ValueError(f"conditioning {self.conditioning!r}: one or more of "
                             f"{', '.join(CONDITIONING)}, projection included"
                             + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else ""))
        if self.norm not in ("batch", "group"):
            raise ValueError(f"norm must be batch or group, got {self.norm!r}")
        if not 1 <= self.cascade <= MAX_CASCADE:
            raise ValueError(f"cascade must be 1 to {MAX_CASCADE} stages, got {self.cascade}")

    @property
    def conditioning_set(self) -> frozenset[str]:
        return frozenset(x.strip() for x in self.conditioning.split(",") if x.strip())


# The memorisation audit's near-copy bar (shared_models.audit): here, where a command line's help
# can read it without importing torch.
SSIM_THRESHOLD = 0.9

MAX_CASCADE = 4  # pix2pix cascade stages (each one a full UNet and PatchGAN)
CASCADE_TRAINING = ("end-to-end", "stagewise")

# How a conditional generator carries its class (BENCHMARKS.md, "Class-faithful conditioning").
CONDITIONING = ("projection", "multiscale", "acgan", "cbn")

MAX_EVAL_CLASSIFIER_STEPS = 2000


@dataclass(frozen=True)
class TrainConfig:
    """How a hospital trains in one round."""

    local_steps: int = setting(20, "optimiser steps per component per round at each hospital")
    batch_size: int = setting(16, "images per local step")
    lr_g: float = setting(2e-4, "generator learning rate (Adam)")
    lr_d: float = setting(2e-4, "discriminator learning rate (Adam)")
    beta1: float = setting(0.5, "Adam beta1 (DCGAN: 0.5, Radford et al. 2016)")
    beta2: float = setting(0.999, "Adam beta2")
    prox_mu: float = setting(0.0, "FedProx proximal weight at the hospitals; 0 disables it")
    wire_dtype: str = setting("float32", "arrays on the wire: float32, float16 or int8 (int8: "
                              "replies carry the update as 8-bit with per-channel scales and "
                              "error feedback at the hospital; downloads go as float16)")
    seed: int = setting(0, "seed of the initial weights and the hospitals' batch draws")
    dp_noise_multiplier: float = setting(0.0, "DP-SGD at the hospitals: Gaussian noise std / "
                                         "clipping norm on every real-data gradient; 0: no DP")
    dp_max_grad_norm: float = setting(1.0, "DP-SGD: per-record gradient clipping norm (L2)")
    # Small local data (shared_models/small_data.py; BENCHMARKS.md "Small local data")
    augment: str = setting("", "DiffAugment of everything D sees, real and fake: comma-separated "
                           "translation, cutout, brightness, contrast, and for channels = 3 "
                           "saturation or color (brightness, saturation, contrast) ('' off; "
                           "dcgan, cdcgan, wgan-gp, pix2pix)", sep=",")
    r1_gamma: float = setting(0.0, "R1 penalty weight on real images (Mescheder 2018); 0 off "
                              "(dcgan, cdcgan, pix2pix)")
    ema_decay: float = setting(0.0, "hospital: moving average of the generator over the local "
                               "steps, sent in place of the last step's; 0 off, else in (0, 1)")
    class_balanced: bool = setting(False, "labelled families: every class equally likely in a "
                                   "hospital's batches (a rare lesion type is drawn as often as "
                                   "a common one)")
    eval_classifier_steps: int = setting(
        200, "conditional families: optimiser steps of the classifier a hospital trains on its "
        "held-out real slices to read the intended class of generated ones at evaluation "
        f"(eval-intended-class-accuracy); 0 off, at most {MAX_EVAL_CLASSIFIER_STEPS}")
    lesion_weight: float = setting(1.0, "mask-conditioned families: weight of the masked (lesion) "
                                   "pixels in the L1 and adversarial terms; 1 weighs all alike")
    gradient_loss: float = setting(0.0, "pix2pix: weight of the image-gradient-difference loss "
                                   "(Nie et al. 2017) beside L1, 2D and 3D; 0 off")
    gradient_loss_power: int = setting(2, "gradient-loss: exponent p of each axis' gradient "
                                       "difference, 1 or 2 (Nie et al.: 2)")
    lesion_cycle_weight: float = setting(0.0, "cyclegan: weight of an L1 of the cycle and identity "
                                         "terms inside the hospitals' lesion masks (SEG/RTSTRUCT, "
                                         "mask-labels); 0 off")
    perceptual_loss: float = setting(0.0, "pix2pix: weight of the perceptual (deep-supervision) "
                                     "loss of Zhao et al. 2018, an L1 between feature maps of "
                                     "the network each hospital supplies (perceptual-network); "
                                     "0 off")
    cascade_training: str = setting(
        "end-to-end", "pix2pix cascade > 1: end-to-end (every stage trains every step, a loss on "
        "each stage's output) or stagewise (stage j trains from round (j-1) x "
        "cascade-stage-rounds + 1, earlier stages frozen; the round the coordinator signed "
        "decides, so every hospital trains the same stage)", choices=CASCADE_TRAINING)
    cascade_stage_rounds: int = setting(5, "cascade-training stagewise: rounds each stage trains "
                                        "before the next starts (the last trains to the end)")

    def __post_init__(self) -> None:
        from .augment_policy import parse_policy  # torch-free

        # an unknown op is refused here, by name; saturation / color against the model's
        # channels in capabilities.check_model (launch and hospital)
        parse_policy(self.augment, channels=3)
        if not (self.r1_gamma >= 0 and 0 <= self.ema_decay < 1):
            raise ValueError("r1_gamma must be >= 0 and ema_decay in [0, 1)")
        if not 0 <= self.eval_classifier_steps <= MAX_EVAL_CLASSIFIER_STEPS:
            # a coordinator sets it: a hospital's evaluation is not an open-ended compute order
            raise ValueError(f"eval-classifier-steps must be in [0, {MAX_EVAL_CLASSIFIER_STEPS}]"
                             f", got {self.eval_classifier_steps}")
        if self.local_steps < 1 or self.batch_size < 1:
            raise ValueError("local_steps and batch_size must be >= 1")
        if self.wire_dtype not in ("float32", "float16", "int8"):
            raise ValueError("wire_dtype must be float32, float16 or int8, got "
                             f"{self.wire_dtype!r}")
        if not (self.lr_g >= 0 and self.lr_d >= 0 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1
                and self.prox_mu >= 0 and self.lesion_weight > 0):
            raise ValueError("learning rates and prox_mu must be >= 0, betas in [0, 1), "
                             "lesion_weight > 0")
        if not (0 <= self.gradient_loss < math.inf and 0 <= self.lesion_cycle_weight < math.inf
                and self.gradient_loss_power in (1, 2)):
            raise ValueError("gradient-loss and lesion-cycle-weight must be finite and >= 0, "
                             f"gradient-loss-power 1 or 2 (got {self.gradient_loss}, "
                             f"{self.lesion_cycle_weight}, {self.gradient_loss_power})")
        if not 0 <= self.perceptual_loss < math.inf:
            raise ValueError(f"perceptual-loss must be finite and >= 0, got {self.perceptual_loss}")
        if self.cascade_training not in CASCADE_TRAINING or self.cascade_stage_rounds < 1:
            raise ValueError(f"cascade-training must be one of {', '.join(CASCADE_TRAINING)} and "
                             f"cascade-stage-rounds >= 1 (got {self.cascade_training!r}, "
                             f"{self.cascade_stage_rounds})")
        if not (self.dp_noise_multiplier >= 0 and self.dp_max_grad_norm > 0
                and math.isfinite(self.dp_noise_multiplier)
                and math.isfinite(self.dp_max_grad_norm)):
            raise ValueError("dp-noise-multiplier must be >= 0 and dp-max-grad-norm > 0")
        if self.dp and self.class_balanced:
            # the accountant's sample rate q is that of Poisson sampling of every record alike
            raise ValueError("class-balanced batches are not supported with DP-SGD "
                             "(dp-noise-multiplier > 0): DP samples every record alike")
        if self.dp and (self.augment or self.r1_gamma > 0):
            # the DP step (shared_models/dp.py) clips per-record gradients of the plain losses;
            # R1 is another real-data term, and augmented real batches are not wired into it
            raise ValueError("augment and r1-gamma are not supported with DP-SGD "
                             "(dp-noise-multiplier > 0): turn them off for a DP run")

    @property
    def dp(self) -> bool:
        return self.dp_noise_multiplier > 0

    def cascade_stage(self, stages: int, server_round: int) -> int | None:
        """The one cascade stage (1-based) trained in ``server_round`` under stagewise training,
        from the round the coordinator signed (rounds count from 1; 0, a round outside a
        federation, trains stage 1); None: end-to-end, or a single stage (all stages train)."""
        if stages <= 1 or self.cascade_training != "stagewise":
            return None
        return min(stages, max(server_round - 1, 0) // self.cascade_stage_rounds + 1)


# The per-slice text attributes a hospital keeps for these rules (client/dicom/types.py META_KEYS):
# Modality, SeriesDescription, ProtocolName, BodyPartExamined, ImageComments, SequenceName.
DOMAIN_ATTRIBUTES = ("series_description", "modality", "protocol_name", "body_part",
                     "image_comments", "sequence_name")


@dataclass(frozen=True)
class DataConfig:
    """Which slices are which class (conditional families) or domain (translation families).

    The class ORDER is the federation's (label k means the same class at every hospital); a
    slice's class is the one whose pattern (a regular expression, case-insensitive; default: the
    class name) is found in its ``class_attribute``. Domains A and B likewise, e.g. MR -> CT with
    ``domain_attribute = "modality"``. A hospital may override the patterns and attribute with its
    own (``[hospital] label-attribute`` / ``label-patterns``): a site names its series its own way.
    """

    classes: str = setting("T1w,T2w", "class names, comma separated, in label order (cdcgan)",
                           sep=",")
    class_attribute: str = setting("series_description", "slice attribute the classes are read "
                                   "from: {choices}", choices=DOMAIN_ATTRIBUTES)
    class_patterns: str = setting("", "one regular expression per class, ';' separated "
                                  "(default: each class name)", sep=";")
    domain_a: str = setting("T1w", "name of domain A of a translation family (its input)")
    domain_b: str = setting("T2w", "name of domain B (the translation's target)")
    domain_attribute: str = setting("series_description", "slice attribute the domains are read "
                                    "from, e.g. modality for MR -> CT")
    domain_a_pattern: str = setting("", "regular expression for domain A (default: its name)")
    domain_b_pattern: str = setting("", "regular expression for domain B (default: its name)")
    mask_labels: str = setting("lesion", "mask labels in channel order, comma separated (masked "
                               "families: DICOM SEG segments / RTSTRUCT ROIs at the hospitals)",
                               sep=",")
    mask_label_patterns: str = setting("", "one regular expression per mask label, ';' separated "
                                       "(default: each label), searched in a segment's label, "
                                       "description and code (scheme:value)", sep=";")

    def __post_init__(self) -> None:
        for attr in (self.class_attribute, self.domain_attribute):
            if attr not in DOMAIN_ATTRIBUTES:
                raise ValueError(f"slice attribute {attr!r} is not one of {DOMAIN_ATTRIBUTES}")
        if not self.class_names:
            raise ValueError("classes must name at least one class")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"classes {self.classes!r} repeat a name")
        pats = self.class_pattern_list
        if pats and len(pats) != len(self.class_names):
            raise ValueError(f"class_patterns has {len(pats)} patterns for "
                             f"{len(self.class_names)} classes")
        if not self.domain_a or not self.domain_b or self.domain_a == self.domain_b:
            raise ValueError("domain_a and domain_b must be two different names")
        if not self.mask_label_names:
            raise ValueError("mask_labels must name at least one label")
        mask_pats = self.mask_label_pattern_list
        if mask_pats and len(mask_pats) != len(self.mask_label_names):
            raise ValueError(f"mask_label_patterns has {len(mask_pats)} patterns for "
                             f"{len(self.mask_label_names)} mask labels")
        for p in (*pats, *mask_pats, self.domain_a_pattern, self.domain_b_pattern):
            check_pattern(p)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(x.strip() for x in self.classes.split(",") if x.strip())

    @property
    def mask_label_names(self) -> tuple[str, ...]:
        return tuple(x.strip() for x in self.mask_labels.split(",") if x.strip())

    @property
    def mask_label_pattern_list(self) -> tuple[str, ...]:
        return tuple(self.mask_label_patterns.split(";")) if self.mask_label_patterns else ()

    @property
    def class_pattern_list(self) -> tuple[str, ...]:
        return tuple(x for x in self.class_patterns.split(";")) if self.class_patterns else ()


def to_flat(obj: Any, prefix: str) -> dict[str, Any]:
    """Flatten a config dataclass into ``prefix.field`` scalars for a ConfigRecord."""
    return _wire(type(obj)).encode(obj, prefix + ".", spelling="name")


def from_flat(cls: type[T], values: Mapping[str, Any], prefix: str) -> T:
    """Rebuild a config dataclass from ``prefix.field`` scalars (keys with other prefixes are not
    its own); an unknown ``prefix.`` key is refused, with the field it is closest to.

    Each value is coerced to the field's declared type, so a malformed record fails here with a
    ``ValueError`` that names the field, not later inside a network constructor.
    """
    return _wire(cls).decode(values, prefix + ".", spelling="name")


def _wire(cls: type[T]) -> Codec[T]:
    """The config record's codec of one part: field names as keys, derived fields included."""
    if cls not in _WIRE:
        _WIRE[cls] = Codec(cls, "config field", lenient=True, derived=True)
    return _WIRE[cls]


_WIRE: dict[type, Codec[Any]] = {}
