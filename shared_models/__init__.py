"""The pure core of fedsynth: GAN families, their training step and the weight codec.

No Flower import here (a test proves it): coordinator and hospitals both build on this package, and
so can a notebook or a benchmark without a federation.
"""

from importlib import import_module
from typing import Any

from .config import DataConfig, ModelConfig, TrainConfig

# Imported on first use (PEP 562): the settings above need neither torch nor MONAI, so a command
# line that only parses settings (``fedsynth hospital --help``, ``fedsynth status``) starts in a
# fraction of a second instead of paying ~5 s of CPU to import them (BENCHMARKS.md, "The test
# loop").
_LAZY = {"CodecError": "codec", "decode_into": "codec", "encode": "codec",
         "GanFamily": "family", "StepContext": "family", "families": "registry",
         "get_family": "registry"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CodecError",
    "GanFamily",
    "DataConfig",
    "ModelConfig",
    "StepContext",
    "TrainConfig",
    "decode_into",
    "encode",
    "families",
    "get_family",
]
