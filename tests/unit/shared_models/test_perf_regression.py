"""Performance regressions that a fast test can catch: wire bytes above the floor, host syncs.

A host sync inside the training step (``loss.item()``, ``float(loss)``, ``if loss > x``, printing a
tensor, ``.cpu()``) stalls a GPU once per step; the counters below patch ``torch.Tensor`` so that
every such call made from fedsynth's own code is recorded with where it came from. Calls made
inside torch itself (e.g. Adam reading its CPU step counter) are not device syncs and are ignored.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from bench import wire
from client.trainer import LocalTrainer
from shared_models import ModelConfig, StepContext, TrainConfig, encode, families, get_family
from shared_models.codec import nbytes

REPO = Path(__file__).resolve().parents[3]
PROJECT_DIRS = tuple(str(REPO / d) + "/"
                     for d in ("shared_models", "client", "server", "fedsynth", "tests"))
SCALAR_SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__format__", "__repr__")
COPY_SYNCS = ("cpu", "numpy")


@dataclass
class SyncLog:
    """Events in order: ("sync", method, "file:line") and ("step-begin"/"step-end", "", "")."""

    events: list[tuple[str, str, str]] = field(default_factory=list)

    def syncs(self, lo: int = 0, hi: int | None = None) -> list[tuple[str, str, str]]:
        return [e for e in self.events[lo:hi] if e[0] == "sync"]


@contextlib.contextmanager
def count_syncs() -> Iterator[SyncLog]:
    log = SyncLog()
    originals = {name: getattr(torch.Tensor, name) for name in SCALAR_SYNCS + COPY_SYNCS}

    def wrap(name: str, original):  # noqa: ANN001, ANN202
        def patched(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            caller = sys._getframe(1)
            where = caller.f_code.co_filename
            if where.startswith(PROJECT_DIRS):
                log.events.append(("sync", name, f"{where}:{caller.f_lineno}"))
            return original(self, *args, **kwargs)

        return patched

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield log
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class _MarkSteps:
    """Delegates to a family and marks where each ``train_step`` begins and ends."""

    def __init__(self, family, log: SyncLog) -> None:  # noqa: ANN001
        self._family, self._log = family, log

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._family, name)

    def train_step(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        self._log.events.append(("step-begin", "", ""))
        out = self._family.train_step(*args, **kwargs)
        self._log.events.append(("step-end", "", ""))
        return out


def _tiny(family_name: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A small model of ``family_name`` and 8 examples of every batch key it trains on."""
    family = get_family(family_name)
    layout = getattr(family, "data_layout", "")
    classes = {"labelled": 3, "masked": 2}.get(layout, 0)
    model = ModelConfig(family=family_name, image_size=32, width=8, num_classes=classes)
    gen = torch.Generator().manual_seed(0)
    data: dict[str, torch.Tensor] = {}
    for key in family.batch_keys:
        if key == "label":
            data[key] = torch.randint(max(classes, 1), (8,), generator=gen)
        elif key == "mask":  # K label channels in {0, 1}
            data[key] = (torch.rand(8, classes, 32, 32, generator=gen) > 0.8).float()
        else:
            data[key] = torch.rand(8, 1, 32, 32, generator=gen) * 2 - 1
    return model, data


def _step_syncs(family_name: str, steps: int = 2) -> list[tuple[str, str, str]]:
    family = get_family(family_name)
    model, data = _tiny(family_name)
    torch.manual_seed(0)
    nets = family.build(model)
    opts = family.optimizers(nets, TrainConfig())
    ctx = StepContext()
    with count_syncs() as log:
        for _ in range(steps):
            family.train_step(family.draw(data, 4), nets, opts, ctx)
    return log.syncs()


@pytest.mark.parametrize("family_name", families())
def test_train_step_has_no_host_sync(family_name: str) -> None:
    """Every registered family: its draw and train_step never read a tensor back to Python."""
    assert _step_syncs(family_name) == []


