"""The weight codec: what travels must be exactly what was trained (fp32) or half of it (fp16)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from protocol import records as protocol
from shared_models import CodecError, ModelConfig, decode_into, encode, get_family
from shared_models.codec import nbytes


def _nets(seed: int = 0, size: int = 32):
    torch.manual_seed(seed)
    return get_family("dcgan").build(ModelConfig(image_size=size))


def test_fp32_round_trip_is_bit_exact_through_flower_records() -> None:
    src, dst = _nets(0), _nets(1)
    arrays = encode(src)
    assert {k.split(".")[0] for k in arrays} == {"generator", "discriminator"}
    # through Flower's ArrayRecord, as on the wire
    decode_into(dst, protocol.from_record(protocol.to_record(arrays)))
    for component in src:
        for (name, a), b in zip(src[component].state_dict().items(),
                                dst[component].state_dict().values()):
            assert a.dtype == b.dtype, name
            assert torch.equal(a, b), f"{component}.{name} differs after the round trip"


def test_fp16_halves_float_bytes_and_keeps_values_close() -> None:
    src, dst = _nets(0), _nets(1)
    full, half = encode(src), encode(src, wire_dtype="float16")
    float_bytes = sum(a.nbytes for a in full.values() if a.dtype == np.float32)
    int_bytes = nbytes(full) - float_bytes
    assert nbytes(half) == float_bytes // 2 + int_bytes
    assert all(a.dtype != np.float32 for a in half.values())
    decode_into(dst, half)
    w_src = src["generator"].state_dict()["project.0.weight"]
    w_dst = dst["generator"].state_dict()["project.0.weight"]
    assert w_dst.dtype == torch.float32
    assert torch.allclose(w_src, w_dst, atol=1e-3, rtol=1e-3)


def test_decode_rejects_wrong_shape_unknown_key_and_missing_entries() -> None:
    nets, arrays = _nets(), encode(_nets())
    key = next(k for k in arrays if k.endswith("weight") and arrays[k].ndim > 1)
    bad = dict(arrays, **{key: arrays[key][:1]})
    with pytest.raises(CodecError, match="shape"):
        decode_into(nets, bad)
    with pytest.raises(CodecError, match="unknown component"):
        decode_into(nets, {"critic.w": np.zeros(1, np.float32)})
    with pytest.raises(CodecError, match="no such entry"):
        decode_into(nets, {"generator.nope": np.zeros(1, np.float32)})
    partial = {k: v for k, v in arrays.items() if k != key}
    with pytest.raises(CodecError, match="missing"):
        decode_into(nets, partial, strict_components=["generator", "discriminator"])


@pytest.mark.parametrize("imports", [
    "import shared_models; from shared_models import get_family; get_family('dcgan');"
    "import shared_models.quality",
    # the trainer and the GPU benchmark run on machines (a lent GPU box) that may lack Flower
    "import client.trainer, bench.gpu",
])
def test_models_and_trainer_do_not_import_flower(imports: str) -> None:
    code = (f"import sys; {imports};"
            "sys.exit(1 if any(m == 'flwr' or m.startswith('flwr.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
