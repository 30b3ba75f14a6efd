"""``fedsynth evaluate CHECKPOINT DATA_DIR``: a hospital scores a checkpoint on its own lesion
slices (FRD, PRDC, TSTR, augmentation gain), as a table or JSON, without any network use."""

from __future__ import annotations

import json
import math
import socket
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

pytest.importorskip("phantominator")

from fedsynth.cli import main  # noqa: E402
from fedsynth.lesion_data import (  # noqa: E402
    CLASSES, LESION_SITES, RUN_DATA_SETTINGS, build_lesion_hospitals)
from server.run_folder import RunFolder  # noqa: E402
from shared_models import ModelConfig, encode, get_family  # noqa: E402


def _checkpoint(root: Path, family: str, data: dict | None, **model: object) -> Path:
    cfg = ModelConfig(family=family, image_size=32, width=8, latent_dim=16, **model)
    torch.manual_seed(0)
    nets = get_family(family).build(cfg)
    folder = RunFolder(root)
    folder.write_config({"model": asdict(cfg), "data": data or {}, "preset": "fedgan",
                         "run_id": root.name})
    return folder.save_checkpoint(2, encode(nets), {"round": 2, "family": family,
                                                    "model": asdict(cfg)})


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaluate")
    return build_lesion_hospitals(root / "data", matrix=32, scale=0.5, sites=LESION_SITES[:1])[0]


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the command."""
    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("fedsynth evaluate opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "sendto", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_conditional_checkpoint_scored_on_own_labels(site: Path, tmp_path: Path, offline: None,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path / "run", "cdcgan", RUN_DATA_SETTINGS, num_classes=3)
    assert main(["evaluate", str(ckpt), str(site), "--json", "--classifier-steps", "15",
                 "--n", "30"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["family"] == "cdcgan" and out["classes"] == list(CLASSES)
    assert out["generated"] == 30 and out["held_out"] >= 2
    assert sum(out["held_out_by_class"]) == out["held_out"]
    assert out["frd"] is not None and out["frd"] > 0  # an untrained generator is far from real
    for key in ("precision", "recall", "density", "coverage", "real-bacc", "augmented-bacc",
                "tstr-bacc"):
        assert out[key] is None or 0.0 <= out[key] <= (10.0 if key == "density" else 1.0), key
    assert math.isclose(out["augmentation-gain"], out["augmented-bacc"] - out["real-bacc"])
    assert str(site) not in json.dumps(out)  # the result names no local path

    assert main(["evaluate", str(ckpt), str(site), "--classifier-steps", "5", "--n", "9"]) == 0
    table = capsys.readouterr().out
    assert "Fréchet Radiomics Distance" in table and "TSTR" in table and "augmentation gain" in table


def test_unconditional_checkpoint_has_no_utility_rows(site: Path, tmp_path: Path, offline: None,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path / "run", "dcgan", None)
    assert main(["evaluate", str(ckpt), str(site), "--json", "--n", "12"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "tstr-bacc" not in out and "frd" in out and out["generated"] == 12


def test_problems_are_one_line_errors(site: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    pix = _checkpoint(tmp_path / "pix", "pix2pix", None)
    assert main(["evaluate", str(pix), str(site)]) == 2
    assert "translation model" in capsys.readouterr().err
    wrong = _checkpoint(tmp_path / "wrong", "cdcgan", {"classes": "a,b,c"}, num_classes=3)
    assert main(["evaluate", str(wrong), str(site)]) == 2  # no slice matches classes a, b, c
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no slice matches" in err