def test_sync_counter_sees_a_sync_in_a_step() -> None:
    """The counter is not vacuous: a step that logs its loss as a float is caught, with its line."""
    family = get_family("dcgan")
    model, data = _tiny("dcgan")
    nets = family.build(model)
    opts = family.optimizers(nets, TrainConfig())
    with count_syncs() as log:
        out = family.train_step(family.draw(data, 4), nets, opts, StepContext())
        _ = f"{out['loss-g']:.3f}"  # what a per-step log line would do
        _ = out["loss-d"].item()
    names = [e[1] for e in log.syncs()]
    assert names == ["__format__", "item"]
    assert all("test_perf_regression.py" in e[2] for e in log.syncs())


def test_fit_syncs_once_at_the_end() -> None:
    """LocalTrainer.fit: nothing read back during or between steps; one scalar sync after them
    (the loss means); copies to the host only to export the weights."""
    model, data = _tiny("dcgan")
    trainer = LocalTrainer(model, torch.device("cpu"), amp="off")
    log = SyncLog()
    trainer.family = _MarkSteps(trainer.family, log)
    with count_syncs() as counted:
        counted.events = log.events  # one ordered stream with the step marks
        trainer.fit(data, TrainConfig(local_steps=3, batch_size=4), seed=1)
    kinds = [e[0] for e in log.events]
    assert kinds.count("step-begin") == 3
    first = kinds.index("step-begin")
    last = len(kinds) - 1 - kinds[::-1].index("step-end")
    assert log.syncs(first, last + 1) == [], "host sync inside or between training steps"
    after = log.syncs(last + 1)
    scalar = [e for e in after if e[1] in SCALAR_SYNCS]
    assert len(scalar) == 1 and scalar[0][2].startswith(str(REPO / "client" / "trainer.py"))
    copies = [e for e in after if e[1] in COPY_SYNCS]
    assert all(e[2].startswith(str(REPO / "shared_models" / "codec.py")) for e in copies)
    assert log.syncs(0, first) == [], "host sync before the first step"


class _MarkedContext(StepContext):
    """A StepContext that marks where each ``step`` (backward + optimiser step) begins and ends."""

    def __init__(self, ctx: StepContext, log: SyncLog) -> None:
        super().__init__(device=ctx.device, amp_dtype=ctx.amp_dtype, scaler=ctx.scaler,
                         prox_mu=ctx.prox_mu, anchor=ctx.anchor)
        self._log = log

    def step(self, loss: torch.Tensor, *optimizers: torch.optim.Optimizer) -> None:
        self._log.events.append(("step-begin", "", ""))
        super().step(loss, *optimizers)
        self._log.events.append(("step-end", "", ""))


