"""The coordinator's round loop: train, aggregate, evaluate, write the run folder.

fedsynth runs its own loop rather than ``Strategy.start`` because every round must end with a
checkpoint and a metrics row written atomically, and a restarted coordinator must resume from its
last completed round (Flower does not resume a run whose ServerApp died).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from flwr.serverapp import Grid

from protocol import records as protocol
from shared_models import GanFamily, ModelConfig, encode, get_family
from shared_models.codec import decode_into

from protocol.signing import load_private_key, sign

from .aggregation import norm_state_keys
from .ema import ServerEMA, split_ema
from .presets import make_strategy
from .run_config import FederationConfig  # noqa: F401 - the run configuration, re-exported
from .run_folder import RunFolder, load_checkpoint

log = logging.getLogger(__name__)


@dataclass
class RoundSummary:
    """One finished round, as written to metrics.jsonl and handed to observers."""

    round: int
    seconds: float
    selected: int
    replied: int
    failed: int
    rejected: int
    train: dict[str, float]
    evaluate: dict[str, float]
    server: dict[str, float]
    hospitals: dict[str, dict[str, float]]
    evaluated: dict[str, dict[str, float]] = field(default_factory=dict)  # per node: eval-*
    # Hospitals counted in ``failed``, by registered name (the node id where none is known):
    # offline / restarted / timeout (did not answer, server/grid.py), a refusal by its kind
    # (dp-budget, dp-ledger, ceiling, ..., server/grid.py REFUSAL_KINDS) or error.
    failed_hospitals: dict[str, str] = field(default_factory=dict)
    evaluate_failed: dict[str, str] = field(default_factory=dict)  # the same, evaluate phase
    # node id -> the name its key was registered under (where the coordinator knows one), so
    # the report and `fedsynth status` name hospitals, not Flower node ids
    names: dict[str, str] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return asdict(self)


Observer = Callable[[RoundSummary], None]


def sample_diversity(images: np.ndarray) -> float:
    """Mean pairwise L2 distance between samples: falls toward 0 under mode collapse."""
    flat = images.reshape(images.shape[0], -1).astype(np.float64)
    d = np.sqrt(((flat[:, None, :] - flat[None, :, :]) ** 2).mean(-1))
    n = len(flat)
    return float(d.sum() / (n * (n - 1))) if n > 1 else 0.0


def fixed_inputs(family: GanFamily, model: ModelConfig, n: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the sample grid is made from, fixed so that grids are comparable across rounds.

    Generation families: seeded noise (and labels cycling through the classes). Translation
    families: phantom T1-weighted slices from ``shared_models.phantoms`` — synthetic inputs, because
    the coordinator holds no patient image.
    """
    own = family.grid_inputs(model, n)  # mask-conditioned: phantom masks (maskgan.grid_inputs)
    if own is not None:
        return own, None
    labels = torch.arange(n) % model.num_classes if model.num_classes else None
    if family.task != "translation":
        gen = torch.Generator().manual_seed(1234)
        return torch.randn(n, model.latent_dim, generator=gen), labels
    from shared_models.phantoms import default_profiles, phantom_pair

    profile = default_profiles(1)[0]
    rng = np.random.default_rng(1234)
    slices = np.stack([phantom_pair(profile, i % profile.slices, model.image_size, rng)[0]
                       for i in range(n)])
    x = torch.from_numpy(slices / max(float(slices.max()), 1e-6) * 2 - 1).float()[:, None]
    if model.spatial_dims == 3:
        x = x[:, :, None].expand(-1, -1, model.image_size, -1, -1).contiguous()
    return x, labels


def _grid_images(family: GanFamily, nets: dict, inputs: torch.Tensor,
                 labels: torch.Tensor | None) -> np.ndarray:
    """Samples for the grid; translation families show each input beside its translation.

    Under FedBN the global BatchNorm statistics are never aggregated (hospitals keep their norm
    layers), so the grid is drawn with batch statistics then (``server.images.sample_images``).
    """
    from .images import sample_images

    out = sample_images(family, nets, inputs, labels).float()
    if family.task == "translation":
        out = torch.stack([family.show_input(inputs), out], 1).flatten(0, 1)
    return out.numpy()


