"""Issue 11, finding 6: no reply, however malformed, ends the run or poisons the global model.

Valid replies are mutated thousands of times with a seeded RNG (the packed blob's bytes, its JSON
index, shapes, dtypes, the header length, plain one-Array-per-tensor records, metric keys and
values, the records themselves, the array values) and fed through the round loop of
``GanStrategy`` and ``UaGanStrategy``: ``aggregate_train`` never raises, every reply that does not
decode is a counted rejection, and the global model stays finite.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from typing import Any, Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from protocol import records as protocol
from server.strategy import GanStrategy
from tests.harness.flower_helpers import task_identity
from tests.unit.server.test_strategy import FakeGrid

COMPONENTS = ("g", "d")
NORM_KEYS = frozenset({"g.bn.running_var", "g.bn.running_mean", "g.bn.num_batches_tracked"})

HOSTILE_SHAPES: list[Any] = [
    [2**62, 4], [-1], [-3, 4], [2**31, 2**31, 2**31], [1.5], ["4"], [True], None, 7, "x",
    [0, 2**62, 2**62], [1] * 40, [2**64], [10**30], [], [3, 4], [4, 3], [12], [0], {"a": 1},
]
HOSTILE_DTYPES: list[Any] = [
    "O", "|O", "<U4", "V8", "|V8", "(2,)<f4", "f3", "<f16", "<c8", "S4", "M8[s]", 5, None, [],
    "<f4", "<f2", "<f8", "<i8", "|u1", "|b1", "float32", "", "<" * 1000,
]
HOSTILE_KEYS: list[Any] = [
    "g.w", "d.w", "g.bn.running_var", "../../etc/passwd", "g.w\0", "x" * 10_000, 5, None, [],
    "<script>alert(1)</script>", "",
]
HOSTILE_NUMBERS: list[Any] = [
    10**400, -(10**400), 2**63, 2**64 + 1, -1, 0, 1e308, -1e308, math.nan, math.inf, -math.inf,
    1e-320, 1e12, [1, 2], [1.5, math.nan], 3,
]
HOSTILE_VALUES: list[Any] = HOSTILE_NUMBERS + ["many", b"\xff", None, True, {"a": 1}, object()]
HOSTILE_METRIC_KEYS: list[Any] = [
    "<script>x</script>/etc/passwd DOE^JANE", "num-examples-z", "eval-frechet", "loss-g", 7, None,
]


def global_model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "g.w": rng.normal(0, 0.1, (3, 4)).astype(np.float32),
        "g.bn.running_var": np.ones(4, np.float32),
        "g.bn.running_mean": np.zeros(4, np.float32),
        "g.bn.num_batches_tracked": np.array(7, np.int64),
        "d.w": rng.normal(0, 0.1, 5).astype(np.float32),
    }


def honest_arrays(model: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for k, v in model.items():
        if np.issubdtype(v.dtype, np.floating):
            out[k] = (v + rng.normal(0, 0.01, v.shape)).astype(v.dtype)
        else:
            out[k] = np.asarray(v + 1, v.dtype)
    return out


def honest_metrics() -> dict[str, float | int]:
    return {protocol.NUM_EXAMPLES: 50, protocol.examples_key("g"): 50,
            protocol.examples_key("d"): 50, "loss-g": 1.0, "loss-d": 0.7}


# -- building hostile records -----------------------------------------------------------------
def blob_of(record: ArrayRecord) -> np.ndarray:
    return record[protocol.PACKED].numpy().copy()


def packed(blob: np.ndarray) -> ArrayRecord:
    return ArrayRecord({protocol.PACKED: Array.from_numpy_ndarray(np.asarray(blob, np.uint8))})


def split_blob(blob: np.ndarray) -> tuple[Any, bytes]:
    n = int.from_bytes(blob[:8].tobytes(), "little")
    return json.loads(blob[8:8 + n].tobytes()), blob[8 + n + (-n % 8):].tobytes()


def join_blob(index: bytes, data: bytes) -> np.ndarray:
    head = len(index).to_bytes(8, "little") + index + b"\0" * (-len(index) % 8)
    return np.frombuffer(head + data, np.uint8)


def hostile_npy(rng: np.random.Generator, huge: bool = False) -> bytes:
    """A .npy payload whose header claims something its bytes are not (``huge``: surely)."""
    shape = tuple(int(x) for x in rng.choice([2**62, 2**31, 4, 0, 1], size=rng.integers(1, 4)))
    if huge:  # (an empty array of shape (2**62, 0) is harmless, and decodes)
        shape = (2**62, *(d or 1 for d in shape))
    descr = str(rng.choice(["<f4", "|u1", "|O", "<U8", "|V4", "<f8"]))
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
    if rng.random() < 0.2:
        header = "{'descr': " + "[" * 200  # unreadable
    raw = header.encode("latin1")
    raw += b" " * (-(10 + len(raw) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(raw).to_bytes(2, "little") + raw + rng.bytes(
        int(rng.integers(0, 64)))


def mutate_arrays(record: ArrayRecord, arrays: dict[str, np.ndarray],
                  rng: np.random.Generator) -> ArrayRecord:
    """One random corruption of a reply's array record (or of the arrays inside it)."""
    blob = blob_of(record)
    kind = int(rng.integers(0, 9))
    if kind == 0:  # flip bytes anywhere (index, padding, data)
        for at in rng.integers(0, len(blob), size=int(rng.integers(1, 8))):
            blob[at] = rng.integers(0, 256)
        return packed(blob)
    if kind == 1:  # truncate, extend, or a header length that lies
        choice = int(rng.integers(0, 4))
        if choice == 0:
            return packed(blob[: int(rng.integers(0, len(blob)))])
        if choice == 1:
            return packed(np.concatenate([blob, rng.integers(0, 256, 100, dtype=np.uint8)]))
        n = [0, 1, 2**63 - 1, 2**64 - 1, len(blob), len(blob) - 9][int(rng.integers(0, 6))]
        blob[:8] = np.frombuffer(int(n).to_bytes(8, "little"), np.uint8)
        return packed(blob)
    index, data = split_blob(blob)
    if kind == 2:  # one field of one index entry
        entry = index[int(rng.integers(0, len(index)))]
        field = int(rng.integers(0, 3))
        pool = (HOSTILE_KEYS, HOSTILE_DTYPES, HOSTILE_SHAPES)[field]
        entry[field] = pool[int(rng.integers(0, len(pool)))]
        return packed(join_blob(json.dumps(index).encode(), data))
    if kind == 3:  # the index as a whole
        choices: list[bytes] = [
            b"{}", b"5", b'"index"', b"null", b"[[1, 2]]", b"[[\"g.w\"]]", b"\xff\xfe[]",
            b"[" * 100_000, b"[1e999]", b'[["g.w", "<f4", [3, 4]], ["g.w", "<f4", [3, 4]]]',
            b"[" + b"9" * 5000 + b"]", json.dumps(index + index).encode(), b"",
            json.dumps([[e[0], e[1], e[2]] for e in reversed(index)]).encode(),
        ]
        return packed(join_blob(choices[int(rng.integers(0, len(choices)))], data))
    if kind == 4:  # the blob itself of the wrong dtype / dimensions
        alt = [blob.astype(np.int64), blob.reshape(1, -1), blob[:4], np.zeros((2, 2), np.uint8)]
        return ArrayRecord({protocol.PACKED: Array.from_numpy_ndarray(
            alt[int(rng.integers(0, len(alt)))])})
    if kind == 5:  # a plain record: one Array per tensor, some of them hostile
        out = {k: Array.from_numpy_ndarray(v) for k, v in arrays.items()}
        key = list(out)[int(rng.integers(0, len(out)))]
        choice = int(rng.integers(0, 4))
        if choice == 0:
            out[key] = Array(dtype="float32", shape=(2**62, 4), stype="numpy.ndarray",
                             data=hostile_npy(rng))
        elif choice == 1:
            out[key] = Array(dtype="float32", shape=(3,), stype="other", data=b"abc")
        elif choice == 2:
            out[key] = Array(dtype="float32", shape=(3,), stype="numpy.ndarray",
                             data=rng.bytes(int(rng.integers(0, 40))))
        else:
            out[key] = Array.from_numpy_ndarray(np.array(["a", "b"]))
        return ArrayRecord(out)
    # kinds 6-8: a well-formed record carrying bad arrays
    bad = dict(arrays)
    key = list(bad)[int(rng.integers(0, len(bad)))]
    ref = bad[key]
    options: list[Callable[[], np.ndarray]] = [
        lambda: np.full(ref.shape, 3e38, np.float32),
        lambda: np.full(ref.shape, -3e38, np.float32),
        lambda: np.full(ref.shape, np.nan, np.float32),
        lambda: np.full(ref.shape, 65504, np.float16),
        lambda: np.full(ref.shape, -1.0, np.float32),
        lambda: np.full(ref.shape, 2**62, np.int64),
        lambda: np.full(ref.shape, -5, np.int64),
        lambda: np.zeros(ref.shape, np.float64),
        lambda: np.zeros(ref.shape, np.int8),
        lambda: np.zeros(ref.shape, bool),
        lambda: np.zeros(ref.size + 1, ref.dtype),
        lambda: np.zeros((), ref.dtype),
    ]
    bad[key] = options[int(rng.integers(0, len(options)))]()
    if rng.random() < 0.2:
        bad.pop(key)
    if rng.random() < 0.2:
        bad["g.extra"] = np.zeros(2, np.float32)
    return protocol.to_record(bad)


