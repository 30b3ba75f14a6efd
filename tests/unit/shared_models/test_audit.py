"""Memorisation audit (shared_models.audit, ``fedsynth audit``): finds planted copies of training
slices, finds none among unseen real slices, and prints / writes only scalars."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from client.datasets import local_data
from client.settings import HospitalSettings
from fedsynth.demo_data import build_demo_hospitals
from shared_models import ModelConfig
from shared_models.audit import audit, table


@pytest.fixture(scope="module")
def hospital_slices(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    root = tmp_path_factory.mktemp("audit")
    (folder,) = build_demo_hospitals(root / "data", 1, matrix=32, include_real=False)
    settings = HospitalSettings(data_dir=folder, holdout_every=4)
    data = local_data(settings, ModelConfig(image_size=32))
    return folder, data.train, data.holdout


def test_a_planted_copy_is_found_and_unseen_real_slices_are_not_copies(hospital_slices) -> None:
    _, train, holdout = hospital_slices
    t, h = train["image"], holdout["image"]
    assert len(t) >= 20 and len(h) >= 8
    # the "generated" set: noisy blurs of held-out slices (not copies), plus one exact copy
    torch.manual_seed(0)
    fakes = (h[: len(h) // 2] + 0.05 * torch.randn_like(h[: len(h) // 2])).clamp(-1, 1)
    planted = 3
    generated = torch.cat([fakes[:planted], t[7:8], fakes[planted:]])
    reference = h[len(h) // 2:]
    result = audit(generated, t, reference)
    assert result.near_copies == 1 and result.near_copy_index == [planted]
    assert result.nearest_train[planted] == 7
    assert result.pixel.held_out_to_train_min > 0
    # held-out real slices as the "generated" set: none is a near-copy, distances balance
    clean = audit(h[: len(h) // 2], t, reference)
    assert clean.near_copies == 0 and clean.near_copy_share == 0.0
    assert 0.5 < clean.pixel.ratio < 2.0
    # a set of training slices is all copies, and its ratio shows it
    memorised = audit(t[:10], t, reference)
    assert memorised.near_copies == 10 and memorised.pixel.ratio < 0.01
    text = table(result)
    assert "near-copies: 1 of" in text and "pixel" in text and "feature" in text
    scalars = result.scalars()
    assert scalars["near-copies"] == 1 and all(isinstance(v, (int, float))
                                               for v in scalars.values())


def _checkpoint(root: Path, norm: str = "batch", **train: object) -> Path:
    from dataclasses import asdict

    from server.run_folder import RunFolder
    from shared_models import encode, get_family

    cfg = ModelConfig(family="dcgan", image_size=32, width=8, latent_dim=16, norm=norm)
    torch.manual_seed(0)
    nets = get_family("dcgan").build(cfg)
    folder = RunFolder(root)
    folder.write_config({"model": asdict(cfg), "train": dict(train), "preset": "fedgan",
                         "run_id": root.name})
    (root / "metrics.jsonl").write_text(
        json.dumps({"round": 2, "hospitals": {"1001": {"dp-epsilon": 2.5},
                                              "1002": {"dp-epsilon": 3.25}}}) + "\n"
        + json.dumps({"round": 5, "hospitals": {"1001": {"dp-epsilon": 9.0}}}) + "\n")
    return folder.save_checkpoint(3, encode(nets), {"round": 3, "family": "dcgan",
                                                    "model": asdict(cfg)})


def test_fedsynth_audit_prints_a_table_and_json(hospital_slices, tmp_path: Path, capsys) -> None:
    from fedsynth.cli import main

    folder, _, _ = hospital_slices
    ckpt = _checkpoint(tmp_path / "run")
    assert main(["audit", str(ckpt), str(folder), "--n", "8", "--holdout-every", "4"]) == 0
    out = capsys.readouterr().out
    assert "near-copies: 0 of 8" in out and "feature" in out
    assert main(["audit", str(ckpt), str(folder), "--n", "8", "--holdout-every", "4",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["generated"] == 8 and report["near-copies"] == 0 and report["round"] == 3
    assert str(folder) not in json.dumps(report)  # scalars only: no path, no slice index
    assert main(["audit", str(ckpt), str(tmp_path / "nowhere")]) == 2


def test_export_gate_refuses_a_planted_copy_and_records_privacy(
        hospital_slices, tmp_path: Path, capsys, monkeypatch) -> None:
    import shutil
    import subprocess

    import numpy as np
    import pydicom

    import fedsynth.commands.sample as sample
    from client.dicom import SYNTHETIC_PRIVATE_CREATOR
    from fedsynth.cli import main
    from fedsynth.export import from_stored

    folder, train, _ = hospital_slices
    # a DP run's checkpoint: group norm (shared_models.dp)
    ckpt = _checkpoint(tmp_path / "run", norm="group", dp_noise_multiplier=1.0,
                       dp_max_grad_norm=1.0)
    copy = train["image"][5].numpy()
    real_generate = sample.generate

    def planted(*args: object, **kwargs: object) -> np.ndarray:
        images = real_generate(*args, **kwargs)
        images[2] = copy  # the generator "memorised" training slice 5
        return images

    monkeypatch.setattr(sample, "generate", planted)
    out_dir = tmp_path / "out"
    assert main(["sample", str(ckpt), "--n", "6", "--out", str(out_dir), "--format", "dicom",
                 "--audit", str(folder), "--holdout-every", "4"]) == 0
    printed = capsys.readouterr().out
    assert "export gate: 1 near-copies of training slices refused" in printed
    files = sorted(out_dir.glob("*.dcm"))
    assert len(files) == 5
    for path in files:
        ds = pydicom.dcmread(path)
        pixels = from_stored(ds.pixel_array.astype(np.uint16))
        assert np.abs(pixels - copy[0]).max() > 0.05  # the copy was never written
        block = ds.private_block(0x0009, SYNTHETIC_PRIVATE_CREATOR)
        privacy = json.loads(block[0x06].value)
        assert privacy["dp-epsilon"] == 3.25  # the largest report up to round 3
        assert privacy["dp-noise-multiplier"] == 1.0
        assert privacy["audit"]["refused-near-copies"] == 1
        assert privacy["audit"]["near-copies"] == 1 and privacy["audit"]["generated"] == 6
    if shutil.which("dciodvfy"):
        proc = subprocess.run(["dciodvfy", str(files[0])], capture_output=True, text=True,
                              timeout=60)
        errors = [x for x in (proc.stdout + proc.stderr).splitlines() if x.startswith("Error")]
        assert proc.returncode == 0 and not errors, proc.stdout + proc.stderr


@pytest.mark.slow
def test_hospital_audits_after_chosen_rounds_and_sends_scalars_only_without_dp(
        tmp_path: Path, caplog) -> None:
    import logging

    from fedsynth.inprocess import run_inprocess
    from server.federation import FederationConfig
    from shared_models import TrainConfig

    (folder,) = build_demo_hospitals(tmp_path / "data", 1, matrix=32, include_real=False)
    hospital = {"data-dir": str(folder), "device": "cpu", "holdout-every": 4, "audit-every": 1}

    def run(run_id: str, dp: float) -> list[dict]:
        cfg = FederationConfig(model=ModelConfig(image_size=32, width=4, latent_dim=8),
                               train=TrainConfig(local_steps=1, batch_size=4,
                                                 dp_noise_multiplier=dp),
                               run_dir=str(tmp_path / "runs"), run_id=run_id, num_samples=2,
                               rounds=1)
        out, _ = run_inprocess(cfg, [hospital])
        return [next(iter(json.loads(x)["hospitals"].values()))
                for x in (out / "metrics.jsonl").read_text().splitlines()]

    caplog.set_level(logging.INFO)
    plain = run("plain", 0.0)
    assert 0 <= plain[0]["audit-near-copy-share"] <= 1 and plain[0]["audit-pixel-ratio"] > 0
    assert any("memorisation audit after round 1" in r.getMessage() for r in caplog.records)
    private = run("dp", 1.0)  # a DP run: the audit's scalars stay at the hospital
    assert not {"audit-near-copy-share", "audit-pixel-ratio"} & set(private[0])
    assert "dp-epsilon" in private[0]
    assert any("(kept here: DP run)" in r.getMessage() for r in caplog.records)
