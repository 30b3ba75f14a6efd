"""Admission of a message at a hospital, before anything is loaded: the coordinator's signature,
the replay record (a round acted on once), and the hospital's own never-send policy.

Every handler (``client.app``'s train / evaluate, ``client.ua_gan``) admits through here; a refusal
is logged in one line, counted on /metrics, and raised.
"""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Context, Message

from protocol import flower_private, records as protocol
from protocol.signing import SignatureError, load_public_key, verify

from . import metrics as hospital_metrics
from .settings import HospitalSettings

log = logging.getLogger(__name__)


class PolicyRefused(RuntimeError):
    """The hospital's own settings forbid what a message asks (the message says which)."""


class PerceptualRefused(PolicyRefused):
    """``perceptual-loss`` > 0 at a hospital without a usable pinned ``perceptual-network``."""


SEEN_ROUNDS = "fedsynth-seen-rounds"  # in context.state: message type -> last round acted on


def check_signature(hospital: HospitalSettings, msg: Message, context: Context | None = None
                    ) -> None:
    """Act only on what the pinned coordinator key signed, for this run, once per round.

    The signature covers arrays, config, message type and run (``protocol.signing``); the round
    is in the signed config, and a round at or below the last one acted on for that message type
    is a replay. Without a pinned key only an explicit ``accept-unsigned-models`` lets a message
    through (simulation sets it: there coordinator and hospitals are one process).
    """
    config = msg.content[protocol.CONFIG]
    if hospital.model_public_key is None:
        if not hospital.accept_unsigned_models:
            refuse(hospital, "unsigned", SignatureError(
                "no model-public-key is pinned and accept-unsigned-models is off"))
    else:
        arrays = (msg.content.array_records[protocol.ARRAYS]
                  if protocol.ARRAYS in msg.content.array_records else None)
        try:
            verify(load_public_key(hospital.model_public_key), arrays, config,
                   str(msg.metadata.message_type), int(msg.metadata.run_id))
        except SignatureError as exc:
            hospital_metrics.record_signature_failure(hospital.name)
            refuse(hospital, "signature", exc)
    check_secure_aggregation(hospital, msg)
    if context is None:
        return
    kind = str(msg.metadata.message_type)
    server_round = int(config.get(protocol.SERVER_ROUND, 0))
    seen = (context.state.config_records[SEEN_ROUNDS]
            if SEEN_ROUNDS in context.state.config_records else ConfigRecord())
    on_disk = _seen_on_disk(hospital, context.run_id)
    last_values = [int(v) for v in (seen.get(kind), on_disk.get(kind)) if v is not None]
    last = max(last_values) if last_values else None
    if last is not None and server_round <= last:
        refuse(hospital, "replay", SignatureError(
            f"{kind} message for round {server_round} replayed (this hospital already acted on "
            f"round {last} of run {context.run_id})"))
    seen[kind] = server_round
    context.state[SEEN_ROUNDS] = seen
    _save_seen(hospital, context.run_id, {**on_disk, kind: server_round})


def _seen_paths(hospital: HospitalSettings, run_id: int) -> list:
    """Where the rounds acted on are kept across restarts (``HospitalSettings.run_state_path``:
    the state folder, else the cache folder); first the one written, then the cache folder's
    record of an earlier version, still read so that an upgrade mid-run forgets nothing."""
    path = hospital.run_state_path(run_id, "seen")
    paths = [] if path is None else [path]
    if hospital.state_dir is not None and hospital.cache_dir is not None:
        old = hospital.cache_state_path(f"run-{int(run_id)}-seen")
        if old is not None and old != path:
            paths.append(old)
    return paths


class ReplayRecordUnusable(SignatureError):
    """The replay record on disk cannot be read: refuse, never accept (an unreadable record
    read as empty once let an old round through after a restart)."""