def _flower_run_id(grid: Grid) -> int:
    """The run id Flower stamps on every message of this run (0 where the grid has none)."""
    try:
        return int(grid.run.run_id)
    except Exception:  # noqa: BLE001 - a test double or an old grid without ``run``
        return 0


def _named(grid: Grid, failed: Mapping[str, str]) -> dict[str, str]:
    """node id -> kind as registered name -> kind (``PromptGrid.node_name``; else the id)."""
    name = getattr(grid, "node_name", None)
    out: dict[str, str] = {}
    for node_id, kind in sorted(failed.items()):
        try:
            label = str(name(node_id)) if callable(name) else str(node_id)
        except Exception:  # noqa: BLE001 - a test double's attribute is not a namer
            label = str(node_id)
        out[label if label not in out else f"{label} ({node_id})"] = kind
    return out


def _node_names(grid: Grid, nodes: set[str]) -> dict[str, str]:
    """node id -> registered name for ``nodes`` whose name the grid knows."""
    name = getattr(grid, "node_name", None)
    out: dict[str, str] = {}
    if not callable(name):
        return out
    for node in sorted(nodes):
        try:
            label = str(name(node))
        except Exception:  # noqa: BLE001 - a test double's attribute is not a namer
            continue
        if label and label != node:
            out[node] = label
    return out


def describe_strategy(cfg: FederationConfig, strategy: Any) -> str:
    """One line naming what a run aggregates with: family, preset, and per component whether it
    is shared, its reducer and server optimiser (``ComponentPolicy``)."""
    policies = getattr(strategy, "policies", None) or {}
    parts = []
    for component, p in sorted(policies.items()):
        if not p.shared:
            parts.append(f"{component}: local")
            continue
        reducer = p.reducer + (f"(beta {p.trim_beta:g})" if p.reducer == "trimmed" else "")
        opt = p.server_opt + (f"(lr {p.server_lr:g})" if p.server_opt != "avg"
                              or p.server_lr != 1.0 else "")
        extra = (", local norm" if p.local_norm else "") + \
            (f", sync every {p.sync_every}" if p.sync_every != 1 else "")
        parts.append(f"{component}: {reducer}/{opt}{extra}")
    if not parts:
        parts.append(type(strategy).__name__)
    if getattr(strategy, "class_slices", None):  # class-weighted-aggregation
        parts.append(f"per-class weights on {len(strategy.class_slices)} class-indexed "
                     f"parameter(s) of {strategy.num_classes} classes")
    if cfg.client_dp_noise_multiplier:  # server/client_dp.py: the mean is equal-weight, noised
        parts.append(f"client-level DP: clip {cfg.client_dp_clip:g}, noise multiplier "
                     f"{cfg.client_dp_noise_multiplier:g}, delta {cfg.client_dp_delta:g}")
    return (f"strategy: family {cfg.model.family}, preset {cfg.preset}, wire "
            f"{cfg.train.wire_dtype}; " + "; ".join(parts))


def _exchange(grid: Grid, messages: Any, timeout: float, wire: dict[str, float]) -> list:
    """``grid.send_and_receive``, adding the model bytes sent and received (arrays' shape x
    dtype, ``server.metrics.record_nbytes``: what Prometheus counts) to ``wire``."""
    from .metrics import record_nbytes

    messages = list(messages)
    wire["sent-bytes"] = wire.get("sent-bytes", 0.0) + float(
        sum(record_nbytes(m.content) for m in messages))
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    wire["received-bytes"] = wire.get("received-bytes", 0.0) + float(
        sum(record_nbytes(m.content) for m in replies if not m.has_error()))
    return replies


class _CountingGrid:
    """``grid`` whose ``send_and_receive`` goes through :func:`_exchange` (the secure round's
    protocol stages are counted like a plain round's messages; their key material and masked
    vectors are not arrays, so only array payloads are in the count)."""

    def __init__(self, grid: Grid, wire: dict[str, float]) -> None:
        self._grid, self._wire = grid, wire

    def send_and_receive(self, messages: Any, timeout: float | None = None) -> list:
        return _exchange(self._grid, messages, timeout, self._wire)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


