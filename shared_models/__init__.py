"""The pure core of fedsynth: GAN families, their training step and the weight codec.

No Flower import here (a test proves it): coordinator and hospitals both build on this package, and
so can a notebook or a benchmark without a federation.
"""

from .codec import CodecError, decode_into, encode
from .config import DataConfig, ModelConfig, TrainConfig
from .family import GanFamily, StepContext, families, get_family

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
