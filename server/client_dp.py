"""Client-level differential privacy on the aggregate (DP-FedAvg: McMahan et al. 2018, "Learning
differentially private recurrent language models"; the semantics of Flower's
``DifferentialPrivacyServerSideFixedClipping``).

Each round, at the coordinator:

1. each hospital's update ``u_i = trained - received`` over the shared components it sends back
   this round is clipped to L2 norm ``C`` (``client-dp-clip``), **jointly** over all those
   components' floating arrays: ``u_i * min(1, C / ||u_i||)``;
2. per component, the clipped updates of the hospitals that trained it (``n_c`` of them) are
   averaged with **fixed, equal weights**, and Gaussian noise N(0, sigma^2) with
   ``sigma = z * C / n_c`` (``z`` = ``client-dp-noise-multiplier``) is added to every coordinate;
3. the noised mean update goes through the server optimiser exactly as a plain round's mean.

Adding or removing one hospital changes the sum of clipped updates by at most ``C`` (jointly over
every component), and the noise on that sum is ``z * C`` on every coordinate: one round is one
release of the Gaussian mechanism with multiplier ``z``. Opacus' RDP accountant (the one
``shared_models.dp.Accountant`` wraps for hospital-side DP-SGD) composes the rounds, with
sampling rate ``q`` = hospitals sampled / hospitals connected (1.0 when all train), into the
run's epsilon at ``client-dp-delta``.

**Why equal weights.** With example-count weights ``w_i / sum_j w_j`` a hospital's influence on
the mean is ``w_i C / sum_j w_j``: a hospital claiming (or holding) most of the examples moves
the mean by nearly ``C`` instead of ``C / n``, so no fixed noise scale matches the sensitivity
(and the weights themselves are a function of each hospital's data, released unnoised). Bounding
the weights (McMahan et al.'s ``w_i = min(n_i / w_hat, 1)`` with a fixed denominator) would need
a public cap chosen per consortium; equal weights are the same mechanism with the cap at 1 and
are what Flower's accounted fixed-clipping path requires too.

**Why not Flower's wrapper.** ``DifferentialPrivacyServerSideFixedClipping`` wraps a strategy and
(a) clips every reply's arrays positionally against the *whole* current ``ArrayRecord``, while a
fedsynth reply carries only this round's reply components (local discriminators, FedBN's local
norm entries and ``sync-every`` rounds leave keys out) and may be int8 codes on the wire (they are
dequantised in ``validate_train_reply``, after the wrapper would have clipped the codes);
(b) adds the noise to the wrapped strategy's *result*, which in ``GanStrategy`` is already the
server optimiser's step (FedAvgM / FedAdam), not the mean; (c) noises integer buffers; and (d)
accounts only for ``FedAvg.aggregate_train`` without amplification by sampling. The mechanism
is the same few lines, so it is written here, on the validated updates, before the server step.

**What else is done.** Integer buffers (``num_batches_tracked``) cannot be noised and are not
released: they keep the previous global value. A noised BatchNorm ``running_var`` is clamped at 0
(post-processing, no privacy cost). Reply validation's cross-hospital outlier test
(``norm_outliers``, against the median of the *other* replies) is off in a client-DP run: whether
hospital j is dropped would then depend on hospital i, so one hospital could change the sum by
more than ``C``; clipping bounds each hospital's influence instead. The per-hospital bound
(``update_bound``, against the global model only) stays.

**Limits** (docs/security.md, "Client-level DP"): the coordinator adds the noise and sees every
update in the clear; hospitals' metrics (losses, example counts, evaluations) in the replies are
not covered; ``n_c`` is the number of replies aggregated (as Flower's wrapper does), so the count
of hospitals that replied is public; the accountant's amplification bound is the Poisson one at
``q``, while Flower samples a fixed number of hospitals without replacement (only matters with
``fraction-train`` < 1). The noise comes from the OS's entropy, not the run's seed.

No torch at import (``server/run_config.py`` imports ``check_client_dp_run``); Opacus is imported
when an epsilon is computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from shared_models.codec import split_key

from .aggregation import Update

# the launch refusal and the default delta are torch-free (server/run_rules.py: launch's check)
from .run_rules import CLIENT_DP_DELTA as DEFAULT_DELTA, check_client_dp_run  # noqa: E402,F401
# Entries of a round's ``server`` section in metrics.jsonl (also Prometheus and `fedsynth status`)
EPSILON = "client-dp-epsilon"
SAMPLE_RATE = "client-dp-sample-rate"
NOISE_MULTIPLIER = "client-dp-noise-multiplier"
NOISE_STD = "client-dp-noise-std"  # sigma of the round's largest-n component: z C / n
CLIPPED = "client-dp-clipped"  # hospitals whose update was scaled down to client-dp-clip


def _floating(ref: np.ndarray) -> bool:
    return bool(np.issubdtype(ref.dtype, np.floating))


@dataclass
class Release:
    """One round's noised mean: the update for the server step and what the round notes."""

    update: Update
    norms: dict[str, float]  # hospital -> joint update norm before clipping
    clipped: list[str]  # hospitals whose update was scaled down
    sigma: dict[str, float]  # component -> noise std added to its mean