RUN_LOG = "coordinator.log"


def run_federation(grid: Grid, cfg: FederationConfig,
                   observers: tuple[Observer, ...] = ()) -> Path:
    """Run ``cfg.rounds`` rounds on ``grid``; returns the run folder.

    The coordinator's lines about the run (its strategy, each round, hospitals that failed) are
    also appended to the run folder's ``coordinator.log``, and to the file named by
    ``$FEDSYNTH_SERVERAPP_LOG`` (set by ``fedsynth coordinator``, which follows it into its own
    log): a deployed ServerApp's own output goes nowhere (Flower's SuperExec starts it with
    stdout and stderr on /dev/null)."""
    import os

    from protocol.keys import SERVERAPP_LOG_ENV
    from protocol.logs import DATEFMT, FORMAT, PlainFormatter

    folder = RunFolder.for_run(cfg.run_dir, cfg.resolved_run_id(), keep=cfg.keep_checkpoints)
    handler = logging.FileHandler(folder.root / RUN_LOG, encoding="utf-8")
    handler.setFormatter(PlainFormatter(FORMAT, DATEFMT))
    handlers = [handler]
    # ... and, under `fedsynth coordinator`, to the file its daemon follows into its own log
    # (without a time: the daemon's line has its own), each line naming the run's folder
    if daemon_log := os.environ.get(SERVERAPP_LOG_ENV):
        try:
            shared = logging.FileHandler(daemon_log, encoding="utf-8")  # mode "a": O_APPEND
        except OSError as exc:
            log.warning("cannot append to the coordinator's log %s: %s", daemon_log, exc)
        else:
            shared.setFormatter(PlainFormatter(
                f"%(levelname)s %(name)s [{folder.root.name}] %(message)s"))
            handlers.append(shared)
    server_log = logging.getLogger("server")
    level = server_log.level
    for h in handlers:
        h.setLevel(logging.INFO)
        server_log.addHandler(h)
    if server_log.getEffectiveLevel() > logging.INFO:
        server_log.setLevel(logging.INFO)
    try:
        return _run_federation(grid, cfg, observers)
    finally:
        for h in handlers:
            server_log.removeHandler(h)
            h.close()
        server_log.setLevel(level)


