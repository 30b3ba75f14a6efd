"""Secure aggregation of a train round: Flower's SecAgg+, driven from fedsynth's round loop.

**The path in Flower 1.42** (read in ``flwr/server/workflow/secure_aggregation/
secaggplus_workflow.py`` and ``flwr/client/mod/secure_aggregation/secaggplus_mod.py``).
SecAgg+ exists only as ``SecAggPlusWorkflow``, a *legacy* workflow: its ``__call__`` wants a
``LegacyContext`` (a legacy ``Strategy`` with ``configure_fit``/``aggregate_fit``, a
``ClientManager``, a ``History``) and runs inside ``DefaultWorkflow``, which owns the whole round
loop. The Message-API strategies (``flwr.serverapp.strategy``, which ``GanStrategy`` is) have no
secure-aggregation hook. fedsynth keeps its own loop (checkpoints, metrics rows, resume), so this
module does not run ``DefaultWorkflow``: it calls the workflow's four public stage methods itself,
on fedsynth's Grid (``PromptGrid``: a dead hospital is an error reply within ~1 s, which the
workflow counts as a dropout), with a small stand-in for the legacy context:

1. ``setup_stage``: hospitals get the protocol's parameters, answer with two public keys;
2. ``share_keys_stage``: keys forwarded, encrypted shares of each hospital's secrets collected;
3. ``collect_masked_vectors_stage``: the *train* message — fedsynth's own signed content, put in
   the workflow's state in place of the legacy ``FitIns`` — goes out with the shares; each
   hospital trains, and its ``secaggplus_mod`` replaces the arrays with the masked vector;
4. ``unmask_stage``: shares of the survivors' private seeds and of the dropped hospitals' keys
   come back; the workflow removes the masks and dequantises the *mean*, which it hands to the
   stand-in's ``aggregate_fit``. Nothing else of a hospital's arrays ever reaches this process.

**What it costs.** Four round trips per train round instead of one (three are small: keys and
shares, O(hospitals) bytes each), which on a deployed federation is ~3 x Flower's per-message
latency (DESIGN.md: ~3 s a message from the SuperNode's poll). The masked vector is int64 on the
wire: 2x the float32 reply, 4x a float16 one, 8x int8 (so ``wire-dtype`` must stay float32).
Hospitals do O(hospitals) key agreements and PRG expansions of the model's size; the coordinator
expands one PRG per hospital (more per dropout).

**The packed ArrayRecord.** The mod masks one flat list with one weight per hospital
(``FitRes.num_examples``); fedsynth's single ArrayRecord with component-prefixed keys is exactly
one list, so nothing about it needs splitting into records, but the per-component weighting
(``num-examples-<component>``) is not Flower's. ``protocol.secure_vector`` lays the list out with
its own per-component weights, so the unmasked mean is still fedsynth's example-weighted mean per
component, and ``GanStrategy``'s aggregation (server optimiser, norm-stat checks, refused
aggregates) runs on it as on a one-reply round.

**What validation becomes** (docs/security.md, "Secure aggregation"): reply checks of shapes,
norms, finiteness and example counts need individual updates, which the coordinator no longer
has. What bounds a hospital instead is the encoding: each update coordinate clipped to
+- ``secure-aggregation-clip`` and each example count capped at
``secure-aggregation-max-examples``, both applied at the hospital and, for the clip, enforced by
the mod's own clipping; the aggregate is still checked (finite, usable norm statistics).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from protocol import records as protocol
from protocol.secure_vector import decode_mean, secure_keys

from .aggregation import Update

log = logging.getLogger(__name__)

# SECAGG_CLIP, SECAGG_MAX_EXAMPLES, SECURE_PRESETS and the launch refusal (check_secure_run) are
# declared torch- and flwr-free for `fedsynth launch`'s check
from .run_rules import SECAGG_CLIP, SECAGG_MAX_EXAMPLES, SECURE_PRESETS, check_secure_run  # noqa: F401

QUANTIZATION_RANGE = 2 ** 24  # per hospital; hospitals x range must stay below MOD_RANGE
MOD_RANGE = 2 ** 32
NUM_SHARES = 1.0  # every hospital holds a share of every other's secrets
RECONSTRUCTION_THRESHOLD = 0.5  # of the shares: 3 hospitals tolerate 1 dropout, 10 tolerate 5
MAX_HOSPITALS = MOD_RANGE // QUANTIZATION_RANGE - 1  # 255: beyond, the masked sum overflows


@dataclass
class _Proxy:
    """What the workflow needs of a legacy ClientProxy: its node id."""

    node_id: int


@dataclass
class _LegacyStandIn:
    """The parts of ``LegacyContext`` the four stages read: state (round number, parameters),
    strategy (``configure_fit`` / ``aggregate_fit``), client manager, history."""

    node_ids: list[int]
    server_round: int
    state: RecordDict = field(default_factory=RecordDict)
    result: Any = None  # (mean vector, [(node id, metrics)]) from ``aggregate_fit``

    def __post_init__(self) -> None:
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
        from flwr.server.workflow.constant import Key as WorkflowKey

        self.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: self.server_round})
        self.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        self.strategy = self
        self.client_manager = self
        self.history = self

    # legacy strategy
    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        from protocol.flower_private import legacy_fit_ins

        # empty: the workflow's stage-2 content is replaced by fedsynth's signed train message
        return [(_Proxy(n), legacy_fit_ins()) for n in self.node_ids]

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple:
        from protocol.flower_private import legacy_ndarrays

        vector = legacy_ndarrays(results[0][1].parameters) if results else None
        self.result = (vector, [(p.node_id, dict(r.metrics)) for p, r in results])
        return None, {}

    # legacy client manager / history
    def num_available(self) -> int:
        return len(self.node_ids)

    def add_metrics_distributed_fit(self, **_: Any) -> None:
        pass


class _OwnContent:
    """The workflow sends one content object to every hospital, and the mod edits what it
    receives; over the wire that is harmless, but a grid that delivers in process
    (``fedsynth.inprocess``) would let one hospital's edit reach the next. Each message gets
    its own copy."""

    def __init__(self, grid: Any) -> None:
        self._grid = grid

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        import copy

        from flwr.app import Message

        own = [Message(content=copy.deepcopy(m.content), dst_node_id=m.metadata.dst_node_id,
                       message_type=m.metadata.message_type, group_id=m.metadata.group_id)
               for m in messages]
        from protocol.flower_private import masked_from_arrays

        # hospitals send the masked vector as chunked arrays (protocol.flower_private
        # masked_as_arrays); the workflow reads it where Flower's mod puts it
        return [masked_from_arrays(r) for r in self._grid.send_and_receive(own, timeout=timeout)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def secure_train_round(strategy: Any, grid: Any, server_round: int, record: ArrayRecord,
                       config: ConfigRecord, *, clip: float, max_examples: float,
                       timeout: float | None) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """One train round of ``strategy`` (a ``GanStrategy``) under SecAgg+; like
    ``aggregate_train``'s result: the new global record (None: nothing aggregated, the model is
    kept) and the mean train metrics."""
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import (
        SecAggPlusWorkflow, WorkflowState)

    from .validation import RejectedReply, known_metrics, train_metric_keys

    messages = list(strategy.configure_train(server_round, record, config, grid))
    report = strategy.last_train
    strategy.last_folded = {}
    if len(messages) > MAX_HOSPITALS:
        raise ValueError(f"secure aggregation: {len(messages)} hospitals; at most "
                         f"{MAX_HOSPITALS} fit the masked sum")
    nodes = [int(m.metadata.dst_node_id) for m in messages]
    contents = {int(m.metadata.dst_node_id): m.content for m in messages}
    workflow = SecAggPlusWorkflow(NUM_SHARES, RECONSTRUCTION_THRESHOLD, max_weight=max_examples,
                                  clipping_range=float(clip),
                                  quantization_range=QUANTIZATION_RANGE,
                                  modulus_range=MOD_RANGE, timeout=timeout)
    context = _LegacyStandIn(nodes, server_round)
    grid = _OwnContent(grid)
    state = WorkflowState()
    ok = workflow.setup_stage(grid, context, state)  # type: ignore[arg-type]
    # each hospital's train message is fedsynth's own signed content (one RecordDict per node:
    # the workflow adds its shares to it)
    state.nid_to_fitins = {n: RecordDict({protocol.ARRAYS: c[protocol.ARRAYS],
                                          protocol.CONFIG: c[protocol.CONFIG]})
                           for n, c in contents.items()}
    ok = ok and workflow.share_keys_stage(grid, context, state)  # type: ignore[arg-type]
    # Flower 1.42 counts every hospital sampled at setup as "dead" at unmask if it is gone by
    # then, and asks the others for its shares; one that left during setup or share keys never
    # handed out any (and nobody masked against it), so the others' mods fail on the request
    # (KeyError) and the round is lost. Only hospitals whose shares went out can be dead.
    state.sampled_node_ids = set(state.active_node_ids)
    for stage in (workflow.collect_masked_vectors_stage, workflow.unmask_stage):
        ok = ok and stage(grid, context, state)  # type: ignore[arg-type]
    survivors = {n for n, _ in (context.result[1] if context.result else [])}
    for n in nodes:
        if n not in survivors:
            report.failed += 1
            report.failed_nodes[str(n)] = "secure-aggregation"
    if not ok or context.result is None or context.result[0] is None:
        log.warning("round %d: secure aggregation halted (%d of %d hospitals finished); the "
                    "global model is kept", server_round, len(survivors), len(nodes))
        report.replied = 0
        return None, None
    vector, per_node = context.result
    allowed = train_metric_keys(strategy.components)
    for node, metrics in per_node:
        try:
            kept, dropped = known_metrics(metrics, allowed)
        except RejectedReply:
            kept, dropped = {}, 0
        report.dropped_metric_keys += dropped
        report.replied += 1
        report.per_hospital[str(node)] = {k: v for k, v in kept.items()
                                          if k not in protocol.EVAL_METRICS}
        folded = {k: v for k, v in kept.items() if k in protocol.EVAL_METRICS}
        if folded:
            strategy.last_folded[str(node)] = folded
    expected = {k: strategy._global[k] for k in strategy.expected_keys(server_round,
                                                                       strategy._global)}
    base = {k: expected[k] for k in secure_keys(expected)}
    merged, examples = decode_mean(vector, base, clip, max_examples, len(per_node))
    return strategy.aggregate_secure(
        server_round, Update(arrays=merged, examples=examples), report)