def _seen_on_disk(hospital: HospitalSettings, run_id: int) -> dict[str, int]:
    import json

    from .statefiles import read_state

    seen: dict[str, int] = {}
    for path in _seen_paths(hospital, run_id):
        if not (path.exists() or path.is_symlink()):
            continue
        try:
            data = json.loads(read_state(path))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            for kind, value in data.items():
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"round {value!r} of {kind!r} is not a whole number")
                seen[str(kind)] = max(value, seen.get(str(kind), value))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            refuse(hospital, "replay-record", ReplayRecordUnusable(
                f"replay record {path} is unreadable ({why}): every message of run {run_id} "
                "is refused (a new run is not affected); to let this hospital rejoin the run, "
                "an operator removes the file (docs/hospital-it.md, 'The replay record')"))
    return seen


def _save_seen(hospital: HospitalSettings, run_id: int, seen: dict[str, int]) -> None:
    import json

    from .statefiles import write_atomic

    paths = _seen_paths(hospital, run_id)
    if not paths:
        return
    try:  # atomically and flushed: a torn record must never be what a restart reads
        write_atomic(paths[0], json.dumps(seen), prefix=".seen-")
    except OSError as exc:  # a full disk must not stop training; the memory record still holds
        log.warning("could not record the rounds acted on in %s: %s", paths[0], exc)


def refuse(hospital: HospitalSettings, reason: str, exc: Exception) -> None:
    log.error("REFUSED message (%s): %s", reason, exc)
    hospital_metrics.record_refusal(hospital.name, reason)
    raise exc


# the SecAgg+ protocol record of a secure round (Flower's RECORD_KEY_CONFIGS)
SECURE_RECORD = flower_private.SECAGG_CONFIGS


def check_secure_aggregation(hospital: HospitalSettings, msg: Message) -> None:
    """``require-secure-aggregation``: a train message (UA-GAN's too) that does not come inside
    Flower's SecAgg+ protocol is refused; its reply would leave this hospital unmasked.

    A train message of a secure round carries the protocol's record (its shares of the other
    hospitals' keys), and ``client.secure_aggregation.secure_aggregation_mod`` masks the reply
    before it leaves; any other train message would be answered in the clear."""
    if not hospital.require_secure_aggregation:
        return
    if not str(msg.metadata.message_type).startswith("train"):
        return  # evaluate replies carry scalar metrics only, as in every run
    if SECURE_RECORD not in msg.content.config_records:
        refuse(hospital, "secure-aggregation", PolicyRefused(
            "this hospital requires secure aggregation (require-secure-aggregation) and this "
            "round's update would leave it unmasked"))


MIN_SECURE_THRESHOLD = 2  # shares to rebuild a secret: 1 would let any one holder do it alone
MIN_SECURE_PEERS = 2  # others to mask with: with 1, the sum of two is the other's update to each


def check_secure_parameters(hospital: HospitalSettings, configs: ConfigRecord) -> None:
    """Refuse SecAgg+ parameters that would leave this hospital's update exposed, whoever chose
    them (the coordinator sends them unsigned): a reconstruction threshold below 2, or fewer than
    2 other hospitals in the round (setup: the sampled and share counts; share keys: the
    neighbours whose keys were forwarded)."""
    stage = configs.get("stage")
    if stage == "setup":
        threshold = int(configs.get("threshold", 0))
        peers = min(int(configs.get("sample_num", 0)), int(configs.get("share_num", 0))) - 1
    elif stage == "share_keys":
        threshold, peers = MIN_SECURE_THRESHOLD, len([k for k in configs if k != "stage"]) - 1
    else:
        return
    if threshold < MIN_SECURE_THRESHOLD or peers < MIN_SECURE_PEERS:
        refuse(hospital, "secure-aggregation-parameters", PolicyRefused(
            f"secure aggregation with threshold {threshold} and {peers} other hospital(s) would "
            f"expose this hospital's update (at least threshold {MIN_SECURE_THRESHOLD} and "
            f"{MIN_SECURE_PEERS} others are needed)"))


def check_never_send(hospital: HospitalSettings, components: tuple[str, ...]) -> None:
    """Refuse a round that asks for a component this hospital's settings keep at home."""
    forbidden = sorted(set(components) & set(hospital.never_send))
    if forbidden:
        refuse(hospital, "never-send", PolicyRefused(
            f"the coordinator asked for {', '.join(forbidden)}, which this hospital's "
            "never-send setting keeps at home"))
