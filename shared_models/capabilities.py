"""What a family can do beyond plain training, as each family declares it (``FamilyBase.supports``).

A family names its capabilities in its own module (and, for checks that must not import torch,
in `shared_models.traits`, a test keeping the two equal); whoever needs to know which families
support something (a check, a refusal that lists them, the demo) asks the registry here.

- ``augment``: its train step shows D everything through ``ctx.small_data.view`` (DiffAugment);
- ``r1``: its train step adds ``ctx.small_data.r1`` to D's loss (WGAN-GP has its own penalty);
- ``dp``: it has a ``dp_plan`` / ``dp_step`` (DP-SGD, ``shared_models.dp``);
- ``ua-gan``: its discriminator outputs the logit of a probability, which UA-GAN's odds need;
- ``gradient-loss``: its generator loss adds ``gradient-loss`` x the image-gradient difference;
- ``lesion-cycle``: its cycle and identity terms add ``lesion-cycle-weight`` x their L1 inside
  the hospital's lesion masks;
- ``perceptual-loss``: its generator loss adds ``perceptual-loss`` x an L1 of the feature maps of
  the hospital's pinned network (``shared_models.perceptual``);
- ``cascade``: it builds ``cascade = k > 1`` refining stages (pix2pix; ``cascade-training``);
- ``colour``: it trains on 3-channel (RGB) images, ``channels = 3``: its networks take and give
  ``cfg.channels`` and its data, augmentation, quality measures and export handle colour.

The two loss settings with DP-SGD and UA-GAN (``LOSS_SETTINGS``): with DP both are supported,
each a term of a record's own loss in the family's DP generator step (the pair's gradients; the
record's own mask), clipped and noised with it. With preset ``ua-gan`` both are refused at
launch: the coordinator trains the generators there, and it holds no real target and no mask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .registry import families
from .traits import family_traits  # declared without torch (shared_models/traits.py)

if TYPE_CHECKING:
    from .family import GanFamily

AUGMENT = "augment"
R1 = "r1"
DP = "dp"
UA_GAN = "ua-gan"
GRADIENT_LOSS = "gradient-loss"
LESION_CYCLE = "lesion-cycle"
COLOUR = "colour"
CASCADE = "cascade"
PERCEPTUAL = "perceptual-loss"
CAPABILITIES = frozenset({AUGMENT, R1, DP, UA_GAN, GRADIENT_LOSS, LESION_CYCLE, COLOUR, CASCADE,
                          PERCEPTUAL})
# run key -> (TrainConfig field, the capability it needs): on when the field is > 0
LOSS_SETTINGS = {"gradient-loss": ("gradient_loss", GRADIENT_LOSS),
                 "lesion-cycle-weight": ("lesion_cycle_weight", LESION_CYCLE),
                 "perceptual-loss": ("perceptual_loss", PERCEPTUAL)}


def supporting(capability: str) -> tuple[str, ...]:
    """The registered families that declare ``capability``, sorted by name."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}; known: {sorted(CAPABILITIES)}")
    return tuple(name for name in families() if capability in family_traits(name).supports)


def refusal(family: GanFamily, capability: str, what: str) -> str:
    """The one-line reason ``family`` cannot do ``what`` (a setting or preset needing
    ``capability``), listing the families that can, and the family's own note when it has one."""
    note = family.lacks.get(capability)
    return (f"{what} is for {', '.join(supporting(capability))}, not family {family.name!r}"
            + (f" ({note})" if note else ""))


def check_supported(family: GanFamily, train: object) -> None:
    """Refuse settings the family's train step would silently ignore (``ValueError``)."""
    if getattr(train, "augment", "") and AUGMENT not in family.supports:
        raise ValueError(refusal(family, AUGMENT, "augment"))
    if getattr(train, "r1_gamma", 0.0) > 0 and R1 not in family.supports:
        raise ValueError(refusal(family, R1, "r1-gamma"))
    for key, (name, capability) in LOSS_SETTINGS.items():
        if getattr(train, name, 0.0) > 0 and capability not in family.supports:
            raise ValueError(refusal(family, capability, key))


def check_model(family: GanFamily, model: object, train: object | None = None) -> None:
    """Refuse model settings the family cannot build (``ValueError``): channels = 3 needs
    ``colour``; augment's colour ops (saturation, color) need channels = 3."""
    from .augment_policy import parse_policy

    channels = getattr(model, "channels", 1)
    if channels != 1 and COLOUR not in family.supports:
        raise ValueError(refusal(family, COLOUR, "channels = 3 (colour)"))
    if getattr(model, "cascade", 1) > 1 and CASCADE not in family.supports:
        raise ValueError(refusal(family, CASCADE, "cascade > 1"))
    if train is not None:
        parse_policy(getattr(train, "augment", ""), channels=channels)


def check_preset(preset: str, train: object) -> None:
    """Refuse the loss settings under preset ua-gan (``ValueError``): see the module docstring."""
    on = [key for key, (name, _) in LOSS_SETTINGS.items() if getattr(train, name, 0.0) > 0]
    if preset == "ua-gan" and on:
        raise ValueError(f"{', '.join(on)} is not supported with preset 'ua-gan': its coordinator "
                         "trains the generators and holds no real image or mask")
