"""Weight codec: a family's component state dicts <-> flat ``{"component.param": ndarray}``.

Flower-independent on purpose (Flower's ``ArrayRecord`` wraps these arrays in ``protocol``),
so checkpoints, aggregation tests and benchmarks use the same encoding as the wire.

Keys are prefixed by component (``generator.body.0.conv.weight``), so a single record carries every
component and still splits cleanly by prefix for per-component aggregation. fp32 is bit-exact;
fp16 halves the bytes (integer buffers such as ``num_batches_tracked`` are never down-cast).

int8 (``wire-dtype = "int8"``, replies only) sends a hospital's *update* — its trained weights
minus the weights it received this round — as int8 with one float32 scale per output channel
(axis 0; one per tensor for 0/1-D tensors), ``quantize_update``; the coordinator adds it back
onto what it sent, ``dequantize_update``. Why the update and not the weights: a round moves a
weight by ~1e-3 of its size, so int8 of the raw weights (error ~ max|w| / 254) would drown the
round's change in rounding noise, and error feedback would be meaningless (next round's weights are
a new global, not "the same quantity again"). The update is small, so its int8 error is small in
absolute terms, and the rounding residual left at the hospital is added to its next update before
quantising (error feedback, Seide et al. 2014; Karimireddy et al. 2019): the sum of what the
hospital sent over rounds tracks the sum of its true updates to within one round's rounding
error, instead of the errors adding up round after round.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn

WIRE_DTYPES = {"float32": np.float32, "float16": np.float16}
# int8 is a reply format (an update against the received weights, ``quantize_update``); what the
# trainer encodes before quantising is float32
REPLY_DTYPES = (*WIRE_DTYPES, "int8")
SCALE_SUFFIX = "#scale"  # "<key>#scale": the int8 key's scales ('#' is in no torch state name)
INT8_MAX = 127
MAX_INT8_SCALE = 8.0  # a scale beyond this (|update| > ~1000 per element) is refused


class CodecError(ValueError):
    """A received array set does not fit the model: names the key and what is wrong."""


def split_key(key: str) -> tuple[str, str]:
    """``"generator.body.0.weight"`` -> ``("generator", "body.0.weight")``."""
    component, _, name = key.partition(".")
    if not name:
        raise CodecError(f"key {key!r} has no component prefix")
    return component, name


def encode(
    nets: Mapping[str, nn.Module],
    components: Iterable[str] | None = None,
    wire_dtype: str = "float32",
    include: "callable[[str, str], bool] | None" = None,
) -> dict[str, np.ndarray]:
    """State dicts of ``components`` (default: all) as prefixed numpy arrays.

    ``include(component, name)`` can drop entries (e.g. normalisation layers kept local by FedBN).
    """
    if wire_dtype not in REPLY_DTYPES:
        raise CodecError(f"unknown wire dtype {wire_dtype!r}; use one of {sorted(REPLY_DTYPES)}")
    target = WIRE_DTYPES.get(wire_dtype, np.float32)
    out: dict[str, np.ndarray] = {}
    for component in components if components is not None else nets:
        for name, tensor in nets[component].state_dict().items():
            if include is not None and not include(component, name):
                continue
            array = tensor.detach().to("cpu").numpy()
            if np.issubdtype(array.dtype, np.floating):
                array = array.astype(target, copy=True)
            else:
                array = array.copy()
            out[f"{component}.{name}"] = array
    return out


def decode_into(
    nets: Mapping[str, nn.Module],
    arrays: Mapping[str, np.ndarray],
    *,
    strict_components: Iterable[str] = (),
) -> set[str]:
    """Load prefixed arrays into the nets; returns the components that were touched.

    Every key must exist in its component with the same shape (else ``CodecError``); floating
    arrays are cast back to the parameter's dtype. For each component in ``strict_components``
    every one of its entries must be present.
    """
    per_component: dict[str, dict[str, torch.Tensor]] = {}
    for key, array in arrays.items():
        component, name = split_key(key)
        if component not in nets:
            raise CodecError(f"key {key!r}: unknown component {component!r}")
        state = nets[component].state_dict()
        if name not in state:
            raise CodecError(f"key {key!r}: no such entry in component {component!r}")
        expected = state[name]
        if tuple(array.shape) != tuple(expected.shape):
            raise CodecError(
                f"key {key!r}: shape {tuple(array.shape)} != expected {tuple(expected.shape)}"
            )
        per_component.setdefault(component, {})[name] = torch.from_numpy(
            np.ascontiguousarray(array)
        ).to(expected.dtype)
    for component in strict_components:
        missing = set(nets[component].state_dict()) - set(per_component.get(component, {}))
        if missing:
            raise CodecError(f"component {component!r}: missing {sorted(missing)[:3]}...")
    for component, state in per_component.items():
        nets[component].load_state_dict(state, strict=False)
    return set(per_component)


def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Payload bytes of an array set (the floor the wire is compared with)."""
    return sum(a.nbytes for a in arrays.values())


