"""Flat hospital memory over many rounds (issue 25 item 10, BENCHMARKS.md "Hospital memory").

Measured in-process with tracemalloc (what Python allocates and keeps), not RSS, so the checks
hold on a busy machine."""

from __future__ import annotations

import gc
import sys
import tracemalloc

import pytest
import torch

from client import executor
from client.trainer import LocalTrainer
from shared_models import ModelConfig, TrainConfig
import shared_models.quality as quality


def _trainer() -> LocalTrainer:
    cfg = ModelConfig(family="dcgan", image_size=16, width=4, latent_dim=8)
    return LocalTrainer(cfg, torch.device("cpu"), amp="off")


def _images(n: int) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(n)) * 2 - 1


def test_the_evaluation_feature_net_is_built_once_per_trainer(monkeypatch) -> None:
    built = []
    real = quality.FeatureNet

    class Counting(real):  # type: ignore[misc, valid-type]
        def __init__(self, *a, **kw) -> None:
            built.append(1)
            super().__init__(*a, **kw)

    import client.trainer as trainer_mod
    monkeypatch.setattr(trainer_mod, "FeatureNet", Counting)
    t, holdout = _trainer(), {"image": _images(8)}
    first = t.evaluate(holdout, seed=0)
    for _ in range(3):
        again = t.evaluate(holdout, seed=0)
    assert len(built) == 1
    assert again["eval-frechet"] == pytest.approx(first["eval-frechet"])


def test_the_kth_round_keeps_nothing_new() -> None:
    """After warm-up, train + evaluate rounds keep (almost) no new Python memory: caches of the
    held-out features and the feature net are filled once, not per round."""
    t = _trainer()
    data, holdout = {"image": _images(16)}, {"image": _images(8)}
    train = TrainConfig(local_steps=2, batch_size=4)

    def one_round(seed: int) -> None:
        t.fit(data, train, seed=seed)
        t.evaluate(holdout, seed=seed)

    for s in range(3):  # warm-up: imports, radiomics extractor, cached held-out features
        one_round(s)
    gc.collect()
    tracemalloc.start()
    try:
        one_round(3)
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        for s in range(4, 14):
            one_round(s)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    # measured: ~70 KiB over 10 rounds (pyradiomics keeps a little per call): 200 rounds < 2 MB
    assert grown < 256 * 1024, f"10 rounds kept {grown / 1024:.1f} KiB"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_executor_caps_malloc_arenas_and_trims_after_a_task(monkeypatch) -> None:
    assert executor.limit_malloc_arenas(executor.MALLOC_ARENAS) is True
    assert executor.release_memory() is True
    calls = []
    monkeypatch.setattr(executor, "release_memory", lambda: calls.append(1) or True)

    class Boom(Exception):
        pass

    class Client:  # the Runtime API answers nothing: the task fails, and still trims
        @classmethod
        def from_server_address(cls, **kw):
            return cls()

        def close(self) -> None:
            pass

    import protocol.flower_private as fp
    monkeypatch.setattr(fp, "RuntimeHttpClient", Client)
    monkeypatch.setattr(fp, "pull_task_input", lambda c: (_ for _ in ()).throw(Boom()))
    monkeypatch.setattr(fp, "push_task_output", lambda **kw: None)
    monkeypatch.setattr(fp, "make_task_heartbeat_fn_http", lambda c: (lambda: True))
    result = executor.run_task("127.0.0.1:1", "token", 7)
    assert not result.ok and calls == [1]
