"""The privacy ledger cannot be reset by losing a file (issue 25, item 7).

Deleting ``dp-ledger.json`` in the cache folder (systemd ``CacheDirectory=``, meant to be
disposable) gave a hospital 31 more runs, epsilon restarting at 2.71 after it was refused at 7.94
of 8. The ledger now lives in the state folder, is written atomically with fsync and a checksum,
and a marker tells a lost ledger from a first start: a missing or corrupt ledger refuses DP rounds
until an operator acts (``fedsynth ledger``).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from client.privacy import (LedgerUnusable, PrivacyBudgetExhausted, PrivacyRefused, charge,
                            ledger_status, plan_round)
from client.settings import HospitalSettings, SettingsError
from shared_models import TrainConfig, get_family

ROOT = Path(__file__).resolve().parents[3]
DATA = {"image": torch.zeros(64, 1, 16, 16)}
TRAIN = TrainConfig(dp_noise_multiplier=1.0, local_steps=5, batch_size=16)
FAMILY = get_family("dcgan")


def _context(run_id: int = 1) -> Context:
    return Context(run_id=run_id, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _hospital(tmp_path: Path, budget: float = 50.0, **kw) -> HospitalSettings:
    return HospitalSettings(data_dir=tmp_path, cache_dir=tmp_path / "cache",
                            state_dir=tmp_path / "state", dp_epsilon=budget, **kw)


def _train_round(hospital: HospitalSettings, context: Context | None = None,
                 server_round: int = 1) -> float:
    context = context or _context()
    plan = plan_round(hospital, context, FAMILY, TRAIN, DATA, server_round)
    return charge(hospital, context, plan, plan.releases, plan.sample_rate)


def test_first_start_works_and_writes_a_private_ledger_in_the_state_folder(tmp_path) -> None:
    hospital = _hospital(tmp_path)
    assert ledger_status(hospital).state == "first-start"
    eps = _train_round(hospital)
    assert eps > 0
    status = ledger_status(hospital)
    assert status.state == "ok" and status.ledger.releases > 0
    ledger = status.files.ledger
    assert tmp_path / "state" in ledger.parents  # the state folder, not the cache
    assert not list((tmp_path / "cache").rglob("dp-ledger.json"))
    assert stat.S_IMODE(ledger.stat().st_mode) == 0o600
    assert stat.S_IMODE(ledger.parent.stat().st_mode) == 0o700
    assert status.files.marker.exists() and status.files.cache_marker.exists()
    assert not [p for p in ledger.parent.iterdir() if p.name.startswith(".")]  # no temp file
    # a restarted daemon (a fresh context) goes on from what is on disk
    assert _train_round(hospital, _context(), 2) > eps


def test_deleting_the_ledger_after_spending_refuses_the_next_dp_round(tmp_path, caplog) -> None:
    hospital = _hospital(tmp_path)
    context = _context()
    _train_round(hospital, context)
    ledger = ledger_status(hospital).files.ledger
    ledger.unlink()
    for ctx in (_context(), context):  # a restarted daemon, and the same process still running
        with caplog.at_level(logging.ERROR), pytest.raises(LedgerUnusable) as info:
            plan_round(hospital, ctx, FAMILY, TRAIN, DATA, 2)
        message = str(info.value)
        assert "\n" not in message and str(ledger) in message and "missing" in message
        assert "fedsynth ledger reset --i-know" in message and "backup" in message
    assert isinstance(info.value, PrivacyRefused)  # the coordinator sees a privacy refusal
    assert "REFUSED round (dp-ledger)" in caplog.text
    # the whole state folder lost, the cache's marker still there: refused too
    for p in ledger.parent.iterdir():
        p.unlink()
    with pytest.raises(LedgerUnusable, match="missing"):
        plan_round(hospital, _context(), FAMILY, TRAIN, DATA, 2)


def test_losing_state_and_cache_while_running_refuses_too(tmp_path: Path) -> None:
    """Both folders emptied (no marker left anywhere) while the SuperNode still remembers a
    spend in ``context.state``: not a first start, refused."""
    import shutil

    hospital = _hospital(tmp_path)
    context = _context()
    _train_round(hospital, context)
    shutil.rmtree(tmp_path / "state")
    shutil.rmtree(tmp_path / "cache")
    assert ledger_status(hospital).state == "first-start"  # what the disk alone says
    with pytest.raises(LedgerUnusable, match="missing.*in this process"):
        plan_round(hospital, context, FAMILY, TRAIN, DATA, 2)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "edited", "a-folder",
                                    "a-fifo", "huge", "null-history"])
def test_a_corrupt_ledger_refuses(tmp_path: Path, damage: str) -> None:
    hospital = _hospital(tmp_path)
    _train_round(hospital)
    ledger = ledger_status(hospital).files.ledger
    text = ledger.read_text()
    if damage == "truncated":
        ledger.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        ledger.write_bytes(os.urandom(200))
    elif damage == "empty":
        ledger.write_text("")
    elif damage == "edited":  # valid JSON, history shortened by hand: the checksum says so
        doc = json.loads(text)
        doc["history"] = []
        ledger.write_text(json.dumps(doc))
    elif damage == "a-fifo":  # would block a plain read for ever
        ledger.unlink()
        os.mkfifo(ledger)
    elif damage == "huge":  # a ledger is a few kB: a planted giant is refused unread
        ledger.write_text(" " * (5 << 20) + text)
    elif damage == "null-history":  # its checksum recomputed to match: still not a ledger
        import hashlib

        doc = json.loads(text)
        doc["history"] = None
        doc["sha256"] = hashlib.sha256(b"null").hexdigest()
        ledger.write_text(json.dumps(doc))
    else:
        ledger.unlink()
        ledger.mkdir()
    with pytest.raises(LedgerUnusable, match="corrupt") as info:
        plan_round(hospital, _context(), FAMILY, TRAIN, DATA, 2)
    assert str(ledger) in str(info.value) and "\n" not in str(info.value)
    assert ledger_status(hospital).state == "corrupt"


def test_a_hospital_with_a_budget_needs_a_state_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    with pytest.raises(SettingsError, match="need a state-dir"):
        HospitalSettings.from_mapping({"data-dir": str(tmp_path), "dp-epsilon": 4.0,
                                       "cache-dir": str(tmp_path / "c")}).check_local()
    no_state = HospitalSettings(data_dir=tmp_path, cache_dir=tmp_path / "c", dp_epsilon=4.0)
    with pytest.raises(PrivacyRefused, match="no state-dir"):
        plan_round(no_state, _context(), FAMILY, TRAIN, DATA, 1)
    # systemd's StateDirectory= sets $STATE_DIRECTORY: that is the default state-dir
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "lib"))
    h = HospitalSettings.from_mapping({"data-dir": str(tmp_path), "dp-epsilon": 4.0})
    assert h.state_dir == tmp_path / "lib"
    h.check_local()
    assert h.to_node_config()["state-dir"] == str(tmp_path / "lib")  # handed to the SuperNode
    explicit = HospitalSettings.from_mapping({"data-dir": ".", "state-dir": "/srv/x"})
    assert explicit.state_dir == Path("/srv/x")


def test_the_unit_file_keeps_state_apart_from_the_cache() -> None:
    unit = (ROOT / "deploy" / "systemd" / "fedsynth-hospital.service").read_text()
    assert "StateDirectory=fedsynth" in unit and "CacheDirectory=fedsynth" in unit
    assert "StateDirectoryMode=0700" in unit
    toml = (ROOT / "deploy" / "docker" / "hospital.toml").read_text()
    assert 'state-dir = "/state"' in toml


def test_a_ledger_of_an_earlier_version_in_the_cache_is_carried_over(tmp_path: Path) -> None:
    hospital = _hospital(tmp_path)
    old = hospital.cache_state_path("dp-ledger")
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps([[1.0, 0.25, 400]]))  # Accountant.to_json of earlier versions
    status = ledger_status(hospital)
    assert status.state == "ok" and status.ledger.releases == 400
    _train_round(hospital)
    assert ledger_status(hospital).ledger.releases > 400 and not old.exists()


def test_the_write_is_atomic_and_flushed(tmp_path: Path, monkeypatch) -> None:
    import client.statefiles as statefiles

    hospital = _hospital(tmp_path)
    _train_round(hospital)
    ledger = ledger_status(hospital).files.ledger
    before = ledger.read_bytes()
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(statefiles.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    _train_round(hospital, _context(), 2)
    assert len(synced) >= 2  # the file and its folder
    monkeypatch.setattr(statefiles.os, "replace", lambda *a: (_ for _ in ()).throw(
        OSError(28, "No space left on device")))
    after = ledger.read_bytes()
    with pytest.raises(OSError):  # the round fails: the spend must be on record
        _train_round(hospital, _context(), 3)
    assert ledger.read_bytes() == after != before  # the last good ledger, whole
    assert not [p for p in ledger.parent.iterdir() if p.name.startswith(".")]


def test_operator_show_and_reset(tmp_path: Path, capsys, monkeypatch) -> None:
    from fedsynth.cli import main

    hospital = _hospital(tmp_path, name="north")
    _train_round(hospital)
    ledger = ledger_status(hospital).files.ledger
    args = ["--state-dir", str(tmp_path / "state"), "--cache-dir", str(tmp_path / "cache"),
            "--name", "north"]
    assert main(["ledger", "show", *args]) == 0
    assert "state: ok" in capsys.readouterr().out
    ledger.write_text("{")
    assert main(["ledger", "show", *args, "--json"]) == 1
    shown = json.loads(capsys.readouterr().out)
    assert shown["state"] == "corrupt" and shown["ledger"] == str(ledger)
    assert main(["ledger", "reset", *args]) == 2  # not without --i-know
    assert "--i-know" in capsys.readouterr().err
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)  # another user (root)
    assert main(["ledger", "reset", *args, "--i-know"]) == 2
    assert "run the reset as that user" in capsys.readouterr().err
    assert ledger.read_text() == "{"  # untouched
    monkeypatch.undo()
    with pytest.raises(LedgerUnusable):
        plan_round(hospital, _context(), FAMILY, TRAIN, DATA, 2)
    assert main(["ledger", "reset", *args, "--i-know"]) == 0
    kept = list(ledger.parent.glob("dp-ledger.json.reset-*"))
    assert len(kept) == 1 and kept[0].read_text() == "{"  # the evidence is kept
    resets = ledger.parent / "dp-ledger-resets.log"
    log = [json.loads(x) for x in resets.read_text().splitlines()]
    assert log[-1]["before"] == "corrupt"
    assert stat.S_IMODE(resets.stat().st_mode) == 0o600
    assert _train_round(hospital, _context(), 2) > 0  # DP rounds run again
    # the daemon's settings file, as an operator gives it (no [coordinator] needed here)
    toml = tmp_path / "hospital.toml"
    toml.write_text(f'[hospital]\nname = "north"\ndata-dir = "."\nstate-dir = "state"\n'
                    f'cache-dir = "cache"\ndp-epsilon = 50.0\n')
    capsys.readouterr()
    assert main(["ledger", "show", str(toml), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["ledger"] == str(ledger) and shown["state"] == "ok" and shown["budget"] == 50
    assert shown["releases"] > 0
    # a budget still holds after a reset
    tight = _hospital(tmp_path / "t", budget=0.01)
    with pytest.raises(PrivacyBudgetExhausted):
        plan_round(tight, _context(), FAMILY, TRAIN, DATA, 1)


def test_the_operator_docs_have_what_the_refusals_point_to() -> None:
    """Each refusal names a section of docs/hospital-it.md: it must be there, with the command."""
    from client.admission import _seen_on_disk  # noqa: F401 - the replay record's refusal lives there
    from client.privacy import FIX

    doc = (ROOT / "docs" / "hospital-it.md").read_text()
    for heading in ("### The privacy ledger", "### The replay record", "### The state folder"):
        assert heading in doc
    assert "'The privacy ledger'" in FIX and "fedsynth ledger reset" in doc
    assert "`dp-ledger`" in doc and "`replay-record`" in doc  # the refusal reasons
    security = (ROOT / "docs" / "security.md").read_text()
    section = security.split("### (c)")[1].split("### (d)")[0]
    assert "holds in memory" not in section and "state-dir" in section
