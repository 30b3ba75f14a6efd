"""Weight codec: a family's component state dicts <-> flat ``{"component.param": ndarray}``.

Flower-independent on purpose (Flower's ``ArrayRecord`` wraps these arrays in ``protocol``),
so checkpoints, aggregation tests and benchmarks use the same encoding as the wire.

Keys are prefixed by component (``generator.body.0.conv.weight``), so a single record carries every
component and still splits cleanly by prefix for per-component aggregation. fp32 is bit-exact;
fp16 halves the bytes (integer buffers such as ``num_batches_tracked`` are never down-cast).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn

WIRE_DTYPES = {"float32": np.float32, "float16": np.float16}


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
    if wire_dtype not in WIRE_DTYPES:
        raise CodecError(f"unknown wire dtype {wire_dtype!r}; use one of {sorted(WIRE_DTYPES)}")
    target = WIRE_DTYPES[wire_dtype]
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
