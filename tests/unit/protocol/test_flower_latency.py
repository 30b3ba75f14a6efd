"""The round-latency pieces: packed records, the prompt Grid, Flower's shortened waits, the
warm executor's settings. The deployed federation test runs them all for real."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from protocol import flower_private
from protocol import records as protocol


def test_packed_record_round_trips_every_dtype_and_shape() -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "generator.w": rng.standard_normal((3, 5, 2)).astype(np.float32),
        "generator.half": rng.standard_normal(7).astype(np.float16),
        "generator.num_batches_tracked": np.array(12, np.int64),  # 0-d stays 0-d
        "discriminator.strided": rng.standard_normal((4, 6))[:, ::2],  # not contiguous
        "discriminator.empty": np.zeros((0, 3), np.float32),
        "labels": np.arange(5, dtype=np.int32),
    }
    record = protocol.to_record(arrays)
    assert list(record.keys()) == [protocol.PACKED]  # one Flower object, not one per tensor
    back = protocol.from_record(record)
    assert list(back) == list(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert np.array_equal(back[k], v), k


def test_packed_record_costs_only_its_index() -> None:
    arrays = {f"generator.layer{i}": np.ones(1000, np.float32) for i in range(50)}
    blob = protocol.to_record(arrays)[protocol.PACKED]
    payload = sum(v.nbytes for v in arrays.values())
    assert payload < int(np.prod(blob.shape)) < payload * 1.02


@pytest.mark.parametrize("cut", [3, 20, -5])
def test_damaged_packed_record_is_refused(cut: int) -> None:
    from flwr.app import Array, ArrayRecord

    good = protocol.to_record({"generator.w": np.ones((4, 4), np.float32)})
    blob = good[protocol.PACKED].numpy()
    bad = ArrayRecord(array_dict={protocol.PACKED: Array.from_numpy_ndarray(blob[:cut])})
    with pytest.raises(ValueError, match="packed array record"):
        protocol.from_record(bad)


def test_plain_records_still_read() -> None:
    from flwr.app import Array, ArrayRecord

    plain = ArrayRecord(array_dict={"generator.w": Array.from_numpy_ndarray(np.ones(3))})
    assert np.array_equal(protocol.from_record(plain)["generator.w"], np.ones(3))


# ---------------------------------------------------------------- PromptGrid

@dataclass
class _Meta:
    reply_to_message_id: str


@dataclass
class _Reply:
    metadata: _Meta


@dataclass
class _SlowGrid:
    """Replies to message i become available after ``ready[i]`` seconds."""

    ready: list[float]
    pulls: int = 0
    t0: float = field(default_factory=time.monotonic)

    def push_messages(self, messages):
        self.t0 = time.monotonic()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        now = time.monotonic() - self.t0
        return [_Reply(_Meta(i)) for i in sorted(ids) if now >= self.ready[int(i[1:])]]

    def get_node_ids(self):
        return [1, 2]


def test_prompt_grid_returns_as_soon_as_the_last_reply_lands() -> None:
    from server.grid import PromptGrid

    grid = PromptGrid(_SlowGrid([0.05, 0.3]), poll_s=0.02)
    t0 = time.monotonic()
    replies = grid.send_and_receive(["a", "b"], timeout=10)
    took = time.monotonic() - t0
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert 0.3 <= took < 1.0  # Flower's own grid checks every 3 s
    assert grid.get_node_ids() == [1, 2]  # everything else is the wrapped grid's


def test_prompt_grid_gives_up_at_the_timeout_with_what_it_has() -> None:
    from server.grid import PromptGrid

    grid = PromptGrid(_SlowGrid([0.0, 60.0]), poll_s=0.02)
    t0 = time.monotonic()
    replies = grid.send_and_receive(["a", "b"], timeout=0.2)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert time.monotonic() - t0 < 1.0


# ---------------------------------------------------------------- Flower's waits

def test_this_flower_still_has_what_the_patches_replace() -> None:
    flower_private.check()


def test_object_pulls_retry_in_fine_steps() -> None:
    import importlib

    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    flower_private.fast_object_pulls()
    flower_private.fast_object_pulls()  # idempotent: one wrapper, not two
    modules = [importlib.import_module(m) for m in flower_private._PULLERS]
    assert all(getattr(m.pull_objects, "_fedsynth_finer", False) for m in modules)
    assert not getattr(modules[0].pull_objects.__wrapped__, "_fedsynth_finer", False)

    calls = {"n": 0}

    def pull(object_id: str) -> bytes:  # unavailable for the first 3 tries, like a late push
        calls["n"] += 1
        if calls["n"] <= 3:
            raise ObjectUnavailableError(object_id)
        return b"content"

    t0 = time.monotonic()
    assert modules[0].pull_objects(["x"], pull_object_fn=pull) == {"x": b"content"}
    assert time.monotonic() - t0 < 0.5  # Flower's defaults would sleep 1 + 2 + 4 s


def test_capped_sleep_and_poll_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    shim = flower_private.capped_time(0.01)
    t0 = time.monotonic()
    shim.sleep(3)
    assert time.monotonic() - t0 < 0.5
    assert shim.monotonic() > 0  # the rest of ``time`` is there
    monkeypatch.setenv(flower_private.POLL_ENV, "0.5")
    assert flower_private.node_poll_interval() == 0.5
    for bad in ("fast", "0", "10"):
        monkeypatch.setenv(flower_private.POLL_ENV, bad)
        with pytest.raises(ValueError, match=flower_private.POLL_ENV):
            flower_private.node_poll_interval()


def test_hospital_executor_setting(tmp_path) -> None:
    from client.settings import DaemonSettings, SettingsError
    from fedsynth.deployment import executor_command, supernode_command

    (tmp_path / "data").mkdir()
    base = {"coordinator.address": "127.0.0.1:9", "coordinator.insecure": True,
            "hospital.data-dir": str(tmp_path / "data")}
    assert DaemonSettings.load(None, base).executor == "warm"
    # Flower's own ClientApp process imports the run bundle's code: refused (client/bundle.py)
    with pytest.raises(SettingsError, match="no longer offered"):
        DaemonSettings.load(None, {**base, "node.executor": "flower"})
    with pytest.raises(SettingsError, match="executor = 'fast' is not one of"):
        DaemonSettings.load(None, {**base, "node.executor": "fast"})
    warm = supernode_command("127.0.0.1:9", None, None, 9094, {})
    assert warm[1:5] == ["-m", "fedsynth.supernode", "--isolation", "process"]
    assert executor_command(9094, 42)[-4:] == ["--runtime-api-address", "127.0.0.1:9094",
                                               "--parent-pid", "42"]
    assert executor_command(9094, None, ["ab" * 32])[-2:] == ["--approved-app", "ab" * 32]


def test_every_private_flower_name_still_exists() -> None:
    """A Flower release that moved one of the non-public names fedsynth uses fails here first."""
    assert flower_private.check_names() == []
    assert flower_private.RuntimeHttpClient.__name__ == "RuntimeHttpClient"
