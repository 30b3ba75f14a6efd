"""The component-aware GAN strategy: a Flower ``Strategy`` whose aggregation is per component.

Each component has a ``ComponentPolicy`` (see ``aggregation.py``). A hospital learns what to send
back from the round's ConfigRecord: ``reply-components`` (comma-separated) names the components
whose arrays the reply must carry, and ``local-norm-components`` those whose normalisation entries
stay at the hospital (FedBN); ``client.ua_gan.reply_plan`` turns both into the codec's arguments.

It keeps Flower's four hooks (so it runs under ``Strategy.start`` as well as fedsynth's own round
loop), validates every reply before it counts, and leaves aggregation math to ``aggregation.py``.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from protocol import records as protocol
from protocol.signing import SIGNATURE_KEY
from shared_models.codec import split_key

from .client_dp import ClientDP
from .grid import failure_kind
from .aggregation import ComponentPolicy, ServerOptState, Update, aggregate
from .validation import (
    DROPPED_METRIC_KEYS, EVAL_METRIC_KEYS, EXAMPLES_RATIO, MAX_EXAMPLES, NORM_FLOOR_RMS,
    NORM_OUTLIER_RATIO, UPDATE_NORM_RATIO, RejectedReply, cap_examples, check_norm_stats,
    clip_updates, known_metrics, norm_outliers, update_bound, validate_train_reply,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class RoundReport:
    """What one round's replies said, for metrics.jsonl and the exporters."""

    selected: int = 0
    replied: int = 0
    failed: int = 0
    rejected: int = 0
    rejected_reasons: Counter[str] = field(default_factory=Counter)
    per_hospital: dict[str, dict[str, float]] = field(default_factory=dict)
    # node id -> offline / restarted / timeout / error (server/grid.py failure_kind): a hospital
    # that did not answer, or answered with an error, counted in ``failed``
    failed_nodes: dict[str, str] = field(default_factory=dict)
    dropped_metric_keys: int = 0  # metric keys outside the protocol, not kept
    capped_examples: int = 0  # (hospital, component) example counts clipped
    refused_aggregates: int = 0  # components whose aggregate was not finite: previous kept
    clipped_updates: int = 0  # (hospital, component) updates scaled down to max-update-norm
    # client-level DP (server/client_dp.py): client-dp-epsilon and the round's mechanism figures
    client_dp: dict[str, float] = field(default_factory=dict)

    def notes(self) -> dict[str, float]:
        """The counters above, for the ``server`` section of metrics.jsonl."""
        return {"dropped-metric-keys": float(self.dropped_metric_keys),
                "capped-example-counts": float(self.capped_examples),
                "refused-aggregates": float(self.refused_aggregates),
                "clipped-updates": float(self.clipped_updates), **self.client_dp}


# ConfigRecord entries that tell a hospital what to send back this round (defined in
# protocol/keys.py): comma-separated component names.
REPLY_COMPONENTS = protocol.REPLY_COMPONENTS
LOCAL_NORM_COMPONENTS = protocol.LOCAL_NORM_COMPONENTS

# (arrays, config, message type) -> signature; the signer binds the run id (server/federation.py)
Signer = Callable[[ArrayRecord, ConfigRecord, str], bytes]


