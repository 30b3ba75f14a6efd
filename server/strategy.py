"""The component-aware GAN strategy: a Flower ``Strategy`` whose aggregation is per component.

It keeps Flower's four hooks (so it runs under ``Strategy.start`` as well as fedsynth's own round
loop), validates every reply before it counts, and leaves aggregation math to ``aggregation.py``.
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsynth import protocol

from .aggregation import Update, aggregate
from .validation import RejectedReply, validate_train_reply

log = logging.getLogger(__name__)


@dataclass
class RoundReport:
    """What one round's replies said, for metrics.jsonl and the exporters."""

    selected: int = 0
    replied: int = 0
    failed: int = 0
    rejected: int = 0
    rejected_reasons: Counter[str] = field(default_factory=Counter)
    per_hospital: dict[str, dict[str, float]] = field(default_factory=dict)


class GanStrategy(Strategy):
    """FedGAN-style aggregation of every component the family declares.

    ``fraction_train`` of the connected hospitals (at least ``min_train_nodes``) train each round;
    the round waits until ``min_available_nodes`` are connected.
    """

    def __init__(
        self,
        components: tuple[str, ...],
        *,
        fraction_train: float = 1.0,
        min_train_nodes: int = 1,
        min_available_nodes: int = 1,
        fraction_evaluate: float = 1.0,
    ) -> None:
        self.components = components
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.min_available_nodes = min_available_nodes
        self.fraction_evaluate = fraction_evaluate
        self._global: dict[str, np.ndarray] = {}
        self.last_train = RoundReport()
        self.last_evaluate = RoundReport()

    # -- Flower hooks -------------------------------------------------------------------------
    def summary(self) -> None:
        log.info("GanStrategy: components %s, fraction_train %.2f, min nodes %d",
                 self.components, self.fraction_train, self.min_available_nodes)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = protocol.from_record(arrays)
        nodes = self._sample(grid, self.fraction_train, self.min_train_nodes)
        self.last_train = RoundReport(selected=len(nodes))
        config[protocol.SERVER_ROUND] = server_round
        content = RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: config})
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n)
                for n in nodes]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validated, per-component weighted means; ``None`` arrays when nothing valid came."""
        report = self.last_train
        updates: list[Update] = []
        for msg in replies:
            hospital = str(msg.metadata.src_node_id)
            if msg.has_error():
                report.failed += 1
                log.warning("round %d: hospital %s failed: %s", server_round, hospital,
                            msg.error.reason)
                continue
            try:
                update, metrics = validate_train_reply(msg.content, self._global, self.components)
            except RejectedReply as exc:
                report.rejected += 1
                report.rejected_reasons[str(exc).split(":")[0]] += 1
                log.warning("round %d: rejected reply of hospital %s: %s", server_round,
                            hospital, exc)
                continue
            report.replied += 1
            report.per_hospital[hospital] = metrics
            updates.append(update)
        if not updates:
            log.warning("round %d: no valid reply, the global model is kept", server_round)
            return None, None
        merged = dict(self._global)
        merged.update(aggregate(updates, self.components))
        self._global = merged
        return protocol.to_record(merged), MetricRecord(self._mean_metrics(report.per_hospital))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate <= 0:
            return []
        nodes = self._sample(grid, self.fraction_evaluate, 1)
        self.last_evaluate = RoundReport(selected=len(nodes))
        config[protocol.SERVER_ROUND] = server_round
        content = RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: config})
        return [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n)
                for n in nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        report = self.last_evaluate
        for msg in replies:
            if msg.has_error() or protocol.METRICS not in msg.content.metric_records:
                report.failed += 1
                continue
            report.replied += 1
            report.per_hospital[str(msg.metadata.src_node_id)] = {
                k: float(v) for k, v in msg.content.metric_records[protocol.METRICS].items()
                if isinstance(v, (int, float))}
        if not report.per_hospital:
            return None
        return MetricRecord(self._mean_metrics(report.per_hospital, "eval-examples"))

    # -- helpers ------------------------------------------------------------------------------
    def _sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        """Wait for ``min_available_nodes`` connected hospitals, then take a fraction of them."""
        from flwr.serverapp.strategy.strategy_utils import sample_nodes

        available = len(list(grid.get_node_ids()))
        size = max(int(available * fraction), minimum)
        nodes, _ = sample_nodes(grid, self.min_available_nodes, size)
        return list(nodes)

    @staticmethod
    def _mean_metrics(per_hospital: dict[str, dict[str, float]],
                      weight_key: str = protocol.NUM_EXAMPLES) -> dict[str, float]:
        """Example-weighted mean of every metric that all hospitals reported."""
        keys = set.intersection(*(set(m) for m in per_hospital.values()))
        out: dict[str, float] = {}
        for key in sorted(keys):
            values = [m[key] for m in per_hospital.values()]
            weights = [m.get(weight_key, 1.0) for m in per_hospital.values()]
            if key.startswith("num-examples") or key == weight_key:
                out[key] = float(sum(values))
            elif sum(weights) > 0:
                out[key] = float(sum(v * w for v, w in zip(values, weights)) / sum(weights))
            else:
                out[key] = float(statistics.fmean(values))
        return out
