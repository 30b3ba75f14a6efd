"""The mask-conditioned family (shared_models/maskgan.py): label map -> image in 2D and 3D, the
lesion-aware weighting, every policy preset in a federation of hospitals holding DICOM SEGs, and
`fedsynth sample` drawing images for a folder's masks."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from fedsynth.cli import main
from fedsynth.demo_data import build_demo_hospitals
from fedsynth.inprocess import run_inprocess
from server.federation import FederationConfig
from server.presets import POLICY_PRESETS, make_strategy
from shared_models import DataConfig, ModelConfig, StepContext, TrainConfig, get_family
from shared_models.maskgan import one_hot, pixel_weights
from tests.harness import seg_helpers as h
from tests.harness.report_checks import assert_report_scores


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _batch(cfg: ModelConfig, n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (n, cfg.num_classes) + (cfg.image_size,) * cfg.spatial_dims
    mask = (torch.rand(shape, generator=g) > 0.8).float()
    image = mask.amax(1, keepdim=True) * 1.6 - 0.8  # the image follows its mask
    return {"mask": mask, "image": image}


@pytest.mark.parametrize("dims,size", [(2, 32), (3, 16)])
def test_shapes_and_a_step_trains_both_components(dims: int, size: int) -> None:
    fam = get_family("maskgan")
    assert fam.components == ("generator", "discriminator") and fam.data_layout == "masked"
    cfg = ModelConfig(family="maskgan", image_size=size, width=4, spatial_dims=dims, num_classes=2)
    nets = fam.build(cfg)
    batch = _batch(cfg)
    assert fam.sample(nets, batch["mask"]).shape == (4, 1) + (size,) * dims
    before = {c: copy.deepcopy(n.state_dict()) for c, n in nets.items()}
    opts = fam.optimizers(nets, TrainConfig())
    out = fam.train_step(batch, nets, opts, StepContext(lesion_weight=5.0))
    assert all(torch.isfinite(v) for v in out.values())
    for c, net in nets.items():
        assert any(not torch.equal(before[c][k], v) for k, v in net.state_dict().items()), c


def test_one_hot_has_a_background_channel() -> None:
    m = torch.zeros(1, 2, 4, 4)
    m[0, 0, 0, 0] = m[0, 1, 1, 1] = 1
    oh = one_hot(m)
    assert oh.shape == (1, 3, 4, 4) and torch.equal(oh.sum(1), torch.ones(1, 4, 4))
    assert oh[0, 0, 0, 0] == 0 and oh[0, 0, 2, 2] == 1


def test_lesion_weight_moves_the_l1_term_to_the_mask() -> None:
    """Weighted L1 = sum(w |err|) / sum(w): with an error only inside the mask, a heavier lesion
    weight raises the L1 loss; with an empty mask the weighting changes nothing."""
    fam = get_family("maskgan")
    cfg = ModelConfig(family="maskgan", image_size=16, width=4, num_classes=1)
    torch.manual_seed(0)
    nets = fam.build(cfg)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:8, 4:8] = 1
    with torch.no_grad():
        fake = fam.sample(nets, mask)
    image = fake.clone()
    image[:, :, 4:8, 4:8] += 0.5  # the generator is wrong only inside the lesion

    def l1(weight: float, m: torch.Tensor) -> float:
        n = copy.deepcopy(nets)
        for net in n.values():
            net.eval()  # the same forward as sample's (instance norm: no running stats)
        opts = {c: torch.optim.SGD(v.parameters(), lr=0.0) for c, v in n.items()}
        return float(fam.train_step({"mask": m, "image": image}, n, opts,
                                    StepContext(lesion_weight=weight))["loss-l1"])

    plain, heavy = l1(1.0, mask), l1(10.0, mask)
    inside = 0.5 * 16 / 256  # mean |err|: 16 of 256 pixels off by 0.5
    assert plain == pytest.approx(inside, rel=1e-3)
    w = pixel_weights(mask, 10.0)
    assert heavy == pytest.approx(float((w * (image - fake).abs()).mean() / w.mean()), rel=1e-3)
    assert heavy > 4 * plain
    empty = torch.zeros_like(mask)
    assert l1(10.0, empty) == pytest.approx(l1(1.0, empty), rel=1e-5)


def test_policy_presets_handle_its_components_and_ua_gan_refuses_it() -> None:
    family = get_family("maskgan")
    for preset in POLICY_PRESETS:
        assert make_strategy(preset, family) is not None
    with pytest.raises(ValueError, match="ua-gan"):
        make_strategy("ua-gan", family, model=ModelConfig(family="maskgan"), train=TrainConfig())


def test_run_config_counts_the_mask_labels() -> None:
    cfg = FederationConfig(model=ModelConfig(family="maskgan"),
                           data=DataConfig(mask_labels="liver,lesion"))
    assert cfg.model.num_classes == 2


@pytest.fixture(scope="module")
def masked_hospitals(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("masked")
    folders = build_demo_hospitals(root / "data", 2, matrix=16, include_real=False)
    for f in folders:
        assert h.add_phantom_segs(f)
    return folders


@pytest.mark.parametrize("preset", sorted(POLICY_PRESETS))
def test_a_federated_round_under_every_policy_preset(masked_hospitals: list[Path], preset: str,
                                                     tmp_path: Path) -> None:
    hospitals = [{"data-dir": str(f), "cache-dir": str(tmp_path / "cache" / f.name),
                  "device": "cpu", "holdout-every": 4} for f in masked_hospitals]
    cfg = FederationConfig(model=ModelConfig(family="maskgan", image_size=16, width=4),
                           train=TrainConfig(local_steps=1, batch_size=2, lesion_weight=3.0),
                           data=DataConfig(mask_labels="lesion"), preset=preset,
                           run_dir=str(tmp_path / "runs"), run_id=f"mask-{preset}",
                           num_samples=2, rounds=1)
    folder, _ = run_inprocess(cfg, hospitals)
    (row,) = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert (row["replied"], row["failed"], row["rejected"]) == (2, 0, 0), row
    assert row["train"]["num-examples"] > 0
    evaluated = list(row["evaluated"].values())
    assert evaluated and all(np.isfinite(e["eval-ssim"]) for e in evaluated), row["evaluated"]
    assert (folder / "checkpoints" / "round-001.npz").is_file()


def test_sample_draws_images_for_a_folders_masks(masked_hospitals: list[Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    hospitals = [{"data-dir": str(f), "cache-dir": str(tmp_path / "cache" / f.name),
                  "device": "cpu", "holdout-every": 4} for f in masked_hospitals]
    cfg = FederationConfig(model=ModelConfig(family="maskgan", image_size=16, width=4),
                           train=TrainConfig(local_steps=1, batch_size=2),
                           run_dir=str(tmp_path / "runs"), run_id="mask-sample", num_samples=2,
                           rounds=1)
    folder, _ = run_inprocess(cfg, hospitals)
    ckpt = folder / "checkpoints" / "round-001.npz"
    assert main(["sample", str(ckpt), "--n", "3", "--out", str(tmp_path / "png"),
                 "--input", str(masked_hospitals[0])]) == 0
    assert len(list((tmp_path / "png").glob("mask-synthetic-*.png"))) == 3
    # `fedsynth audit`: the images drawn for the held-out masks vs the hospital's images
    capsys.readouterr()
    assert main(["audit", str(ckpt), str(masked_hospitals[0]), "--n", "4",
                 "--holdout-every", "4"]) == 0
    out = capsys.readouterr().out
    assert "memorisation audit of round-001.npz (maskgan, round 1)" in out, out
    assert re.search(r"generated [1-4] · training \d+ · held-out [1-9]\d* slices", out), out
    assert "pixel" in out and "near-cop" in out, out
    assert main(["sample", str(ckpt), "--n", "2", "--out", str(tmp_path / "dcm"),
                 "--format", "dicom", "--input", str(masked_hospitals[0])]) == 0
    files = sorted((tmp_path / "dcm").rglob("*.dcm"))
    segs = [f for f in files if f.name.endswith("-seg.dcm")]
    assert len(files) == 4 and len(segs) == 2  # each synthetic image with its mask's SEG
    for seg_path in segs:
        seg = pydicom.dcmread(seg_path)
        image = pydicom.dcmread(seg_path.with_name(seg_path.name.replace("-seg", "")))
        assert seg.Modality == "SEG" and image.Rows == 16
        ref = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
        assert ref.ReferencedSOPInstanceUID == image.SOPInstanceUID
        # the mask is the input folder's real segmentation: the SEG must not call it synthetic
        assert seg.ContentLabel == "REALMASK" and "REAL" in seg.ContentDescription
    capsys.readouterr()
    # the export gate does not audit mask-conditioned exports: refused, nothing written
    assert main(["sample", str(ckpt), "--n", "2", "--out", str(tmp_path / "gated"),
                 "--format", "dicom", "--input", str(masked_hospitals[0]),
                 "--audit", str(masked_hospitals[0])]) == 2
    assert "--audit" in capsys.readouterr().err and not (tmp_path / "gated").exists()
    assert main(["sample", str(ckpt), "--n", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--input" in capsys.readouterr().err


# ----------------------------------------------------------------------------- aae, two-stage


@pytest.mark.parametrize("dims,size", [(2, 32), (3, 16)])
def test_aae_step_trains_its_three_components(dims: int, size: int) -> None:
    fam = get_family("aae")
    assert fam.components == ("encoder", "decoder", "latent_discriminator")
    cfg = ModelConfig(family="aae", image_size=size, width=4, latent_dim=8, spatial_dims=dims,
                      num_classes=2)
    nets = fam.build(cfg)
    before = {c: copy.deepcopy(n.state_dict()) for c, n in nets.items()}
    opts = fam.optimizers(nets, TrainConfig())
    out = fam.train_step({"mask": _batch(cfg)["mask"]}, nets, opts, StepContext())
    assert all(torch.isfinite(v) for v in out.values())
    for c, net in nets.items():
        assert any(not torch.equal(before[c][k], v) for k, v in net.state_dict().items()), c
    masks = fam.sample(nets, torch.randn(3, 8))
    assert masks.shape == (3, 2) + (size,) * dims
    assert set(masks.unique().tolist()) <= {0.0, 1.0}


def test_aae_learns_to_reconstruct_masks() -> None:
    """A few hundred steps on discs: the held-out reconstruction error falls well below that
    of the untrained autoencoder."""
    torch.manual_seed(0)
    fam = get_family("aae")
    cfg = ModelConfig(family="aae", image_size=16, width=8, latent_dim=8, num_classes=1)
    masks = get_family("maskgan").grid_inputs(
        ModelConfig(family="maskgan", image_size=16, num_classes=1), 64)
    nets = fam.build(cfg)
    opts = fam.optimizers(nets, TrainConfig(lr_g=1e-3, lr_d=2e-4))
    hold = {"mask": masks[:16]}
    start = fam.evaluate_holdout(nets, hold, torch.device("cpu"))["eval-mae"]
    for _ in range(150):
        fam.train_step(fam.draw({"mask": masks[16:]}, 16), nets, opts, StepContext())
    end = fam.evaluate_holdout(nets, hold, torch.device("cpu"))["eval-mae"]
    print(f"aae held-out mask MAE: untrained {start:.3f}, after 150 steps {end:.3f}")
    assert end < 0.5 * start


def test_two_stage_sampling_draws_a_mask_then_its_image(masked_hospitals: list[Path],
                                                        tmp_path: Path) -> None:
    """`fedsynth sample AAE --stage2 MASKGAN`: masks from the federated AAE, their images from
    the federated maskgan; stages that do not fit are refused by name."""
    hospitals = [{"data-dir": str(f), "cache-dir": str(tmp_path / "cache" / f.name),
                  "device": "cpu", "holdout-every": 4} for f in masked_hospitals]
    ckpts = {}
    for family in ("aae", "maskgan"):
        cfg = FederationConfig(model=ModelConfig(family=family, image_size=16, width=4,
                                                 latent_dim=8),
                               train=TrainConfig(local_steps=1, batch_size=2), preset="local-d",
                               run_dir=str(tmp_path / "runs"), run_id=f"two-{family}",
                               num_samples=2, rounds=1)
        folder, _ = run_inprocess(cfg, hospitals)
        (row,) = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        assert (row["replied"], row["failed"]) == (2, 0), row
        titles = assert_report_scores(folder)
        # maskgan: G(mask) against the held-out image; aae: its held-out masks' reconstruction
        assert any(t.startswith("SSIM" if family == "maskgan" else "Mask reconstruction")
                   for t in titles), titles
        ckpts[family] = folder / "checkpoints" / "round-001.npz"
    assert main(["sample", str(ckpts["aae"]), "--n", "3", "--out", str(tmp_path / "m")]) == 0
    assert len(list((tmp_path / "m").glob("mask-*.png"))) == 3
    assert main(["sample", str(ckpts["aae"]), "--stage2", str(ckpts["maskgan"]), "--n", "3",
                 "--out", str(tmp_path / "two")]) == 0
    assert len(list((tmp_path / "two").glob("two-stage-*.png"))) == 3
    assert main(["sample", str(ckpts["aae"]), "--stage2", str(ckpts["maskgan"]), "--n", "2",
                 "--format", "dicom", "--out", str(tmp_path / "two-dcm")]) == 0
    assert sorted(p.name for p in (tmp_path / "two-dcm").glob("*.dcm")) == [
        "two-stage-0001-seg.dcm", "two-stage-0001.dcm", "two-stage-0002-seg.dcm",
        "two-stage-0002.dcm"]
    assert main(["sample", str(ckpts["maskgan"]), "--stage2", str(ckpts["aae"]), "--n", "1",
                 "--out", str(tmp_path / "bad"), "--input", str(masked_hospitals[0])]) == 2
    assert main(["sample", str(ckpts["aae"]), "--stage2", str(ckpts["aae"]), "--n", "1",
                 "--out", str(tmp_path / "bad")]) == 2
