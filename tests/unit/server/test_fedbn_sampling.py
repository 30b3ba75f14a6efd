"""What the coordinator samples under FedBN (issue 12, item 5).

Under ``fedbn`` the hospitals keep their normalisation layers, so the global model's BatchNorm
running statistics are never aggregated and stay at their initial values. The coordinator's
samples (the per-round grids and ``fedsynth sample``) are then drawn with batch statistics
(``server.images.sample_images``): they differ from what the never-trained statistics give,
are finite and not constant; a model whose statistics were aggregated samples as before.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message, MessageType

from protocol import records as protocol
from fedsynth.cli import main
from fedsynth.generation import generate, load_generator
from fedsynth.demo_data import default_profiles, phantom_pair
from server.federation import FederationConfig, run_federation
from server.images import sample_images, untrained_norm_stats, with_batch_stats
from server.run_folder import RunFolder
from shared_models import ModelConfig, StepContext, TrainConfig, encode, get_family
from shared_models.codec import decode_into, norm_state_keys
from tests.harness.flower_helpers import task_identity
from tests.unit.server.test_strategy import FakeGrid

MODEL = ModelConfig(family="dcgan", image_size=16, latent_dim=8, width=8)
TRAIN = TrainConfig(local_steps=25, batch_size=8, lr_g=1e-3, lr_d=1e-3)


def _phantoms(n: int, gain: float, offset: float, seed: int) -> torch.Tensor:
    """Phantom T1w slices in [-1, 1], brightened/shifted per hospital (a scanner's own look)."""
    profile = default_profiles(1)[0]
    rng = np.random.default_rng(seed)
    x = np.stack([phantom_pair(profile, i % profile.slices, MODEL.image_size, rng)[0]
                  for i in range(n)])
    x = x / x.max() * 2 - 1
    return torch.from_numpy(np.clip(x * gain + offset, -1, 1)).float()[:, None]


class TrainingGrid(FakeGrid):
    """Hospitals that really train the family, keeping whatever they are not sent (their norm
    layers under FedBN), and send back what they were sent."""

    def __init__(self, data: dict[int, torch.Tensor]) -> None:
        super().__init__(list(data))
        self.family = get_family(MODEL.family)
        self.data = data
        torch.manual_seed(TRAIN.seed)
        initial = encode(self.family.build(MODEL))
        self.nets = {}
        self.opts = {}
        for node in data:
            nets = self.family.build(MODEL)
            decode_into(nets, initial)
            self.nets[node] = nets
            self.opts[node] = self.family.optimizers(nets, TRAIN)

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if msg.metadata.message_type != MessageType.TRAIN:
                out.append(Message(protocol.evaluate_reply({"eval-frechet": 1.0}), reply_to=msg))
                continue
            received = protocol.from_record(msg.content[protocol.ARRAYS])
            nets = self.nets[node]
            decode_into(nets, received)
            torch.manual_seed(node)
            for _ in range(TRAIN.local_steps):
                batch = self.family.draw({"image": self.data[node]}, TRAIN.batch_size)
                self.family.train_step(batch, nets, self.opts[node], StepContext())
            sent = {k: v for k, v in encode(nets).items() if k in received}
            n = len(self.data[node])
            metrics = {protocol.NUM_EXAMPLES: n, "loss-g": 1.0,
                       **{protocol.examples_key(c): n for c in self.family.components}}
            out.append(Message(protocol.train_reply(sent, metrics), reply_to=msg))
        return out


@pytest.fixture(scope="module")
def fedbn_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainingGrid]:
    tmp = tmp_path_factory.mktemp("fedbn")
    grid = TrainingGrid({1: _phantoms(32, 1.0, 0.0, 1), 2: _phantoms(32, 0.6, 0.3, 2)})
    cfg = FederationConfig(model=MODEL, train=TRAIN, preset="fedbn", rounds=3, run_dir=str(tmp),
                           run_id="fedbn", num_samples=16, evaluate_every=100)
    with task_identity():
        root = run_federation(grid, cfg)
    return root, grid


def _checkpoint(root: Path) -> Path:
    ckpt = RunFolder(root).latest_checkpoint()
    assert ckpt is not None
    return ckpt


def test_fedbn_global_norm_stats_are_the_initial_ones(fedbn_run: tuple[Path, TrainingGrid]
                                                      ) -> None:
    root, grid = fedbn_run
    family, nets, _ = load_generator(_checkpoint(root))
    assert untrained_norm_stats(nets, family.samplers)  # the premise: nothing aggregated them
    # ... while the shared weights did train, and so did each hospital's own statistics
    torch.manual_seed(TRAIN.seed)
    initial = encode(family.build(MODEL))
    trained = encode(nets)
    norm = norm_state_keys(nets)
    assert any(not np.array_equal(trained[k], initial[k]) for k in trained if k not in norm)
    assert all(np.array_equal(trained[k], initial[k]) for k in trained if k in norm)
    assert not untrained_norm_stats(grid.nets[1], family.samplers)


