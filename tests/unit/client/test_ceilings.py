"""Issue 25 item 5, as the attacker tried it: one signed message asking for a huge model, a huge
(DP) batch, a billion steps or a round without end. Each is refused at the hospital in one line,
counted, before anything is built; the run goes on without that hospital's round."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, MessageType, RecordDict
from prometheus_client import CollectorRegistry

import client.metrics as hm
from client.app import app
from client.ceilings import parameter_count
from client.settings import HospitalSettings, SettingsError
from client.trainer import LocalTrainer
from protocol import records as protocol
from shared_models import ModelConfig, TrainConfig, encode, get_family

from tests.harness.flower_helpers import server_message, task_identity

SMALL = ModelConfig(image_size=16, width=4, latent_dim=8)


def _message(model: ModelConfig, train: TrainConfig, server_round: int,
             arrays: dict | None = None):
    if arrays is None:
        arrays = encode(get_family(model.family).build(model))
    content = RecordDict({protocol.ARRAYS: protocol.to_record(arrays),
                          protocol.CONFIG: protocol.train_config(model, train, server_round)})
    return server_message(content, 7, MessageType.TRAIN)


def _context(folder: Path, cache: Path, **more) -> Context:
    node = {"data-dir": str(folder), "cache-dir": str(cache), "accept-unsigned-models": True,
            "name": "north", "device": "cpu", "threads": 1, **more}
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})


@pytest.fixture()
def refusals():  # noqa: ANN201
    registry = CollectorRegistry()
    saved, hm._SERIES = hm._SERIES, hm._Series(registry)
    yield lambda reason: registry.get_sample_value(
        "fedsynth_hospital_refused_messages_total", {"hospital": "north", "reason": reason})
    hm._SERIES = saved


def test_huge_model_batch_and_steps_are_refused_before_anything_is_built(
        demo_hospitals: list[Path], tmp_path: Path, monkeypatch, caplog, refusals) -> None:
    built = []
    real_init = LocalTrainer.__init__
    monkeypatch.setattr(LocalTrainer, "__init__",
                        lambda self, *a, **k: built.append(1) or real_init(self, *a, **k))
    context = _context(demo_hospitals[0], tmp_path / "c")
    huge = ModelConfig(image_size=32, width=1024)
    assert parameter_count(huge) > 300_000_000  # 8.6 GB peak when it was built
    tiny_arrays = {"generator.none": np.zeros(1, "float32")}  # a few bytes ask for it all
    cases = [(huge, TrainConfig(local_steps=2, batch_size=4), "ceiling-parameters"),
             (SMALL, TrainConfig(local_steps=2, batch_size=100_000, dp_noise_multiplier=1.0),
              "ceiling-batch"),
             (SMALL, TrainConfig(local_steps=10**9, batch_size=4), "ceiling-steps")]
    with task_identity():
        for rnd, (model, train, reason) in enumerate(cases, 1):
            caplog.clear()
            t0 = time.perf_counter()
            with pytest.raises(Exception, match="past the hospital's ceilings"):
                app(_message(model, train, rnd, tiny_arrays), context)
            assert time.perf_counter() - t0 < 5
            assert refusals(reason) == 1
            lines = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(lines) == 1 and f"REFUSED message ({reason})" in lines[0].getMessage()
            assert not lines[0].exc_info
        assert not built  # nothing was built for any of them
        # a message within the ceilings trains as before
        reply = app(_message(SMALL, TrainConfig(local_steps=2, batch_size=4), 9), context)
        assert not reply.has_error() and built


def test_a_round_past_its_seconds_stops_and_sends_nothing(demo_hospitals: list[Path],
                                                          tmp_path: Path, refusals) -> None:
    context = _context(demo_hospitals[0], tmp_path / "c", **{"max-round-seconds": 0.5})
    with task_identity():
        t0 = time.perf_counter()
        with pytest.raises(Exception, match="past the hospital's ceilings"):
            app(_message(SMALL, TrainConfig(local_steps=5000, batch_size=4), 1), context)
        assert time.perf_counter() - t0 < 5
    assert refusals("ceiling-seconds") == 1


def test_work_past_the_memory_ceiling_is_refused_before_anything_is_built(
        demo_hospitals: list[Path], tmp_path: Path, monkeypatch, caplog, refusals) -> None:
    """Within every other ceiling: DCGAN at 256 px, width 64 (92 M parameters), batch 256."""
    from client.ceilings import memory_floor_mb

    built = []
    real_init = LocalTrainer.__init__
    monkeypatch.setattr(LocalTrainer, "__init__",
                        lambda self, *a, **k: built.append(1) or real_init(self, *a, **k))
    context = _context(demo_hospitals[0], tmp_path / "c", **{"max-memory-mb": 2000})
    big = ModelConfig(image_size=256, width=64)
    train = TrainConfig(local_steps=2, batch_size=256)
    n = parameter_count(big)
    defaults = HospitalSettings.from_mapping({"data-dir": "."})
    assert n < defaults.max_parameters and train.batch_size <= defaults.max_batch
    need = memory_floor_mb(big, train, n, True)
    assert 2000 < need < defaults.max_memory_mb  # refused here, allowed at the default
    with task_identity():
        t0 = time.perf_counter()
        with pytest.raises(Exception, match="past the hospital's ceilings"):
            app(_message(big, train, 1, {"generator.none": np.zeros(1, "float32")}), context)
        assert time.perf_counter() - t0 < 5
    assert refusals("ceiling-memory") == 1 and not built
    lines = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and "REFUSED message (ceiling-memory)" in lines[0].getMessage()
    assert "max-memory-mb = 2000" in lines[0].getMessage()


def test_a_round_whose_process_grows_past_the_memory_ceiling_stops_and_sends_nothing(
        demo_hospitals: list[Path], tmp_path: Path, caplog, refusals) -> None:
    from client.ceilings import resident_mb

    limit = 64  # this test's process, with torch loaded, holds more: the first step stops
    assert resident_mb() > limit
    context = _context(demo_hospitals[0], tmp_path / "c", **{"max-memory-mb": limit})
    with task_identity():
        with pytest.raises(Exception, match="past the hospital's ceilings"):
            app(_message(SMALL, TrainConfig(local_steps=5000, batch_size=4), 1), context)
    assert refusals("ceiling-memory") == 1
    lines = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and "after 0 steps" in lines[0].getMessage(), lines
    # the same message trains at the default
    context = _context(demo_hospitals[0], tmp_path / "d")
    with task_identity():
        reply = app(_message(SMALL, TrainConfig(local_steps=2, batch_size=4), 2), context)
    assert not reply.has_error()


def test_ceiling_settings() -> None:
    h = HospitalSettings.from_mapping({"data-dir": ".", "max-parameters": 10, "max-batch": 2,
                                       "max-steps": 3, "max-round-seconds": 1.5,
                                       "max-memory-mb": 512})
    assert (h.max_parameters, h.max_batch, h.max_steps, h.max_round_seconds,
            h.max_memory_mb) == (10, 2, 3, 1.5, 512.0)
    assert HospitalSettings.from_mapping(h.to_node_config()) == h
    d = HospitalSettings.from_mapping({"data-dir": "."})
    assert (d.max_parameters, d.max_batch, d.max_steps, d.max_round_seconds,
            d.max_memory_mb) == (100_000_000, 256, 5000, 3600.0, 8192.0)
    for key, bad in (("max-batch", 0), ("max-steps", -1), ("max-parameters", 1.5),
                     ("max-round-seconds", 0), ("max-memory-mb", 0), ("max-memory-mb", "x")):
        with pytest.raises(SettingsError, match=key):
            HospitalSettings.from_mapping({"data-dir": ".", key: bad})


def test_the_run_goes_on_without_a_hospital_past_its_ceiling(tmp_path: Path) -> None:
    from fedsynth.demo_data import build_demo_hospitals
    from fedsynth.inprocess import run_inprocess
    from server.federation import FederationConfig

    folders = build_demo_hospitals(tmp_path / "data", 2, matrix=16, include_real=False)
    hospitals = [{"data-dir": str(f), "cache-dir": str(tmp_path / "cache" / f.name),
                  "device": "cpu", "holdout-every": 4, "threads": 1} for f in folders]
    hospitals[1].update({"name": "small", "max-steps": 1})
    cfg = FederationConfig(model=ModelConfig(family="pix2pix", image_size=16, width=4),
                           train=TrainConfig(local_steps=2, batch_size=2),
                           run_dir=str(tmp_path / "runs"), run_id="ceil", num_samples=2,
                           rounds=2)
    folder, _ = run_inprocess(cfg, hospitals)
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert (r["replied"], r["failed"]) == (1, 1)
        assert r["failed_hospitals"] == {"small": "ceiling"}  # the kind of refusal