def hostile_metrics(rng: np.random.Generator) -> MetricRecord:
    """Metrics with hostile values and keys; some injected past MetricRecord's own type checks,
    as a reply decoded by a buggy or future Flower could carry them."""
    record = MetricRecord(honest_metrics())
    for _ in range(int(rng.integers(1, 4))):
        key: Any = [protocol.NUM_EXAMPLES, protocol.examples_key("g"), protocol.examples_key("d"),
                    "loss-g", *HOSTILE_METRIC_KEYS][int(rng.integers(0, 10))]
        value = HOSTILE_VALUES[int(rng.integers(0, len(HOSTILE_VALUES)))]
        record._data[key] = value  # noqa: SLF001 - bypass the constructor's checks on purpose
    return record


def fuzzed_content(model: dict[str, np.ndarray], rng: np.random.Generator) -> RecordDict:
    arrays = honest_arrays(model, rng)
    record = protocol.to_record(arrays)
    metrics = MetricRecord(honest_metrics())
    roll = rng.random()
    if roll < 0.55:
        record = mutate_arrays(record, arrays, rng)
    elif roll < 0.9:
        metrics = hostile_metrics(rng)
    else:
        choice = int(rng.integers(0, 4))
        if choice == 0:
            return RecordDict({protocol.ARRAYS: record})
        if choice == 1:
            return RecordDict({protocol.METRICS: metrics})
        if choice == 2:
            return RecordDict({protocol.ARRAYS: record,
                               protocol.METRICS: ConfigRecord({"num-examples": "x"})})
        return RecordDict({})
    return RecordDict({protocol.ARRAYS: record, protocol.METRICS: metrics})


