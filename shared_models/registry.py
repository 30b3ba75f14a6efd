"""The GAN families by name: one line per family, the one place a new family is added.

Each entry names the module and class; a family's module is imported when the family is first
asked for (it imports torch and builds networks). The registry imports no family module and no
family module imports the registry, so there is no import cycle between them (the modules used to
register themselves on import, which needed one).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .family import GanFamily

FAMILIES: dict[str, tuple[str, str]] = {
    "aae": ("shared_models.aae", "AdversarialAutoencoder"),
    "cdcgan": ("shared_models.cdcgan", "ConditionalDCGAN"),
    "cyclegan": ("shared_models.cyclegan", "CycleGAN"),
    "dcgan": ("shared_models.dcgan", "DCGAN"),
    "lapgan": ("shared_models.lapgan", "LAPGAN"),
    "maskgan": ("shared_models.maskgan", "MaskGan"),
    "pgan": ("shared_models.pgan", "PGAN"),
    "pix2pix": ("shared_models.pix2pix", "Pix2Pix"),
    "wgan-gp": ("shared_models.wgan", "WGANGP"),
}


def get_family(name: str) -> GanFamily:
    """The family called ``name`` (a new instance); a clear error lists the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown GAN family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    module, cls = FAMILIES[name]
    return getattr(import_module(module), cls)()


def families() -> list[str]:
    return sorted(FAMILIES)
