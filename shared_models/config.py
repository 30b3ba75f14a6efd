"""Typed settings shared by coordinator and hospitals.

They travel to hospitals as flat ``ConfigRecord`` scalars (see ``to_flat``/``from_flat``), never as
code: a hospital rebuilds the networks from these numbers, it never evaluates anything it received.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class ModelConfig:
    """What network to build: identical on every side of the federation."""

    family: str = "dcgan"
    image_size: int = 32  # square slices (2D) or cubes (3D), a power of two from 32 to 128
    channels: int = 1  # image channels (grey-level medical images)
    latent_dim: int = 64  # size of the generator's noise vector
    width: int = 32  # channels of the widest-resolution layer; deeper layers double it
    spatial_dims: int = 2
    num_classes: int = 0  # > 0 for class-conditional families

    def __post_init__(self) -> None:
        size = self.image_size
        if size < 16 or size > 256 or size & (size - 1):
            raise ValueError(f"image_size must be a power of two in [16, 256], got {size}")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")


@dataclass(frozen=True)
class TrainConfig:
    """How a hospital trains in one round."""

    local_steps: int = 20  # optimiser steps per component per round
    batch_size: int = 16
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5  # DCGAN's Adam betas (Radford et al. 2016, sec. 4)
    beta2: float = 0.999
    prox_mu: float = 0.0  # FedProx proximal weight; 0 disables it
    wire_dtype: str = "float32"  # "float32" or "float16" on the wire
    seed: int = 0

    def __post_init__(self) -> None:
        if self.local_steps < 1 or self.batch_size < 1:
            raise ValueError("local_steps and batch_size must be >= 1")
        if self.wire_dtype not in ("float32", "float16"):
            raise ValueError(f"wire_dtype must be float32 or float16, got {self.wire_dtype!r}")


def to_flat(obj: Any, prefix: str) -> dict[str, Any]:
    """Flatten a config dataclass into ``prefix.field`` scalars for a ConfigRecord."""
    return {f"{prefix}.{k}": v for k, v in asdict(obj).items()}


def from_flat(cls: type[T], values: Mapping[str, Any], prefix: str) -> T:
    """Rebuild a config dataclass from ``prefix.field`` scalars, ignoring unknown keys.

    Each value is coerced to the field's declared type, so a malformed record fails here with a
    ``ValueError`` that names the field, not later inside a network constructor.
    """
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        key = f"{prefix}.{f.name}"
        if key not in values:
            continue
        caster = {"int": int, "float": float, "str": str, "bool": bool}.get(str(f.type), None)
        try:
            kwargs[f.name] = caster(values[key]) if caster else values[key]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config field {key!r}: cannot use {values[key]!r}") from exc
    return cls(**kwargs)
