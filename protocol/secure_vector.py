"""What a hospital hands Flower's SecAgg+ to mask, and how the coordinator reads the unmasked sum.

Why an encoding of fedsynth's own: Flower's ``secaggplus_mod`` masks one flat list of float arrays
with one weight per hospital (``FitRes.num_examples``), clips every entry to +- its
``clipping_range`` and quantises it stochastically. fedsynth's reply is one ArrayRecord whose keys
carry the component (``generator.…``, ``discriminator.…``) and is weighted *per component* (a
CycleGAN hospital holding only domain A trained no ``d_b``). So the list is laid out here, the
same way on both sides, and carries its own weights:

* for every floating key of the reply, in sorted key order: ``(n_c / N) * clip(u_k, -b, b)``,
  where ``u_k`` is the hospital's update (trained - received) of that key, ``n_c`` the examples
  that trained its component (capped to ``N``, the run's ``secure-aggregation-max-examples``) and
  ``b`` the run's ``secure-aggregation-clip``;
* then one 1-element array per component, in sorted order: ``(n_c / N) * b``.

Every entry lies in [-b, b], so Flower's clipping (``clipping_range = b``) never changes it, and
the hospital tells Flower a constant weight (``N``: ratio 1), so Flower's own weighting is a plain
mean over the hospitals that finished. The coordinator's unmasked mean ``m`` then gives, for a key
``k`` of component ``c``, the example-weighted mean update ``m_k * b / m_c`` (the ``1/hospitals``
cancels) and ``m_c * hospitals * N / b`` examples. Updates, not weights, are summed: they are
small, so the clip is a real bound on what one hospital can move, and the quantisation step
(2b / quantisation range per hospital) is small beside them.

Integer keys (BatchNorm's ``num_batches_tracked``) are not sent: under secure aggregation they keep
their global value (torch reads them only for ``momentum=None``, which no family uses).

No cryptography here: masking, key agreement and secret sharing are Flower's.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from shared_models.codec import split_key


def secure_keys(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """The keys that travel masked: the floating ones, sorted."""
    return sorted(k for k, v in arrays.items() if np.issubdtype(np.asarray(v).dtype, np.floating))


def components_of(keys: Sequence[str]) -> list[str]:
    return sorted({split_key(k)[0] for k in keys})


def encode_update(trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray],
                  examples: Mapping[str, float], clip: float, max_examples: float
                  ) -> list[np.ndarray]:
    """The list a hospital gives ``secaggplus_mod`` (see the module docstring)."""
    if not (clip > 0 and max_examples >= 1):
        raise ValueError("secure aggregation needs clip > 0 and max_examples >= 1")
    keys = secure_keys(trained)
    missing = [k for k in keys if k not in received]
    if missing:
        raise ValueError(f"no received copy of {missing[:3]} to take the update against")
    comps = components_of(keys)
    share = {c: min(max(float(examples.get(c, 0.0)), 0.0), max_examples) / max_examples
             for c in comps}
    out: list[np.ndarray] = []
    for k in keys:
        update = np.asarray(trained[k], np.float64) - np.asarray(received[k], np.float64)
        update = np.nan_to_num(update, nan=0.0, posinf=clip, neginf=-clip)
        out.append(share[split_key(k)[0]] * np.clip(update, -clip, clip))
    out += [np.array([share[c] * clip]) for c in comps]
    return out


def decode_mean(mean: Sequence[np.ndarray], base: Mapping[str, np.ndarray], clip: float,
                max_examples: float, hospitals: int
                ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """From the unmasked mean over ``hospitals``: (the aggregated arrays, examples per component).

    ``base`` is the global model the hospitals were sent (its floating keys are the layout). A
    component no hospital trained (its weight is below one example) is left out: the caller keeps
    the previous copy, as the plain mean does.
    """
    keys = secure_keys(base)
    comps = components_of(keys)
    if len(mean) != len(keys) + len(comps):
        raise ValueError(f"secure aggregate has {len(mean)} arrays, the layout {len(keys)} + "
                         f"{len(comps)}")
    weight = {c: float(np.asarray(mean[len(keys) + i]).reshape(-1)[0])
              for i, c in enumerate(comps)}
    examples = {c: w * hospitals * max_examples / clip for c, w in weight.items()}
    out: dict[str, np.ndarray] = {}
    for k, m in zip(keys, mean):
        c = split_key(k)[0]
        if examples[c] < 0.5:
            continue
        ref = np.asarray(base[k])
        update = np.asarray(m, np.float64).reshape(ref.shape) * clip / weight[c]
        out[k] = (ref.astype(np.float64) + update).astype(ref.dtype)
    return out, {c: n for c, n in examples.items() if n >= 0.5}
