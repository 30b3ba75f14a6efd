"""The names and limits the run configuration checks, importing neither torch nor flwr.

``fedsynth launch`` checks its run file (``server.run_config.from_flat``) before it submits
anything; that check needs the choices (presets, reducers, server optimisers), the bounds'
defaults and the run-id rule, not the strategy, codec or Flower records that use them (importing
those cost launch ~2-6 s of torch and Flower, issue 24 item 8). So they are declared here, once,
and the modules that apply them import them from here: ``server.aggregation`` (reducers,
optimisers), ``server.presets`` (preset names; its table of policies must have exactly these,
a test checks), ``server.validation`` (reply bounds), ``server.secure_aggregation`` (its
encoding's bounds and the launch refusal), ``server.run_folder`` (run ids).
"""

from __future__ import annotations

import math

import re
from typing import Any, Literal, get_args

# ---- aggregation rules (server/aggregation.py)
Reducer = Literal["mean", "median", "trimmed-mean"]
ServerOpt = Literal["avg", "avgm", "adam"]
REDUCERS: tuple[str, ...] = get_args(Reducer)
SERVER_OPTS: tuple[str, ...] = get_args(ServerOpt)

# ---- presets (server/presets.py: POLICY_PRESETS has one policy table per name)
POLICY_PRESET_NAMES: tuple[str, ...] = ("fedgan", "fedmed-gan", "local-d", "fedbn")
PRESETS: tuple[str, ...] = (*POLICY_PRESET_NAMES, "ua-gan")

# ---- what a hospital may claim (server/validation.py)
UPDATE_NORM_RATIO = 10.0  # ||reply_c - global_c|| <= R x (||global_c|| + floor x sqrt(n_c))
NORM_FLOOR_RMS = 1.0  # the floor, per element: a zero-initialised component may still move
EXAMPLES_RATIO = 3.0  # a reply's example count <= K x the median count of the others
MAX_EXAMPLES = 100_000_000  # and never more than this, whatever the others claim

# ---- run ids (server/run_folder.py)
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_run_id(run_id: str) -> str:
    """``run_id`` if it is a plain folder name (letters, digits, ``.``, ``_``, ``-``; at most 64,
    not starting with a dot or dash); otherwise ``ValueError``: a run id never names a path."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id) \
            or set(run_id) == {"."}:
        raise ValueError(f"run id {str(run_id)[:80]!r} is not a plain name: use 1-64 letters, "
                         f"digits, '.', '_' or '-', starting with a letter or digit")
    return run_id


# ---- secure aggregation (server/secure_aggregation.py)
SECAGG_CLIP = 0.5  # +- per coordinate of a hospital's update (Adam moves ~lr per step)
SECAGG_MAX_EXAMPLES = 10000.0
SECURE_PRESETS = ("fedgan", "fedmed-gan", "local-d", "fedbn")


def check_secure_run(cfg: Any) -> None:
    """Refuse, at launch, what needs individual updates or cannot be masked (one line each)."""
    why = None
    if cfg.preset not in SECURE_PRESETS:
        why = (f"preset {cfg.preset!r} needs each hospital's reply (secure aggregation gives the "
               f"coordinator only the sum); use one of {', '.join(SECURE_PRESETS)}")
    elif cfg.reducer in ("median", "trimmed-mean"):
        why = (f"reducer {cfg.reducer!r} needs each hospital's update; under secure "
               "aggregation only the (weighted) mean exists")
    elif cfg.max_update_norm:
        why = ("max-update-norm scales each hospital's update, which the coordinator no longer "
               "sees; secure-aggregation-clip bounds each coordinate at the hospital instead")
    elif cfg.sync_every > 1:
        why = "sync-every > 1 is not supported with secure aggregation yet"
    elif cfg.train.wire_dtype != "float32":
        why = (f"wire-dtype {cfg.train.wire_dtype!r}: the masked vector is int64 whatever the "
               "wire dtype, and updates are taken against float32 downloads")
    elif cfg.min_hospitals < 3:
        why = ("min-hospitals must be >= 3 (with two, each hospital could read the other's "
               "update off the sum; hospitals refuse fewer than 2 others)")
    elif not cfg.secure_aggregation_clip > 0 or not cfg.secure_aggregation_max_examples >= 1:
        why = "secure-aggregation-clip must be > 0 and secure-aggregation-max-examples >= 1"
    if why is not None:
        raise ValueError(f"secure-aggregation: {why}")


def check_class_weighted_run(cfg: Any, data_layout: str) -> None:
    """Refuse, at launch, a ``class-weighted-aggregation`` run it cannot apply to (one line):
    per-class weights need each hospital's reply, its per-class slice counts and a mean."""
    why = None
    if data_layout != "labelled":
        why = (f"family {cfg.model.family!r} is not class-conditional: it has no per-class "
               "parameters")
    elif cfg.preset not in POLICY_PRESET_NAMES:
        why = (f"preset {cfg.preset!r} aggregates no model updates; use one of "
               f"{', '.join(POLICY_PRESET_NAMES)}")
    elif cfg.reducer in ("median", "trimmed-mean"):
        why = f"reducer {cfg.reducer!r} ignores weights; per-class weights need the mean"
    elif cfg.secure_aggregation:
        why = ("with secure-aggregation the coordinator sees only the sum of the example-weighted "
               "updates: it cannot re-weight one class's rows per hospital")
    elif cfg.client_dp_noise_multiplier:
        why = ("client-level DP takes the equal-weight mean its noise is calibrated to; "
               "per-class weights would change that sensitivity")
    if why is not None:
        raise ValueError(f"class-weighted-aggregation: {why}")


# client-level DP on the aggregate (server/client_dp.py)
CLIENT_DP_DELTA = 1e-5


def check_client_dp_run(cfg: Any) -> None:
    """Refuse, at launch, a client-level DP run that cannot be accounted (one line each)."""
    why = None
    if not cfg.client_dp_noise_multiplier >= 0 or not math.isfinite(cfg.client_dp_noise_multiplier):
        why = f"client-dp-noise-multiplier must be >= 0, got {cfg.client_dp_noise_multiplier}"
    elif not cfg.client_dp_clip > 0 or not math.isfinite(cfg.client_dp_clip):
        why = (f"client-dp-clip must be > 0 (the per-hospital update norm bound), got "
               f"{cfg.client_dp_clip}")
    elif not 0 < cfg.client_dp_delta < 1:
        why = f"client-dp-delta must be in (0, 1), got {cfg.client_dp_delta}"
    elif cfg.preset == "ua-gan":
        why = ("preset 'ua-gan' sends no model updates (its coordinator trains the generator on "
               "the hospitals' discriminator feedback): there is no update to clip")
    elif cfg.reducer in ("median", "trimmed-mean"):
        why = (f"reducer {cfg.reducer!r} is not a mean: the noise is calibrated to the "
               "sensitivity C / n of a mean of clipped updates")
    elif cfg.secure_aggregation:
        why = ("with secure-aggregation the coordinator never sees single updates: the clipping "
               "must run at the hospital and the noise be distributed among them (not "
               "implemented yet)")
    if why is not None:
        raise ValueError(f"client-dp: {why}")