@pytest.mark.parametrize("family_name", ["dcgan", "cdcgan"])
def test_ua_round_syncs_once_per_round(family_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hospital's UA-GAN discriminator round (``client.ua_gan.ua_discriminator_round`` through
    ``LocalTrainer.ua_round``): its steps go through the trainer's StepContext, nothing is read
    back before, during or between them, and after them ONE copy to the host brings the logits,
    input gradients and step means together (a ``.cpu()`` and the ``.numpy()`` of that host
    copy, on one line of client/trainer.py): one host sync per round, not per step."""
    from client.ua_gan import UA_BETAS, ua_discriminator_round
    from shared_models.family import adam

    model, data = _tiny(family_name)
    trainer = LocalTrainer(model, torch.device("cpu"), amp="off")
    log = SyncLog()
    contexts = trainer._context
    monkeypatch.setattr(trainer, "_context", lambda *a: _MarkedContext(contexts(*a), log))
    torch.manual_seed(0)
    d = trainer.prepare(get_family(family_name).build(model)["discriminator"])
    opt = adam(d.parameters(), 2e-4, UA_BETAS)
    fakes = torch.rand(5, 1, 32, 32) * 2 - 1
    labels = data.get("label")
    fake_labels = labels[:5] if labels is not None else None
    with count_syncs() as counted:
        counted.events = log.events
        logits, grads, metrics = ua_discriminator_round(
            d, opt, data["image"], fakes, steps=3, batch_size=4, real_labels=labels,
            fake_labels=fake_labels, seed=123, trainer=trainer)
    kinds = [e[0] for e in log.events]
    assert kinds.count("step-begin") == 3
    last = len(kinds) - 1 - kinds[::-1].index("step-end")
    assert log.syncs(0, last + 1) == [], "host sync before, inside or between UA steps"
    after = log.syncs(last + 1)
    assert [e[1] for e in after] == ["cpu", "numpy"], after
    assert len({e[2] for e in after}) == 1
    assert after[0][2].startswith(str(REPO / "client" / "trainer.py"))
    assert logits.shape == (5,) and grads.shape == fakes.shape
    assert set(metrics) == {"loss-d", "d-real", "d-fake"}
    assert all(0.0 < metrics[k] < 1.0 for k in ("d-real", "d-fake")) and metrics["loss-d"] > 0


def test_ua_round_matches_the_plain_loop() -> None:
    """The trainer's UA round is the same arithmetic as the plain loop it replaced (fp32 on the
    CPU): same secret-seeded draws (real then fake indices per step), same Adam, same logits,
    input gradients and step means."""
    from torch.nn.functional import binary_cross_entropy_with_logits as bce

    from client.ua_gan import UA_BETAS, ua_discriminator_round

    model, data = _tiny("dcgan")
    trainer = LocalTrainer(model, torch.device("cpu"), amp="off")
    real, fakes = data["image"], torch.rand(6, 1, 32, 32) * 2 - 1
    torch.manual_seed(0)
    d = get_family("dcgan").build(model)["discriminator"]
    ref = get_family("dcgan").build(model)["discriminator"]
    ref.load_state_dict(d.state_dict())
    opt, ref_opt = (torch.optim.Adam(n.parameters(), 2e-4, UA_BETAS) for n in (d, ref))
    logits, grads, metrics = ua_discriminator_round(d, opt, real, fakes, steps=3, batch_size=4,
                                                    seed=99, trainer=trainer)
    gen = torch.Generator().manual_seed(99)
    sums = [0.0, 0.0, 0.0]
    for _ in range(3):
        ri, fi = torch.randint(8, (4,), generator=gen), torch.randint(6, (4,), generator=gen)
        out_r, out_f = ref(real[ri]), ref(fakes[fi])
        loss = bce(out_r, torch.ones_like(out_r)) + bce(out_f, torch.zeros_like(out_f))
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        for i, v in enumerate((loss, torch.sigmoid(out_r).mean(), torch.sigmoid(out_f).mean())):
            sums[i] += float(v.detach())
    ref.eval()
    x = fakes.clone().requires_grad_(True)
    ref_logits = ref(x)
    (ref_grads,) = torch.autograd.grad(ref_logits.sum(), x)
    torch.testing.assert_close(torch.from_numpy(logits), ref_logits.detach())
    torch.testing.assert_close(torch.from_numpy(grads), ref_grads)
    for k, v in zip(("loss-d", "d-real", "d-fake"), sums):
        assert metrics[k] == pytest.approx(v / 3, rel=1e-5)


def _dcgan32_messages(wire_dtype: str):  # noqa: ANN202
    model = ModelConfig(image_size=32)  # the default DCGAN-32, width 32: ~2.7 MB of fp32
    return wire.train_messages(model, TrainConfig(wire_dtype=wire_dtype))


def test_fp32_messages_stay_at_the_floor() -> None:
    """Serialized train message and reply (every gRPC message a hospital's link carries for
    them) are at most 5 % above the raw fp32 bytes of the shared weights."""
    down, up, payload = _dcgan32_messages("float32")
    arrays = wire.protocol.from_record(up.content[wire.protocol.ARRAYS])
    assert nbytes(arrays) == payload
    for msg, direction in ((down, "down"), (up, "up")):
        size = wire.message_bytes(msg, direction)
        assert payload <= size <= 1.05 * payload, (direction, size, payload)


def test_fp16_reply_halves_the_payload() -> None:
    _, up, payload = _dcgan32_messages("float16")
    size = wire.message_bytes(up, "up")
    assert 0.5 * payload <= size <= 0.55 * payload, (size, payload)


def test_wire_measure_counts_every_array() -> None:
    """The measure misses nothing: random arrays (no two alike, so Flower's content-hash
    de-duplication cannot drop any) measure at least their raw bytes, plus little framing."""
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {f"generator.w{i}": rng.standard_normal(size, dtype=np.float32)
              for i, size in enumerate((10, 1000, 100_000, 2_000_000))}  # one spans 2 chunks
    msg = wire._message(wire.RecordDict({wire.protocol.ARRAYS: wire.protocol.to_record(arrays)}),
                        src=wire.SERVER_NODE, dst=wire.HOSPITAL_NODE)
    for direction in ("down", "up"):
        size = wire.message_bytes(msg, direction)
        assert nbytes(arrays) < size < nbytes(arrays) * 1.01 + 4096, (direction, size)


def test_benchmarks_section_is_replaced_in_place() -> None:
    from bench.run_all import replace_section

    text = "# Benchmarks\n\n## Quality\nq\n\n## Performance\nold\n\n## Zeta\nz\n"
    out = replace_section(text, "## Performance\n\nnew table\n")
    assert out == "# Benchmarks\n\n## Quality\nq\n\n## Performance\n\nnew table\n\n## Zeta\nz\n"
    assert replace_section("# B\n", "## Performance\nx\n") == "# B\n\n## Performance\nx\n"


def test_process_tree_memory_includes_children() -> None:
    import os
    import subprocess

    from bench.scale import process_tree, tree_memory

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in process_tree(os.getpid())
        alone_pss, alone_rss = tree_memory(child.pid)
        tree_pss, tree_rss = tree_memory(os.getpid())
        assert 0 < alone_rss < tree_rss and 0 < alone_pss < tree_pss
    finally:
        child.kill()
        child.wait()


def test_gpu_bench_path_runs_on_cpu(monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``bench/gpu.sh --device cpu --quick`` runs this code: figures come out as name: value."""
    from bench import gpu

    tiny = [gpu.Case("dcgan32", ModelConfig(image_size=32, width=8),
                     TrainConfig(local_steps=1, batch_size=4), 1, 8)]
    monkeypatch.setattr(gpu, "cases", lambda quick: tiny)
    figures = dict(gpu.run(torch.device("cpu"), quick=True))
    assert set(figures) == {"gpu_dcgan32_fp32_trainer_images_per_s",
                            "gpu_dcgan32_fp32_bare_images_per_s",
                            "gpu_dcgan32_fp32_trainer_vs_bare"}
    assert all(v > 0 for v in figures.values())
    out = capsys.readouterr().out
    assert "gpu_dcgan32_fp32_trainer_vs_bare: " in out
    assert "mixed precision: skipped (CUDA only)" in out
    assert "max-weight-diff 0.00e+00" in out  # same arithmetic on both sides

    # what gpu.sh printed renders into BENCHMARKS.md's GPU table, figure for figure
    from bench import gpu_record

    log = tmp_path / "gpu.log"
    log.write_text("# 2026-01-01T00:00:00Z host nproc=2\n# device: cpu\n" + out)
    body = gpu_record.render([gpu_record.parse(log)])
    row = f"| dcgan32 | fp32 | {figures['gpu_dcgan32_fp32_trainer_images_per_s']:.1f} | "
    assert row in body
    assert f"{figures['gpu_dcgan32_fp32_trainer_vs_bare']:.3f}" in body


def test_benchmarks_gpu_section_matches_its_logs(tmp_path: Path) -> None:
    """The GPU table in BENCHMARKS.md is the committed logs rendered, not figures typed in."""
    from bench import gpu_record

    logs = sorted((REPO / "bench" / "results").glob("gpu-*.log"))
    assert logs, "no bench/results/gpu-*.log"
    section = gpu_record.render([gpu_record.parse(p) for p in logs])
    text = (REPO / "BENCHMARKS.md").read_text()
    for line in section.splitlines():
        if line.startswith("| ") and "---" not in line:
            assert line in text, f"BENCHMARKS.md lacks {line!r}; run python -m bench.gpu_record"


def test_gpu_record_refuses_a_log_without_figures(tmp_path: Path) -> None:
    from bench import gpu_record

    bad = tmp_path / "x.log"
    bad.write_text("Traceback: CUDA error\n")
    with pytest.raises(ValueError, match="x.log: no 'name: value' figures"):
        gpu_record.parse(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPU")
def test_gpu_sh_says_why_without_a_gpu() -> None:
    import subprocess

    res = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--device", "cuda"],
                         capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHON": sys.executable})
    assert res.returncode == 2
    assert "no CUDA GPU" in res.stderr
    assert "nproc=" in res.stdout