def all_finite(arrays: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(v).all() for v in arrays.values())


# -- the tests -----------------------------------------------------------------------------------
def test_hostile_packed_records_raise_value_error_only() -> None:
    """``from_record`` refuses hostile input with ValueError, allocating nothing huge."""
    rng = np.random.default_rng(11)
    model = global_model(rng)
    record = protocol.to_record(model)
    index, data = split_blob(blob_of(record))
    cases = [
        [["g.w", "<f4", [2**62, 4]]], [["g.w", "<f4", [-1, 4]]], [["g.w", "<f4", [2**31] * 3]],
        [["g.w", "|O", [1]]], [["g.w", "(2,)<f4", [1]]], [["g.w", "<U4", [1]]],
        [[5, "<f4", [1]]], [["g.w", "<f4", [1]], ["g.w", "<f4", [1]]], [["g.w", "<f4"]],
        {"g.w": 1}, "g.w", [["g.w", "<f4", [1.0]]], [["g.w", "<f4", [True]]],
        [["g.w", "<f4", [2**64]]], [["g.w", "<f4", [3, 4, 5, 6]]],
    ]
    for case in cases:
        with pytest.raises(ValueError):
            protocol.from_record(packed(join_blob(json.dumps(case).encode(), data)))
    for raw in (b"[" * 100_000, b"\xff\xfe", b""):
        with pytest.raises(ValueError):
            protocol.from_record(packed(join_blob(raw, data)))
    blob = blob_of(record)
    blob[:8] = np.frombuffer((2**64 - 1).to_bytes(8, "little"), np.uint8)
    with pytest.raises(ValueError):
        protocol.from_record(packed(blob))
    for _ in range(20):
        hostile = ArrayRecord({"g.w": Array(dtype="float32", shape=(2**62, 4),
                                            stype="numpy.ndarray", data=hostile_npy(rng, huge=True))})
        with pytest.raises(ValueError):
            protocol.from_record(hostile)
    assert protocol.from_record(record).keys() == model.keys()  # the valid one still decodes
    buf = io.BytesIO()
    np.save(buf, np.zeros(3, np.float32))
    plain = ArrayRecord({"g.w": Array(dtype="float32", shape=(3,), stype="numpy.ndarray",
                                      data=buf.getvalue())})
    assert protocol.from_record(plain)["g.w"].shape == (3,)