def norm_state_keys(nets: Mapping[str, nn.Module]) -> frozenset[str]:
    """Prefixed state-dict keys of normalisation layers (weights, biases, running statistics).

    FedBN keeps exactly these at the hospital. Batch, instance, group and layer norms count.
    """
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    keys: set[str] = set()
    for component, net in nets.items():
        for mod_name, module in net.named_modules():
            if isinstance(module, norm_types):
                prefix = f"{component}.{mod_name}." if mod_name else f"{component}."
                keys.update(prefix + name for name in module.state_dict())
    return frozenset(keys)


# ---------------------------------------------------------------- int8 updates

def _scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0],) if len(shape) >= 2 else (1,)


def _per_channel(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``scale`` broadcast against ``values`` (per row of axis 0, or one for the tensor)."""
    return scale.reshape((-1,) + (1,) * (values.ndim - 1)) if values.ndim >= 2 else scale[0]


def quantize_update(
    arrays: Mapping[str, np.ndarray],
    base: Mapping[str, np.ndarray],
    residual: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(wire arrays, new residual) for a reply of trained ``arrays`` against received ``base``.

    A floating key present in ``base`` with the same shape goes as ``int8`` plus ``key#scale``
    (float32): ``v = (arrays[k] - base[k]) + residual[k]``, ``scale = max|v| / 127`` per output
    channel, ``q = round(v / scale)``; the new residual is ``v - q * scale``. A floating key the
    hospital did not receive this round (kept local, not sent) goes as float16 weights; integer
    buffers go unchanged.
    """
    residual = residual or {}
    wire: dict[str, np.ndarray] = {}
    kept: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        ref = base.get(key)
        if not np.issubdtype(value.dtype, np.floating):
            wire[key] = value
            continue
        if ref is None or ref.shape != value.shape:
            wire[key] = value.astype(np.float16)
            continue
        v = value.astype(np.float32) - ref.astype(np.float32)
        r = residual.get(key)
        if r is not None and r.shape == v.shape:
            v = v + r
        flat = np.abs(v).reshape(v.shape[0], -1) if v.ndim >= 2 else np.abs(v).reshape(1, -1)
        scale = (flat.max(axis=1) if flat.size else np.zeros(len(flat))).astype(np.float32)
        scale = scale / INT8_MAX
        safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(v / _per_channel(v, safe)), -INT8_MAX, INT8_MAX).astype(np.int8)
        wire[key] = q
        wire[key + SCALE_SUFFIX] = scale.reshape(_scale_shape(v.shape))
        kept[key] = (v - q.astype(np.float32) * _per_channel(v, scale)).astype(np.float32)
    return wire, kept


def is_int8_reply(arrays: Mapping[str, np.ndarray]) -> bool:
    return any(k.endswith(SCALE_SUFFIX) for k in arrays) or any(
        a.dtype == np.int8 for a in arrays.values())


def dequantize_update(
    wire: Mapping[str, np.ndarray],
    base: Mapping[str, np.ndarray],
    max_scale: float = MAX_INT8_SCALE,
) -> dict[str, np.ndarray]:
    """The reply's weights: ``base[k] + q * scale`` for int8 keys, the others unchanged.

    The payload is hostile input: an int8 key must be a floating key of ``base`` with exactly its
    shape and come with its ``#scale`` (float32, shape ``(rows,)`` or ``(1,)``, finite, in
    ``[0, max_scale]``); a scale without its int8 key, or an int8 array anywhere else, raises
    ``CodecError``. Nothing is allocated beyond ``base``'s shapes.
    """
    out: dict[str, np.ndarray] = {}
    for key, array in wire.items():
        if key.endswith(SCALE_SUFFIX):
            parent = key[: -len(SCALE_SUFFIX)]
            if parent not in wire or wire[parent].dtype != np.int8:
                raise CodecError(f"key {key[:80]!r}: a scale without its int8 array")
            continue
        if array.dtype != np.int8:
            out[key] = array
            continue
        ref = base.get(key)
        if ref is None or not np.issubdtype(ref.dtype, np.floating):
            raise CodecError(f"key {key[:80]!r}: int8 where no floating weights were sent")
        if array.shape != ref.shape:
            raise CodecError(f"key {key!r}: shape {array.shape} != expected {ref.shape}")
        scale = wire.get(key + SCALE_SUFFIX)
        if scale is None:
            raise CodecError(f"key {key!r}: int8 array without {SCALE_SUFFIX}")
        if scale.dtype != np.float32 or scale.shape != _scale_shape(ref.shape):
            raise CodecError(f"key {key!r}: scale {scale.dtype} {scale.shape} is not float32 "
                             f"{_scale_shape(ref.shape)}")
        if not (np.isfinite(scale).all() and (scale >= 0).all() and (scale <= max_scale).all()):
            raise CodecError(f"key {key!r}: scale not finite or outside [0, {max_scale:g}]")
        out[key] = (ref.astype(np.float32)
                    + array.astype(np.float32) * _per_channel(array, scale)).astype(np.float32)
    return out