def _run_federation(grid: Grid, cfg: FederationConfig,
                    observers: tuple[Observer, ...] = ()) -> Path:
    family = get_family(cfg.model.family)
    torch.manual_seed(cfg.train.seed)
    nets = family.build(cfg.model)
    folder = RunFolder.for_run(cfg.run_dir, cfg.resolved_run_id(), keep=cfg.keep_checkpoints)
    arrays = encode(nets)
    start_round = 1
    # server-ema-decay: grids/checkpoints' generator
    ema = ServerEMA(cfg.server_ema_decay, family.ema_components)
    if cfg.resume and (ckpt := folder.latest_checkpoint()) is not None:
        stored, meta = load_checkpoint(ckpt, with_ema=True)
        arrays, kept = split_ema(stored)
        ema = ServerEMA(cfg.server_ema_decay, family.ema_components, kept)
        start_round = int(meta["round"]) + 1
        log.info("resuming %s after round %d", folder.root.name, start_round - 1)
    folder.write_config({"model": asdict(cfg.model), "train": asdict(cfg.train),
                         **{k: v for k, v in asdict(cfg).items() if k not in ("model", "train")},
                         "run_id": folder.root.name,
                         # `fedsynth status` links the Flower run to this folder
                         "flower_run_id": str(_flower_run_id(grid) or "")})

    noise, labels = fixed_inputs(family, cfg.model, cfg.num_samples)
    if start_round == 1:
        family.at_round(nets, cfg.model, 1)  # the initial grid: round 1's stage (pgan)
        folder.save_samples(0, _grid_images(family, nets, noise, labels))

    signing_key = load_private_key(Path(cfg.signing_key)) if cfg.signing_key else None
    # The strategy signs what it sends: with local components or FedBN a hospital receives a
    # subset of the global model, and the signature must cover exactly that subset.
    # The run id (Flower's, given by the SuperLink) is part of every signature, so a message of
    # this run means nothing in another.
    run_id = _flower_run_id(grid)
    signer = ((lambda record, config, message_type: sign(signing_key, record, config,
                                                         message_type, run_id))
              if signing_key is not None else None)
    strategy = make_strategy(cfg.preset, family, overrides=cfg.policy_overrides(),
                             model=cfg.model, train=cfg.train, norm_keys=norm_state_keys(nets),
                             signer=signer, fraction_train=cfg.fraction_train,
                             min_train_nodes=cfg.min_hospitals,
                             min_available_nodes=cfg.min_hospitals,
                             examples_ratio=cfg.examples_ratio, max_examples=cfg.max_examples,
                             update_norm_ratio=cfg.update_norm_ratio,
                             norm_floor_rms=cfg.norm_floor_rms,
                             max_update_norm=cfg.max_update_norm,
                             **({"client_dp": _client_dp(cfg, folder, start_round)}
                                if cfg.client_dp_noise_multiplier else {}),
                             **({"class_slices": family.class_slices(nets),
                                 "num_classes": cfg.model.num_classes}
                                if cfg.class_weighted_aggregation else {}),
                             **({"fake_batch": cfg.ua_fake_batch} if cfg.preset == "ua-gan"
                                else {}))
    log.info("run %s (Flower run %s), %d rounds, %s", folder.root.name, run_id or "-",
             cfg.rounds, describe_strategy(cfg, strategy))
    # Evaluation of round r's aggregate rides in round r + 1's train message (one round trip per
    # round, GanStrategy.folds_evaluation); round r's row is written at once and completed with
    # its evaluation when round r + 1's replies are in. Only the last round (and UA-GAN, whose
    # train messages are UA messages) sends a separate evaluate message.
    fold = bool(getattr(strategy, "folds_evaluation", False))
    pending = _pending_evaluation(folder, start_round, cfg) if fold else None
    for rnd in range(start_round, cfg.rounds + 1):
        t0 = time.monotonic()
        due = rnd % max(1, cfg.evaluate_every) == 0 or rnd == cfg.rounds
        config = protocol.train_config(cfg.model, cfg.train, rnd, cfg.data)
        if pending is not None:
            config[protocol.EVALUATE_ROUND] = pending.round
        record = protocol.to_record(arrays)
        wire: dict[str, float] = {}
        if cfg.secure_aggregation:  # Flower's SecAgg+: only the sum reaches this process
            from .secure_aggregation import secure_train_round

            new_record, train_metrics = secure_train_round(
                strategy, _CountingGrid(grid, wire), rnd, record, config,
                clip=cfg.secure_aggregation_clip,
                max_examples=cfg.secure_aggregation_max_examples, timeout=cfg.round_timeout_s)
            t_train = time.monotonic()
        else:
            replies = _exchange(grid, strategy.configure_train(rnd, record, config, grid),
                                cfg.round_timeout_s, wire)
            t_train = time.monotonic()
            new_record, train_metrics = strategy.aggregate_train(rnd, replies)
        if new_record is not None:
            arrays = protocol.from_record(new_record)
        train_report = strategy.last_train
        if pending is not None:
            folded, per_hospital = strategy.folded_evaluation()
            pending.evaluate = dict(folded or {})
            pending.evaluated = per_hospital
            pending.evaluate_failed = _named(grid, {n: k for n, k in
                                                    train_report.failed_nodes.items()})
            folder.append_metrics(pending.row())  # replaces the row written without it
            for observe in observers:
                observe(pending)
            pending = None

        t_aggregate = time.monotonic()
        eval_metrics, evaluated, eval_failed = None, {}, {}
        if due and (not fold or rnd == cfg.rounds):
            eval_config = protocol.train_config(cfg.model, cfg.train, rnd, cfg.data)
            record = protocol.to_record(arrays)
            replies = _exchange(grid, strategy.configure_evaluate(rnd, record, eval_config, grid),
                                cfg.round_timeout_s, wire)
            eval_metrics = strategy.aggregate_evaluate(rnd, replies)
            evaluated = strategy.last_evaluate.per_hospital
            eval_failed = dict(strategy.last_evaluate.failed_nodes)
        t_eval = time.monotonic()

        ema.update(arrays)
        decode_into(nets, ema.overlay(arrays))  # the grid shows the average when one is kept
        family.at_round(nets, cfg.model, rnd)  # pgan: the stage this round trained
        samples = _grid_images(family, nets, noise, labels)
        folder.save_samples(rnd, samples)
        summary = RoundSummary(
            round=rnd, seconds=time.monotonic() - t0,
            selected=train_report.selected, replied=train_report.replied,
            failed=train_report.failed, rejected=train_report.rejected,
            train=dict(train_metrics or {}), evaluate=dict(eval_metrics or {}),
            # where the round's time went (the round overhead benchmark reads these)
            server={"sample-diversity": sample_diversity(samples),
                    "train-phase-seconds": t_train - t0,
                    "aggregate-seconds": t_aggregate - t_train,
                    "evaluate-phase-seconds": t_eval - t_aggregate,
                    "samples-seconds": time.monotonic() - t_eval,
                    # model bytes on the wire this round (train + evaluate messages; int8
                    # replies count one byte per weight): sent-bytes, received-bytes, wire-bytes
                    **wire, "wire-bytes": sum(wire.values()),
                    **{f"rejected-{kind}": float(n)
                       for kind, n in train_report.rejected_reasons.items()},
                    # metric keys dropped, example counts clipped, aggregates refused
                    **train_report.notes(),
                    "dropped-eval-metric-keys": float(strategy.last_evaluate.dropped_metric_keys
                                                      if eval_metrics is not None else 0)},
            hospitals=train_report.per_hospital,
            evaluated=evaluated,
            failed_hospitals=_named(grid, train_report.failed_nodes),
            evaluate_failed=_named(grid, eval_failed),
            names=_node_names(grid, {*train_report.per_hospital, *evaluated}),
        )
        # The row before the checkpoint: a coordinator killed between the two re-runs this round
        # on resume and the row is replaced (one per round); the other order would leave a
        # checkpointed round without its row, lost from metrics.jsonl.
        folder.append_metrics(summary.row())
        folder.save_checkpoint(rnd, {**arrays, **ema.checkpoint_arrays()},
                               {"round": rnd, "family": cfg.model.family,
                                "model": asdict(cfg.model)})
        log.info("round %d/%d done in %.1fs: %d/%d hospitals replied, loss-g %.3f, loss-d %.3f%s",
                 rnd, cfg.rounds, summary.seconds, summary.replied, summary.selected,
                 summary.train.get("loss-g", float("nan")),
                 summary.train.get("loss-d", float("nan")),
                 "".join(f"; {n} failed ({k})" for n, k in summary.failed_hospitals.items()))
        if fold and due and rnd < cfg.rounds:
            pending = summary  # its evaluation comes with the next round's replies
            continue
        for observe in observers:
            observe(summary)
    return folder.root


def _client_dp(cfg: FederationConfig, folder: RunFolder, start_round: int) -> Any:
    """The run's client-level DP (server/client_dp.py); on resume its ledger is rebuilt from the
    rounds already in metrics.jsonl, so the epsilon goes on from where it was."""
    from .client_dp import ClientDP

    dp = ClientDP(cfg.client_dp_noise_multiplier, cfg.client_dp_clip, cfg.client_dp_delta)
    if start_round > 1:
        dp.restore(folder.read_metrics(), before_round=start_round)
    return dp


def _pending_evaluation(folder: RunFolder, start_round: int, cfg: FederationConfig
                        ) -> "RoundSummary | None":
    """On resume: the last completed round, if its folded evaluation never arrived."""
    if start_round <= 1:
        return None
    previous = start_round - 1
    due = previous % max(1, cfg.evaluate_every) == 0 or previous == cfg.rounds
    rows = [r for r in folder.read_metrics() if r.get("round") == previous]
    if not due or not rows or rows[-1].get("evaluate"):
        return None
    fields = {f.name for f in dataclasses.fields(RoundSummary)}
    return RoundSummary(**{k: v for k, v in rows[-1].items() if k in fields})