def noised_mean(updates: Mapping[str, Update], reference: Mapping[str, np.ndarray], clip: float,
                noise_multiplier: float, rng: np.random.Generator) -> Release | None:
    """Clip each hospital's update jointly to ``clip``, average with equal weights per
    component over the hospitals that trained it, add N(0, (z C / n_c)^2) per coordinate.

    ``reference`` holds the global arrays the updates are taken against (the keys expected this
    round). Returns ``None`` when no hospital trained any component."""
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    carriers: dict[str, list[str]] = {}  # component -> hospitals that trained it
    for hospital, u in updates.items():
        for key in u.arrays:
            c = split_key(key)[0]
            if key in reference and u.examples.get(c, 0) > 0:
                carriers.setdefault(c, [])
                if hospital not in carriers[c]:
                    carriers[c].append(hospital)
    if not carriers:
        return None
    float_keys = [k for k, ref in reference.items()
                  if _floating(ref) and split_key(k)[0] in carriers]
    norms: dict[str, float] = {}
    scale: dict[str, float] = {}
    for hospital, u in updates.items():
        sq = 0.0
        for k in float_keys:
            if hospital in carriers[split_key(k)[0]] and k in u.arrays:
                sq += float(np.square(u.arrays[k].astype(np.float64)
                                      - reference[k].astype(np.float64)).sum())
        norms[hospital] = math.sqrt(sq)
        scale[hospital] = min(1.0, clip / norms[hospital]) if norms[hospital] > 0 else 1.0
    sigma = {c: noise_multiplier * clip / len(hs) for c, hs in carriers.items()}
    out: dict[str, np.ndarray] = {}
    for key, ref in reference.items():
        c = split_key(key)[0]
        if c not in carriers:
            continue
        if not _floating(ref):  # integer buffers cannot be noised: not released
            out[key] = ref
            continue
        base = ref.astype(np.float64)
        hs = carriers[c]
        total = np.zeros_like(base)
        for h in hs:
            total += scale[h] * (updates[h].arrays[key].astype(np.float64) - base)
        mean = total / len(hs)
        if sigma[c] > 0:
            mean = mean + rng.normal(0.0, sigma[c], size=base.shape)
        value = base + mean
        if key.endswith("running_var"):
            value = np.maximum(value, 0.0)  # post-processing: a variance is >= 0
        with np.errstate(over="ignore", invalid="ignore"):
            out[key] = value.astype(ref.dtype)
    return Release(update=Update(arrays=out, examples={c: float(len(hs))
                                                       for c, hs in carriers.items()}),
                   norms=norms, clipped=[h for h, s in scale.items() if s < 1.0],
                   sigma=sigma)


