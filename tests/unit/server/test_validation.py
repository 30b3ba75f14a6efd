"""Each kind of malformed reply is rejected, counted, and leaves the global model unchanged."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from protocol import records as protocol
from server.strategy import GanStrategy
from tests.harness.flower_helpers import task_identity
from tests.unit.server.test_strategy import ALL, COMPONENTS, FakeGrid, filled, global_model, reply

Corrupt = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def _drop(a: dict) -> dict:
    return {k: v for k, v in a.items() if k != "d_a.w"}


def _extra(a: dict) -> dict:
    return {**a, "d_a.secret": np.zeros(1, np.float32)}


def _shape(a: dict) -> dict:
    return {**a, "d_a.w": np.zeros(3, np.float32)}


def _dtype(a: dict) -> dict:
    return {**a, "d_a.w": np.zeros(2, np.float64)}


def _nan(a: dict) -> dict:
    return {**a, "d_a.w": np.array([np.nan, 0], np.float32)}


def _inf(a: dict) -> dict:
    return {**a, "d_a.w": np.array([np.inf, 0], np.float32)}


@pytest.mark.parametrize("corrupt, kind", [(_drop, "missing-key"), (_extra, "extra-key"),
                                           (_shape, "shape"), (_dtype, "dtype"),
                                           (_nan, "non-finite"), (_inf, "non-finite")])
def test_malformed_reply_is_rejected_and_model_kept(corrupt: Corrupt, kind: str) -> None:
    strategy = GanStrategy(COMPONENTS)
    model = global_model()
    with task_identity():
        (msg,) = strategy.configure_train(1, protocol.to_record(model), ConfigRecord({}),
                                          FakeGrid([1]))
        bad = corrupt(filled(model, 7.0))
        # bypass train_reply's own checks: a hostile or broken hospital need not use it
        content = RecordDict({
            protocol.ARRAYS: ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in bad.items()}),
            protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 5}),
        })
        record, metrics = strategy.aggregate_train(1, [Message(content, reply_to=msg)])
    assert record is None and metrics is None  # nothing valid: the caller keeps its model
    report = strategy.last_train
    assert report.rejected == 1 and report.rejected_reasons[kind] == 1 and report.replied == 0


def test_bad_example_count_and_missing_record_are_rejected() -> None:
    strategy = GanStrategy(COMPONENTS)
    model = global_model()
    with task_identity():
        (msg,) = strategy.configure_train(1, protocol.to_record(model), ConfigRecord({}),
                                          FakeGrid([1]))
        no_metrics = Message(RecordDict({protocol.ARRAYS: protocol.to_record(model)}),
                             reply_to=msg)
        negative = reply(msg, filled(model, 1.0), {"g_ab": -3, "g_ba": 1, "d_a": 1, "d_b": 1})
        assert strategy.aggregate_train(1, [no_metrics, negative]) == (None, None)
    assert strategy.last_train.rejected_reasons == {"no-record": 1, "metric": 1}


def test_good_replies_survive_a_bad_one_and_outlier_norms_are_dropped() -> None:
    strategy = GanStrategy(COMPONENTS)
    model = global_model()
    with task_identity():
        msgs = list(strategy.configure_train(1, protocol.to_record(model), ConfigRecord({}),
                                             FakeGrid([1, 2, 3, 4])))
        replies = [reply(msgs[0], filled(model, 1.0), ALL),
                   reply(msgs[1], filled(model, 3.0), ALL),
                   reply(msgs[2], filled(model, 500.0), ALL),  # > 10x the median distance
                   Message(RecordDict({}), reply_to=msgs[3])]
        record, _ = strategy.aggregate_train(1, replies)
    new = protocol.from_record(record)
    assert new["g_ab.w"] == pytest.approx([2.0, 2.0])
    report = strategy.last_train
    assert report.replied == 2 and report.rejected_reasons == {"norm": 1, "no-record": 1}