def test_unreadable_reply_is_a_rejection_not_a_crash() -> None:
    """The issue's two examples: an unreadable index and a [2**62, 4] shape."""
    rng = np.random.default_rng(3)
    model = global_model(rng)
    strategy = GanStrategy(COMPONENTS, norm_keys=NORM_KEYS)
    index, data = split_blob(blob_of(protocol.to_record(model)))
    index[0][2] = [2**62, 4]
    with task_identity():
        msgs = list(strategy.configure_train(1, protocol.to_record(model), ConfigRecord({}),
                                             FakeGrid([1, 2, 3])))
        good = Message(protocol.train_reply(honest_arrays(model, rng), honest_metrics()),
                       reply_to=msgs[0])
        unreadable = Message(RecordDict({
            protocol.ARRAYS: packed(join_blob(b"[not json", data)),
            protocol.METRICS: MetricRecord(honest_metrics())}), reply_to=msgs[1])
        huge = Message(RecordDict({
            protocol.ARRAYS: packed(join_blob(json.dumps(index).encode(), data)),
            protocol.METRICS: MetricRecord(honest_metrics())}), reply_to=msgs[2])
        record, _ = strategy.aggregate_train(1, [good, unreadable, huge])
    assert record is not None
    report = strategy.last_train
    assert report.replied == 1 and report.rejected == 2
    assert report.rejected_reasons == {"decode": 2}


