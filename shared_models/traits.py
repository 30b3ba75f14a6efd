"""What the run configuration's check needs of a family, declared without importing torch.

A family's module (its networks, torch) declares ``name``, ``data_layout``, ``supports`` and
``lacks``; ``fedsynth launch`` checks a run file against them before it submits anything, and
importing a family module to read four class attributes cost it torch's import (2-6 s, issue 24
item 8). So they are repeated here, one line per family, and a test checks each line against its
family's class (tests/unit/shared_models/test_families.py). A family registered without a line
here still works: its module is imported, as before (slower, same answers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .registry import FAMILIES

# shared_models.capabilities' names (it imports this module, so they are spelled out here; the
# test comparing each line with its family's class checks them)
AUGMENT, R1, DP, UA_GAN = "augment", "r1", "dp", "ua-gan"
GRADIENT_LOSS, LESION_CYCLE, COLOUR = "gradient-loss", "lesion-cycle", "colour"
CASCADE, PERCEPTUAL = "cascade", "perceptual-loss"


@dataclass(frozen=True)
class FamilyTraits:
    """A family's declared attributes that settings checks read (``shared_models.family``)."""

    name: str
    data_layout: str
    supports: frozenset[str] = frozenset()
    lacks: Mapping[str, str] = field(default_factory=dict)


_GAN = frozenset({AUGMENT, R1, DP, UA_GAN, COLOUR})
TRAITS: dict[str, FamilyTraits] = {t.name: t for t in (
    FamilyTraits("aae", "masked"),
    FamilyTraits("cdcgan", "labelled", _GAN),
    FamilyTraits("cyclegan", "unpaired", frozenset({DP, LESION_CYCLE})),
    FamilyTraits("dcgan", "image", _GAN),
    FamilyTraits("lapgan", "image", frozenset({DP}), {
        AUGMENT: "its discriminators judge a residual given the real coarse image; DiffAugment "
                 "of the pair is not implemented",
        R1: "no R1 penalty in its discriminator steps",
        UA_GAN: "UA-GAN's coordinator trains one generator against odds on noise-only fakes; "
                "lapgan's finer generators are conditioned on real coarse images"}),
    FamilyTraits("maskgan", "masked", frozenset({COLOUR})),
    FamilyTraits("pgan", "image", frozenset({DP}), {
        AUGMENT: "its discriminator's input resolution changes with the stage; DiffAugment of "
                 "the blended reals is not implemented",
        R1: "no R1 penalty in its discriminator step",
        UA_GAN: "UA-GAN's coordinator trains the generator without the round's stage and "
                "fade-in alpha"}),
    FamilyTraits("pix2pix", "paired", frozenset({AUGMENT, R1, DP, GRADIENT_LOSS, COLOUR, CASCADE,
                                                  PERCEPTUAL})),
    FamilyTraits("wgan-gp", "image", frozenset({AUGMENT, DP}),
                 {R1: "it has its own gradient penalty"}),
)}


def family_traits(name: str) -> Any:
    """The traits of family ``name`` (an unknown name: ``get_family``'s error, listing the known
    ones); a registered family without a line above is imported and is its own traits."""
    if name in FAMILIES and name in TRAITS:
        return TRAITS[name]
    from .registry import get_family

    return get_family(name)