def epsilon(history: Iterable[tuple[float, float, int]], delta: float) -> float:
    """epsilon(delta) of ``(noise multiplier, sample rate, releases)`` entries under Opacus' RDP
    accountant (``shared_models.dp.Accountant``, as the hospitals' DP-SGD); inf for a release
    without noise, 0 without releases."""
    from shared_models.dp import Accountant

    hist = [(float(z), float(q), int(n)) for z, q, n in history if n > 0]
    if any(z <= 0 for z, _, _ in hist):
        return math.inf
    return Accountant(hist).epsilon(delta)


def noise_for_epsilon(target: float, rounds: int, sample_rate: float, delta: float) -> float:
    """The noise multiplier that spends ``target`` epsilon in ``rounds`` releases at
    ``sample_rate`` (Opacus' ``get_noise_multiplier``, RDP accountant): the bench's calibration."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target, target_delta=delta,
                                      sample_rate=sample_rate, steps=rounds, accountant="rdp"))


@dataclass
class ClientDP:
    """The run's client-level DP: the mechanism's settings, its noise source and its ledger."""

    noise_multiplier: float
    clip: float
    delta: float = DEFAULT_DELTA
    rng: np.random.Generator = field(default_factory=np.random.default_rng)  # OS entropy
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and self.clip > 0 and 0 < self.delta < 1):
            raise ValueError("client DP needs noise_multiplier > 0, clip > 0, delta in (0, 1)")

    def _account(self, noise_multiplier: float, sample_rate: float) -> None:
        last = self.history[-1] if self.history else None
        if last is not None and last[:2] == (noise_multiplier, sample_rate):
            self.history[-1] = (last[0], last[1], last[2] + 1)
        else:
            self.history.append((noise_multiplier, sample_rate, 1))

    def release(self, updates: Mapping[str, Update], reference: Mapping[str, np.ndarray],
                sample_rate: float) -> tuple[Update | None, dict[str, float]]:
        """The round's noised mean (``None`` if nothing was trained) and its ``server`` notes;
        the release is accounted before the caller uses it."""
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
        out = noised_mean(updates, reference, self.clip, self.noise_multiplier, self.rng)
        if out is None:
            return None, self.notes()
        self._account(self.noise_multiplier, sample_rate)
        return out.update, {**self.notes(), SAMPLE_RATE: float(sample_rate),
                            NOISE_STD: min(out.sigma.values()), CLIPPED: float(len(out.clipped))}

    def epsilon(self) -> float:
        return epsilon(self.history, self.delta)

    def notes(self) -> dict[str, float]:
        return {EPSILON: self.epsilon(), NOISE_MULTIPLIER: float(self.noise_multiplier)}

    def restore(self, rows: Iterable[Mapping[str, Any]], before_round: int) -> None:
        """On resume: the releases of the rounds already in metrics.jsonl (each row's noise
        multiplier and sample rate), so the epsilon goes on from where it was."""
        self.history = []
        for row in sorted(rows, key=lambda r: int(r.get("round", 0))):
            server = row.get("server") if isinstance(row, Mapping) else None
            if (not isinstance(server, Mapping) or int(row.get("round", 0)) >= before_round
                    or SAMPLE_RATE not in server):
                continue
            self._account(float(server[NOISE_MULTIPLIER]), float(server[SAMPLE_RATE]))


def last_epsilon(rows: Iterable[Mapping[str, Any]]) -> float | None:
    """The latest round's client-level epsilon in metrics.jsonl rows (None: not a client-DP run)."""
    eps = None
    for row in rows:
        server = row.get("server") if isinstance(row, Mapping) else None
        if isinstance(server, Mapping) and isinstance(server.get(EPSILON), (int, float)):
            eps = float(server[EPSILON])
    return eps