def test_fuzzed_replies_never_end_the_round_loop() -> None:
    rng = np.random.default_rng(20240611)
    model = global_model(rng)
    strategy = GanStrategy(COMPONENTS, norm_keys=NORM_KEYS)
    rejected: Counter[str] = Counter()
    dropped = 0
    with task_identity():
        for rnd in range(1, 751):  # 1500 fuzzed replies
            msgs = list(strategy.configure_train(rnd, protocol.to_record(model),
                                                 ConfigRecord({}), FakeGrid([1, 2, 3, 4])))
            replies = [Message(protocol.train_reply(honest_arrays(model, rng), honest_metrics()),
                               reply_to=m) for m in msgs[:2]]
            replies += [Message(fuzzed_content(model, rng), reply_to=m) for m in msgs[2:]]
            record, metrics = strategy.aggregate_train(rnd, replies)  # must not raise
            report = strategy.last_train
            assert record is not None and report.replied >= 2, rnd
            assert report.rejected == sum(report.rejected_reasons.values())
            rejected.update(report.rejected_reasons)
            dropped += report.dropped_metric_keys
            new = protocol.from_record(record)
            assert new.keys() == model.keys() and all_finite(new), rnd
            assert (new["g.bn.running_var"] >= 0).all()
            assert 0 <= int(new["g.bn.num_batches_tracked"]) < 2**53
            # honest training moves ~0.01 per round; nothing fuzzed may move it far
            assert float(np.abs(new["g.w"] - model["g.w"]).max()) < 1.0, rnd
            assert not any(not isinstance(k, str) or k.startswith("<") for k in
                           report.per_hospital.get("0", {}))
            for per in report.per_hospital.values():
                assert set(per) <= set(protocol.TRAIN_METRICS) | {
                    protocol.NUM_EXAMPLES, protocol.examples_key("g"), protocol.examples_key("d")}
            model = new
    # most fuzzed replies were refused and counted; many of the rest carried invented metric keys
    assert sum(rejected.values()) > 750 and rejected["decode"] > 200, rejected
    assert dropped > 100


@pytest.fixture(scope="module")
def ua_strategy():  # noqa: ANN201
    from server.ua_gan import UaGanStrategy
    from shared_models import ModelConfig, TrainConfig

    return UaGanStrategy(ModelConfig(family="dcgan", image_size=16, latent_dim=8, width=4),
                         TrainConfig(), fake_batch=2)


def test_fuzzed_replies_never_end_the_ua_gan_round_loop(ua_strategy) -> None:  # noqa: ANN001
    from server.ua_gan import GRADS, LOGITS
    from shared_models import encode

    strategy = ua_strategy
    rng = np.random.default_rng(7)
    model = encode(strategy.nets)

    def honest(fakes: np.ndarray) -> dict[str, np.ndarray]:
        return {LOGITS: rng.normal(0, 1, len(fakes)).astype(np.float32),
                GRADS: rng.normal(0, 1e-3, fakes.shape).astype(np.float32)}

    def ua_metrics() -> dict[str, float | int]:
        return {protocol.NUM_EXAMPLES: 50, protocol.examples_key("discriminator"): 50,
                "loss-d": 0.7}

    def fuzzed(fakes: np.ndarray) -> RecordDict:
        arrays = honest(fakes)
        record = protocol.to_record(arrays)
        metrics = MetricRecord(ua_metrics())
        if rng.random() < 0.6:
            record = mutate_arrays(record, arrays, rng)
        else:
            metrics = hostile_metrics(rng)
            metrics._data[protocol.examples_key("discriminator")] = HOSTILE_VALUES[  # noqa
                int(rng.integers(0, len(HOSTILE_VALUES)))]
        return RecordDict({protocol.ARRAYS: record, protocol.METRICS: metrics})

    rejected = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    try:
        with task_identity():
            for rnd in range(1, 121):  # 480 fuzzed replies
                msgs = list(strategy.configure_train(rnd, protocol.to_record(model),
                                                     ConfigRecord({}), FakeGrid(range(1, 6))))
                fakes = protocol.from_record(msgs[0].content[protocol.ARRAYS])["fakes"]
                replies = [Message(protocol.train_reply(honest(fakes), ua_metrics()),
                                   reply_to=msgs[0])]
                replies += [Message(fuzzed(fakes), reply_to=m) for m in msgs[1:]]
                new_record, _ = strategy.aggregate_train(rnd, replies)  # must not raise
                rejected += strategy.last_train.rejected
                assert new_record is not None, rnd
                model = protocol.from_record(new_record)
                assert all_finite(model), rnd
                assert all(bool(torch.isfinite(p).all())
                           for p in strategy.nets["generator"].parameters())
    finally:
        torch.set_num_threads(threads)
    assert rejected > 200
