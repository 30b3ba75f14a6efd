"""Named aggregation presets: which strategy a consortium picks, by name.

Each preset is a configuration of the one component-aware ``GanStrategy``.
"""

from __future__ import annotations

from typing import Callable

from .strategy import GanStrategy

PresetFactory = Callable[..., GanStrategy]


def _fedgan(components: tuple[str, ...], **kw: float | int) -> GanStrategy:
    """FedGAN (Rasouli et al. 2020): every component averaged, weighted by its examples."""
    return GanStrategy(components, **kw)  # type: ignore[arg-type]


PRESETS: dict[str, PresetFactory] = {"fedgan": _fedgan}


def make_strategy(preset: str, components: tuple[str, ...], **kw: float | int) -> GanStrategy:
    if preset not in PRESETS:
        raise ValueError(f"unknown strategy preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[preset](components, **kw)
