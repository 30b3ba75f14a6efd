"""GanStrategy end to end over real Flower ``Message``s: what goes out, what is aggregated.

Replies are built as a hospital builds them (``protocol.train_reply``, ``Message(reply_to=...)``)
under a task identity, as Flower's own strategy tests do outside a Flower process.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message

from protocol import records as protocol
from server.aggregation import ComponentPolicy
from server.strategy import LOCAL_NORM_COMPONENTS, REPLY_COMPONENTS, GanStrategy
from tests.harness.flower_helpers import task_identity

COMPONENTS = ("g_ab", "g_ba", "d_a", "d_b")
NORM = frozenset({"g_ab.norm.weight", "d_a.norm.weight"})


class FakeGrid:
    """The part of Flower's Grid a strategy uses to pick nodes."""

    def __init__(self, nodes: Iterable[int] = (1, 2, 3)) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return self.nodes


def global_model() -> dict[str, np.ndarray]:
    """Every component a 2-vector ``w``; two of them also a norm entry; all zeros."""
    arrays = {f"{c}.w": np.zeros(2, np.float32) for c in COMPONENTS}
    arrays.update({k: np.zeros(1, np.float32) for k in NORM})
    return arrays


def reply(instruction: Message, arrays: Mapping[str, np.ndarray],
          examples: Mapping[str, int]) -> Message:
    metrics = {protocol.examples_key(c): n for c, n in examples.items()}
    metrics[protocol.NUM_EXAMPLES] = max(examples.values(), default=0)
    metrics["loss-g"] = 1.0
    return Message(protocol.train_reply(arrays, metrics), reply_to=instruction)


def filled(keys: Iterable[str], value: float) -> dict[str, np.ndarray]:
    ref = global_model()
    return {k: np.full_like(ref[k], value) for k in keys}


def run_round(strategy: GanStrategy, answers: Mapping[int, tuple[float, Mapping[str, int]]],
              server_round: int = 1, arrays: Mapping[str, np.ndarray] | None = None,
              keys: Iterable[str] | None = None):  # noqa: ANN201 - test helper
    """Configure, let hospital n reply ``value`` on every expected key, aggregate."""
    arrays = dict(arrays or global_model())
    with task_identity():
        out = list(strategy.configure_train(server_round, protocol.to_record(arrays),
                                            ConfigRecord({}), FakeGrid(answers)))
        sent = protocol.from_record(out[0].content[protocol.ARRAYS])
        config = out[0].content[protocol.CONFIG]
        want = list(keys) if keys is not None else strategy.expected_keys(server_round, arrays)
        replies = [reply(m, filled(want, answers[m.metadata.dst_node_id][0]),
                         answers[m.metadata.dst_node_id][1]) for m in out]
        record, metrics = strategy.aggregate_train(server_round, replies)
    new = protocol.from_record(record) if record is not None else None
    return sent, config, new, metrics


ALL = {"g_ab": 10, "g_ba": 10, "d_a": 10, "d_b": 10}
NO_B = {"g_ab": 30, "g_ba": 0, "d_a": 30, "d_b": 0}  # hospital without domain-B slices


def test_fedgan_weights_each_component_by_its_domain() -> None:
    strategy = GanStrategy(COMPONENTS)
    sent, config, new, metrics = run_round(strategy, {1: (1.0, ALL), 2: (5.0, NO_B)})
    assert set(sent) == set(global_model())
    assert config[REPLY_COMPONENTS] == ",".join(COMPONENTS)
    assert new["g_ab.w"] == pytest.approx([4.0, 4.0])  # (10*1 + 30*5) / 40
    assert new["d_a.w"] == pytest.approx([4.0, 4.0])
    assert new["g_ba.w"] == pytest.approx([1.0, 1.0])  # hospital 2 has 0 domain-B examples
    assert new["d_b.w"] == pytest.approx([1.0, 1.0])
    assert new["g_ab.norm.weight"] == pytest.approx([4.0])
    assert strategy.last_train.replied == 2 and metrics["loss-g"] == pytest.approx(1.0)


def test_local_discriminators_never_travel() -> None:
    policies = {c: ComponentPolicy(shared=c.startswith("g_")) for c in COMPONENTS}
    strategy = GanStrategy(COMPONENTS, policies=policies)
    sent, config, new, _ = run_round(strategy, {1: (2.0, ALL), 2: (4.0, ALL)})
    assert set(sent) == {"g_ab.w", "g_ba.w", "g_ab.norm.weight"}
    assert config[REPLY_COMPONENTS] == "g_ab,g_ba"
    assert new["g_ab.w"] == pytest.approx([3.0, 3.0])
    assert new["d_a.w"] == pytest.approx([0.0, 0.0]) and new["d_b.w"] == pytest.approx([0, 0])


def test_fedbn_keeps_norm_entries_home() -> None:
    policies = {c: ComponentPolicy(local_norm=True) for c in COMPONENTS}
    strategy = GanStrategy(COMPONENTS, policies=policies, norm_keys=NORM)
    sent, config, new, _ = run_round(strategy, {1: (2.0, ALL), 2: (4.0, ALL)})
    assert not NORM & set(sent)
    assert config[LOCAL_NORM_COMPONENTS] == ",".join(COMPONENTS)
    assert new["g_ab.norm.weight"] == pytest.approx([0.0])
    assert new["g_ab.w"] == pytest.approx([3.0, 3.0])


def test_sync_every_two_rounds() -> None:
    policies = {c: ComponentPolicy(sync_every=2) for c in COMPONENTS}
    strategy = GanStrategy(COMPONENTS, policies=policies)
    sent, config, new, _ = run_round(strategy, {1: (2.0, ALL)}, server_round=1)
    assert set(sent) == set(global_model()) and config[REPLY_COMPONENTS] == ""
    assert new["g_ab.w"] == pytest.approx([0.0, 0.0])  # nothing collected in round 1
    sent, config, new, _ = run_round(strategy, {1: (2.0, ALL)}, server_round=2)
    assert sent == {} and config[REPLY_COMPONENTS] == ",".join(COMPONENTS)
    assert new["g_ab.w"] == pytest.approx([2.0, 2.0])


def test_median_reducer_and_evaluate_sends_only_what_was_aggregated() -> None:
    policies = {c: ComponentPolicy(reducer="median", shared=c != "d_b") for c in COMPONENTS}
    strategy = GanStrategy(COMPONENTS, policies=policies)
    _, _, new, _ = run_round(strategy, {1: (1.0, ALL), 2: (2.0, ALL), 3: (9.0, NO_B)})
    assert new["g_ab.w"] == pytest.approx([2.0, 2.0])
    with task_identity():
        out = list(strategy.configure_evaluate(1, protocol.to_record(new), ConfigRecord({}),
                                               FakeGrid([1])))
    assert "d_b.w" not in protocol.from_record(out[0].content[protocol.ARRAYS])


def test_unknown_component_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown component"):
        GanStrategy(COMPONENTS, policies={"critic": ComponentPolicy()})