def test_fedbn_samples_use_batch_statistics(fedbn_run: tuple[Path, TrainingGrid],
                                            tmp_path: Path) -> None:
    root, grid = fedbn_run
    family, nets, meta = load_generator(_checkpoint(root))
    cfg = meta["_config"]
    auto = generate(family, nets, cfg, 16, 0)
    stored = generate(family, nets, cfg, 16, 0, norm_stats="stored")
    batch = generate(family, nets, cfg, 16, 0, norm_stats="batch")
    np.testing.assert_array_equal(auto, batch)
    assert np.abs(auto - stored).mean() > 0.05  # not what the untrained statistics give,
    assert stored.std(axis=0).mean() < 0.1 * auto.std(axis=0).mean()  # (nearly one grey image)
    assert np.isfinite(auto).all()
    assert auto.std(axis=(1, 2, 3)).min() > 0.05  # no constant image
    per_pixel_spread = auto.std(axis=0).mean()
    assert per_pixel_spread > 0.01  # and not one image sixteen times
    # closer to what a hospital's own model (its own norm layers) draws than the stored stats
    torch.manual_seed(0)
    noise = torch.randn(16, MODEL.latent_dim, generator=torch.Generator().manual_seed(0))
    local = family.sample(grid.nets[1], noise).numpy()
    assert np.abs(auto - local).mean() < np.abs(stored - local).mean()
    # a small --n still normalises over a full batch: its images are the first of the 16
    np.testing.assert_allclose(generate(family, nets, cfg, 1, 0), auto[:1], atol=1e-6)
    # the CLI writes the same
    assert main(["sample", str(_checkpoint(root)), "--n", "4", "--out", str(tmp_path / "o"),
                 "--format", "dicom"]) == 0
    import pydicom

    from fedsynth.export import from_stored

    first = pydicom.dcmread(sorted((tmp_path / "o").glob("*.dcm"))[0])
    np.testing.assert_allclose(from_stored(first.pixel_array), auto[0, 0], atol=1 / 2000)


def test_fedbn_round_grids_are_not_degenerate(fedbn_run: tuple[Path, TrainingGrid]) -> None:
    from PIL import Image

    root, _ = fedbn_run
    for rnd in (1, 3):
        pixels = np.asarray(Image.open(root / "samples" / f"round-{rnd:03d}.png"), np.float32)
        tiles = pixels[::2, ::2]  # the grid is upscaled twice (nearest)
        assert tiles.std() > 10
    import json

    rows = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert all(r["server"]["sample-diversity"] > 0.01 for r in rows)


def test_aggregated_statistics_are_used_as_stored(tmp_path: Path) -> None:
    family = get_family("dcgan")
    torch.manual_seed(0)
    nets = family.build(MODEL)
    noise = torch.randn(8, MODEL.latent_dim)
    assert untrained_norm_stats(nets, family.samplers)
    # one training step: the statistics have seen batches, like any aggregate of fedgan
    opts = family.optimizers(nets, TRAIN)
    family.train_step({"image": _phantoms(8, 1.0, 0.0, 0)}, nets, opts, StepContext())
    assert not untrained_norm_stats(nets, family.samplers)
    np.testing.assert_array_equal(sample_images(family, nets, noise).numpy(),
                                  family.sample(nets, noise).numpy())
    # batch statistics leave the nets' own statistics alone
    before = {k: v.clone() for k, v in nets["generator"].state_dict().items()}
    copy = with_batch_stats(nets, family.samplers)
    sample_images(family, nets, noise, norm_stats="batch")
    assert copy["generator"] is not nets["generator"] and copy["discriminator"] is nets[
        "discriminator"]
    for k, v in nets["generator"].state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="at least two"):
        sample_images(family, nets, noise[:1], norm_stats="batch")
    # translation generators have no BatchNorm running statistics: nothing changes for them
    cyc = get_family("cyclegan")
    cnets = cyc.build(ModelConfig(family="cyclegan", image_size=16, width=8))
    assert not untrained_norm_stats(cnets, cyc.samplers)
    # a stand-alone fedbn-style checkpoint through the CLI: --norm-stats stored is honoured
    ckpt = RunFolder(tmp_path / "run").save_checkpoint(
        1, encode(family.build(MODEL)), {"round": 1, "family": "dcgan", "model": asdict(MODEL)})
    for mode in ("auto", "stored"):
        assert main(["sample", str(ckpt), "--n", "2", "--out", str(tmp_path / mode),
                     "--norm-stats", mode]) == 0
    a, s = (np.asarray(__import__("PIL.Image").Image.open(tmp_path / m / "synthetic-0001.png"))
            for m in ("auto", "stored"))
    assert not np.array_equal(a, s)