class GanStrategy(Strategy):
    """Per-component federation of every component the family declares.

    ``policies`` maps a component to its ``ComponentPolicy`` (default: FedGAN for all).
    ``norm_keys`` lists the family's normalisation entries (``aggregation.norm_state_keys``),
    needed when a policy keeps them local (FedBN). ``signer`` signs every array record sent, so the
    signature covers exactly what a hospital receives. ``fraction_train`` of the connected
    hospitals (at least ``min_train_nodes``) train each round; the round waits until
    ``min_available_nodes`` are connected.

    Bounds on what a hospital may claim (``server/validation.py``): ``update_norm_ratio`` R and
    ``norm_floor_rms`` reject a reply moving a component c beyond R x (||global_c|| + floor x
    sqrt(n_c)); ``examples_ratio`` K and ``max_examples`` clip each example count to K x the
    median of the other replies' and to an absolute cap; ``max_update_norm`` (> 0) scales each
    accepted update down to that norm per component.

    ``client_dp`` (``server/client_dp.py``) makes each round's aggregate the noised, equal-weight
    mean of the updates clipped to its bound, accounted over rounds; the cross-hospital outlier
    test is then off (it would let one hospital decide another's inclusion).

    ``class_slices`` (the family's, ``class-weighted-aggregation``) with ``num_classes``: train
    messages ask hospitals for their per-class slice counts, and those keys' class slices are
    weighted per class (``aggregation.class_weighted_mean``). A hospital that sends none (it
    requires DP) weighs as an even mix of its examples, logged once per hospital.
    """

    def __init__(
        self,
        components: tuple[str, ...],
        *,
        policies: Mapping[str, ComponentPolicy] | None = None,
        norm_keys: frozenset[str] = frozenset(),
        signer: Signer | None = None,
        norm_outlier_ratio: float = NORM_OUTLIER_RATIO,
        fraction_train: float = 1.0,
        min_train_nodes: int = 1,
        min_available_nodes: int = 1,
        fraction_evaluate: float = 1.0,
        update_norm_ratio: float = UPDATE_NORM_RATIO,
        norm_floor_rms: float = NORM_FLOOR_RMS,
        examples_ratio: float = EXAMPLES_RATIO,
        max_examples: float = MAX_EXAMPLES,
        max_update_norm: float = 0.0,
        client_dp: ClientDP | None = None,
        class_slices: Mapping[str, tuple[int, int]] | None = None,
        num_classes: int = 0,
    ) -> None:
        if not (update_norm_ratio > 0 and norm_floor_rms >= 0 and examples_ratio >= 1
                and max_examples >= 1 and max_update_norm >= 0):
            raise ValueError("update_norm_ratio must be > 0, norm_floor_rms >= 0, "
                             "examples_ratio >= 1, max_examples >= 1 and max_update_norm >= 0")
        unknown = set(policies or {}) - set(components)
        if unknown:
            raise ValueError(f"policy for unknown component(s) {sorted(unknown)}; "
                             f"the family has {components}")
        self.components = components
        self.policies = {c: (policies or {}).get(c, ComponentPolicy()) for c in components}
        self.norm_keys = norm_keys
        self.signer = signer
        self.norm_outlier_ratio = norm_outlier_ratio
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.min_available_nodes = min_available_nodes
        self.fraction_evaluate = fraction_evaluate
        self.update_norm_ratio = update_norm_ratio
        self.norm_floor_rms = norm_floor_rms
        self.examples_ratio = examples_ratio
        self.max_examples = max_examples
        self.max_update_norm = max_update_norm
        self.client_dp = client_dp
        if class_slices and num_classes < 2:
            raise ValueError("class_slices need num_classes >= 2")
        self.class_slices = dict(class_slices or {})
        self.num_classes = num_classes if self.class_slices else 0
        self._no_class_counts: set[str] = set()  # hospitals already logged as sending none
        self._available = 0  # hospitals connected when the round's trainers were sampled
        self._global: dict[str, np.ndarray] = {}
        self._opt_state = ServerOptState()
        self._last_round = 0
        self.last_train = RoundReport()
        self.last_evaluate = RoundReport()

    # -- what travels ---------------------------------------------------------------------------
    def _travels(self, key: str) -> bool:
        """A key of a shared component that is not a hospital-local norm entry."""
        component = split_key(key)[0]
        policy = self.policies.get(component)
        if policy is None or not policy.shared:
            return False
        return not (policy.local_norm and key in self.norm_keys)

    def sent_keys(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> list[str]:
        """Keys of the global model that go out at the start of ``server_round``."""
        return [k for k in arrays if self._travels(k)
                and self.policies[split_key(k)[0]].sends(server_round)]

    def expected_keys(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> list[str]:
        """Keys every hospital must send back in ``server_round``."""
        return [k for k in arrays if self._travels(k)
                and self.policies[split_key(k)[0]].collects(server_round)]

    def _outgoing(self, keys: list[str], config: ConfigRecord, message_type: str) -> RecordDict:
        """The round's message content; with fp16 transport the download is halved too.

        The signature covers the arrays, every config entry and the message type (and, through the
        signer, the run): a hospital acts on nothing that is not signed."""
        # int8 is a reply format; its downloads go as float16 (the update is taken against them)
        self._wire_dtype = str(config.get("train.wire_dtype", "float32"))
        half = self._wire_dtype in ("float16", "int8")
        record = protocol.to_record({
            k: self._global[k].astype(np.float16)
            if half and self._global[k].dtype == np.float32 else self._global[k] for k in keys})
        if self.signer is not None:
            config[SIGNATURE_KEY] = self.signer(record, config, message_type)
        return RecordDict({protocol.ARRAYS: record, protocol.CONFIG: config})

    # -- Flower hooks -------------------------------------------------------------------------
    def summary(self) -> None:
        for component, policy in self.policies.items():
            log.info("GanStrategy %s: %s", component, policy)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = protocol.from_record(arrays)
        self._last_round = server_round
        nodes = self._sample(grid, self.fraction_train, self.min_train_nodes)
        self.last_train = RoundReport(selected=len(nodes))
        config[protocol.SERVER_ROUND] = server_round
        config[REPLY_COMPONENTS] = ",".join(
            c for c, p in self.policies.items() if p.collects(server_round))
        config[LOCAL_NORM_COMPONENTS] = ",".join(
            c for c, p in self.policies.items() if p.shared and p.local_norm)
        if self.num_classes:
            config[protocol.CLASS_EXAMPLES] = self.num_classes
        content = self._outgoing(self.sent_keys(server_round, self._global), config,
                                 MessageType.TRAIN)
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n)
                for n in nodes]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validated, per-component aggregates; ``None`` arrays when nothing valid came.

        A component whose aggregate is not finite (or has unusable norm statistics) keeps its
        previous global copy; the round counts it in ``refused_aggregates``.
        """
        report = self.last_train
        replies = list(replies)
        self.last_folded = self._folded_evaluations(replies)
        notes: Counter[str] = Counter()
        expected = {k: self._global[k] for k in self.expected_keys(server_round, self._global)}
        int8_base = self._int8_base(server_round)
        valid = self._validated(server_round, replies, lambda content: validate_train_reply(
            content, expected, self.components, norm_keys=self.norm_keys, notes=notes,
            int8_base=int8_base, num_classes=self.num_classes))
        report.dropped_metric_keys += notes[DROPPED_METRIC_KEYS]
        updates = {h: u for h, (u, _) in valid.items()}
        # Only replies that trained something are compared: a hospital holding nothing the
        # family uses (zero examples, unchanged weights) would make the median 0 and every
        # reply that moved an "outlier" (per component, norm_outliers compares only replies
        # that trained that component).
        outliers = {} if self.client_dp is not None else norm_outliers(
            {h: u for h, u in updates.items() if any(n > 0 for n in u.examples.values())},
            expected, self.norm_outlier_ratio)
        outliers.update({h: r for h, r in update_bound(
            updates, expected, self.update_norm_ratio, self.norm_floor_rms).items()
            if h not in outliers})
        for hospital, reason in outliers.items():
            del valid[hospital]
            self._reject(report, server_round, hospital, RejectedReply("norm", reason))
        for hospital, (_, metrics) in valid.items():
            report.replied += 1
            report.per_hospital[hospital] = {k: v for k, v in metrics.items()
                                             if k not in protocol.EVAL_METRICS}
        if not valid:
            log.warning("round %d: no valid reply, the global model is kept", server_round)
            return None, None
        self._note_missing_class_counts(server_round, valid)
        updates, clipped_norms = clip_updates({h: u for h, (u, _) in valid.items()}, expected,
                                              self.max_update_norm)
        for hospital, component, norm in clipped_norms:
            log.warning("round %d: hospital %s moved %s by %.3g; scaled down to max-update-norm "
                        "%g", server_round, hospital, component, norm, self.max_update_norm)
        report.clipped_updates += len(clipped_norms)
        updates, clipped = cap_examples(updates, self.examples_ratio, self.max_examples)
        for hospital, component, claimed, kept in clipped:
            log.warning("round %d: hospital %s claims %.3g examples for %s; weighted as %.3g "
                        "(<= %g x the others' median, <= %.3g)", server_round, hospital,
                        claimed, component, kept, self.examples_ratio, self.max_examples)
        report.capped_examples += len(clipped)
        if self.client_dp is not None:
            return self._apply_client_dp(server_round, updates, expected, report)
        return self._apply(server_round, list(updates.values()), report)

    def _apply_client_dp(self, server_round: int, updates: Mapping[str, Update],
                         expected: Mapping[str, np.ndarray], report: RoundReport
                         ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The noised mean of the clipped updates (``server/client_dp.py``) through the server
        step; the round's epsilon goes to the report."""
        assert self.client_dp is not None
        rate = min(1.0, report.selected / self._available) if self._available else 1.0
        update, notes = self.client_dp.release(updates, expected, rate)
        report.client_dp = notes
        if update is None:  # nothing collected this round (sync-every): nothing released
            return (protocol.to_record(self._global),
                    MetricRecord(self._mean_metrics(report.per_hospital)))
        log.info("round %d: client-level DP: %d update(s) clipped to %g, noise std %.3g, "
                 "epsilon %.4g (delta %g)", server_round, int(notes["client-dp-clipped"]),
                 self.client_dp.clip, notes["client-dp-noise-std"],
                 notes["client-dp-epsilon"], self.client_dp.delta)
        return self._apply(server_round, [update], report)

    def _note_missing_class_counts(self, server_round: int,
                                   valid: Mapping[str, tuple[Update, dict[str, float]]]) -> None:
        """Once per hospital: it trained but sent no per-class counts (a hospital that requires
        DP keeps them home), so its class rows weigh as an even mix of its examples."""
        if not self.num_classes:
            return
        for hospital, (update, _) in valid.items():
            if (update.class_examples is None and hospital not in self._no_class_counts
                    and any(n > 0 for n in update.examples.values())):
                self._no_class_counts.add(hospital)
                log.warning("round %d: hospital %s sent no per-class slice counts (a hospital "
                            "that requires DP keeps them home); class-weighted-aggregation "
                            "weighs its class rows by its example count, spread evenly over the "
                            "classes", server_round, hospital)

    def aggregate_secure(self, server_round: int, update: Update, report: RoundReport
                         ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """A round whose mean came from secure aggregation (``server/secure_aggregation.py``):
        ``update`` is the already-weighted mean with the total examples per component, and goes
        through the same server step and aggregate checks as a validated round."""
        if not report.per_hospital:
            return None, None
        return self._apply(server_round, [update], report)

    def _apply(self, server_round: int, updates: list[Update], report: RoundReport
               ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate ``updates`` per component, step the server optimiser, keep what is usable."""
        merged = dict(self._global)
        refused: list[str] = []
        try:
            fresh = aggregate(updates, self.components, self.policies,
                              current=self._global, state=self._opt_state, refused=refused,
                              class_slices=self.class_slices)
        except (ValueError, ArithmeticError) as exc:  # defensive: validation should prevent it
            log.error("round %d: aggregation failed (%s); the global model is kept",
                      server_round, exc)
            fresh, refused = {}, [c for c, p in self.policies.items()
                                  if p.collects(server_round)]
        for component in {split_key(k)[0] for k in fresh}:
            part = {k: v for k, v in fresh.items() if split_key(k)[0] == component}
            try:
                check_norm_stats(part, self.norm_keys)
            except RejectedReply:
                refused.append(component)
                continue
            merged.update(part)
        for component in refused:
            log.error("round %d: the aggregate of %s is not finite or not usable; its previous "
                      "global copy is kept", server_round, component)
        report.refused_aggregates += len(refused)
        self._global = merged
        return protocol.to_record(merged), MetricRecord(self._mean_metrics(report.per_hospital))

    @staticmethod
    def _reject(report: RoundReport, server_round: int, hospital: str,
                exc: RejectedReply) -> None:
        report.rejected += 1
        report.rejected_reasons[exc.kind] += 1
        log.warning("round %d: rejected reply of hospital %s (%s): %s", server_round, hospital,
                    exc.kind, exc)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate <= 0:
            return []
        # Evaluation takes whoever is connected: a hospital that dropped out mid-round must not
        # hold the round (and its checkpoint) hostage until it comes back.
        nodes = self._sample(grid, self.fraction_evaluate, 1, wait_for=1)
        self.last_evaluate = RoundReport(selected=len(nodes))
        config[protocol.SERVER_ROUND] = server_round
        # Only what was just aggregated goes out: a hospital's own copy of a local component, or of
        # one between syncs, must not be overwritten by the coordinator's stale copy.
        self._global = protocol.from_record(arrays)
        content = self._outgoing(self.expected_keys(server_round, self._global), config,
                                 MessageType.EVALUATE)
        return [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n)
                for n in nodes]

    # -- evaluation folded into the next round's train message --------------------------------
    # Round r's aggregate is what every hospital receives at the start of round r + 1; when that
    # train message names ``evaluate-round`` = r, the hospital evaluates it before training and
    # its train reply carries the eval-* metrics. One round trip per round instead of two
    # (BENCHMARKS.md, "deployed rounds"); only the last round still sends an evaluate message.
    folds_evaluation = True

    def _folded_evaluations(self, replies: list[Message]) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for msg in replies:
            if msg.has_error() or protocol.METRICS not in msg.content.metric_records:
                continue
            try:
                metrics, _ = known_metrics(msg.content.metric_records[protocol.METRICS],
                                           EVAL_METRIC_KEYS)
            except RejectedReply:
                continue
            metrics = {k: v for k, v in metrics.items() if k in protocol.EVAL_METRICS}
            if metrics:
                out[str(msg.metadata.src_node_id)] = metrics
        return out

    def folded_evaluation(self) -> tuple[MetricRecord | None, dict[str, dict[str, float]]]:
        """The previous round's evaluation as carried by this round's train replies:
        (mean metrics weighted by eval-examples, per hospital)."""
        per_hospital = dict(getattr(self, "last_folded", {}))
        if not per_hospital:
            return None, {}
        return MetricRecord(self._eval_means(per_hospital)), per_hospital

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        report = self.last_evaluate
        for msg in replies:
            if msg.has_error() or protocol.METRICS not in msg.content.metric_records:
                report.failed += 1
                report.failed_nodes[str(msg.metadata.src_node_id)] = \
                    failure_kind(msg) if msg.has_error() else "error"
                continue
            try:
                metrics, dropped = known_metrics(msg.content.metric_records[protocol.METRICS],
                                                 EVAL_METRIC_KEYS)
            except RejectedReply:
                report.failed += 1
                report.failed_nodes[str(msg.metadata.src_node_id)] = "error"
                continue
            report.replied += 1
            report.dropped_metric_keys += dropped
            report.per_hospital[str(msg.metadata.src_node_id)] = metrics
        if not report.per_hospital:
            return None
        return MetricRecord(self._eval_means(report.per_hospital))

    @classmethod
    def _eval_means(cls, per_hospital: dict[str, dict[str, float]]) -> dict[str, float]:
        """Means over the hospitals that sent their figures; ``eval-kept-home``: how many kept
        theirs at home (a hospital that requires DP, client/evaluation.py). Their held-out counts
        are left out of ``eval-examples``, which counts the slices behind the means."""
        kept = {h for h, m in per_hospital.items() if m.get(protocol.EVAL_KEPT_HOME, 0) == 1}
        shown = {h: {k: v for k, v in m.items() if k != protocol.EVAL_KEPT_HOME}
                 for h, m in per_hospital.items() if h not in kept}
        out = cls._mean_metrics(shown, "eval-examples") if shown else {}
        if kept:
            out[protocol.EVAL_KEPT_HOME] = float(len(kept))
        return out

    # -- helpers ------------------------------------------------------------------------------
    def _int8_base(self, server_round: int) -> dict[str, np.ndarray] | None:
        """In an int8 run: the floating weights sent this round, as the hospitals got them
        (float16 downloads, ``_outgoing``); int8 replies are updates against exactly these."""
        if getattr(self, "_wire_dtype", "float32") != "int8":
            return None
        keys = set(self.sent_keys(server_round, self._global))
        return {k: (v.astype(np.float16).astype(np.float32) if v.dtype == np.float32 else v)
                for k, v in self._global.items()
                if k in keys and np.issubdtype(v.dtype, np.floating)}

    def _validated(self, server_round: int, replies: Iterable[Message],
                   validate: Callable[[RecordDict], T]) -> dict[str, T]:
        """Each reply through ``validate``, keyed by hospital; failures and rejections counted."""
        report = self.last_train
        valid: dict[str, T] = {}
        for msg in replies:
            hospital = str(msg.metadata.src_node_id)
            if msg.has_error():
                report.failed += 1
                report.failed_nodes[hospital] = failure_kind(msg)
                log.warning("round %d: hospital %s failed: %s", server_round, hospital,
                            msg.error.reason)
                continue
            try:
                valid[hospital] = validate(msg.content)
            except RejectedReply as exc:
                self._reject(report, server_round, hospital, exc)
            except Exception as exc:  # noqa: BLE001 - a reply that fails to decode ends nothing
                self._reject(report, server_round, hospital, RejectedReply(
                    "decode", f"reply does not decode ({type(exc).__name__})"))
        return valid

    def _sample(self, grid: Grid, fraction: float, minimum: int,
                wait_for: int | None = None) -> list[int]:
        """Wait for ``wait_for`` (default ``min_available_nodes``) connected hospitals, then take
        a fraction of them."""
        from protocol.flower_private import sample_nodes

        available = len(list(grid.get_node_ids()))
        self._available = available
        size = max(int(available * fraction), minimum)
        wait = self.min_available_nodes if wait_for is None else wait_for
        nodes, _ = sample_nodes(grid, wait, size)
        return list(nodes)

    @staticmethod
    def _mean_metrics(per_hospital: dict[str, dict[str, float]],
                      weight_key: str = protocol.NUM_EXAMPLES) -> dict[str, float]:
        """Example-weighted mean of each metric over the hospitals that reported it.

        A CycleGAN hospital holding one domain reports no discriminator loss; the mean of
        ``loss-d`` is then over the hospitals that trained a discriminator.
        """
        keys = set.union(*(set(m) for m in per_hospital.values()))
        out: dict[str, float] = {}
        for key in sorted(keys):
            having = [m for m in per_hospital.values() if key in m]
            values = [m[key] for m in having]
            weights = [m.get(weight_key, 1.0) for m in having]
            if not all(math.isfinite(w) and w >= 0 for w in weights):
                weights = [1.0] * len(having)  # a hostile count must not make every mean NaN
            if key.startswith("num-examples") or key == weight_key:
                out[key] = float(sum(values))
            elif 0 < sum(weights) < math.inf:
                out[key] = float(sum(v * w for v, w in zip(values, weights)) / sum(weights))
            else:
                out[key] = float(statistics.fmean(values))
        return out
