"""Secure aggregation on a real deployment (issue 26 item 1's test).

One coordinator (SuperLink behind the Fleet proxy, TLS + node auth) and three hospital daemons
(SuperNode + warm executor, ``client/executor.py``) on 127.0.0.1. The coordinator's ServerApp
records every reply it receives (``server/grid.py``'s test hook, ``FEDSYNTH_TEST_RECORD_REPLIES``).
Two one-round runs on the same federation, plain then ``secure-aggregation = true``: the node ids,
hence the hospitals' seeds, are the same in both, so each hospital trains exactly the same update
in both runs, and the plain run's replies tell the test what each hospital's update was.

A fourth hospital, ``strict``, sets ``require-secure-aggregation = true`` and holds no slices: it
refuses the plain run's train message (one log line, a failed hospital in the round). In the
secure run it shares its keys, then fails to train (no usable DICOM): a hospital dropping
mid-protocol, unmasked out of the sum, so that both aggregates are the same three hospitals'
mean.

- the secure aggregate equals the plain one within quantisation error;
- no reply of the secure run carries a hospital's update, its trained weights or anything within
  quantisation of them (no array at all; every numeric vector in its protocol records is
  uncorrelated with every update); the same check does find them in the plain run's replies.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.harness.deploy_helpers import (launch_toml, lifecycle_federation, metrics_rows, run, start,
                                          wait_for)
from protocol.flower_private import SECAGG_MASKED_ARRAYS

SITES = ("h1", "h2", "h3")
STRICT = "strict"  # require-secure-aggregation = true
RUN = dict(family="dcgan", rounds=1, local_steps=2, batch_size=4, image_size=32, width=8,
           min_hospitals=3, round_timeout=120.0)


def _records(path: Path) -> list[dict]:
    out = []
    with path.open("rb") as fh:
        while True:
            try:
                out.append(pickle.load(fh))
            except EOFError:
                return out


def _arrays(entry: dict) -> dict[str, np.ndarray]:
    """The arrays of a reply's fedsynth record (packed on the wire), by key."""
    from flwr.app import Array, ArrayRecord

    from protocol import records as protocol

    out: dict[str, np.ndarray] = {}
    for rec in entry["arrays"].values():
        if protocol.PACKED in rec:
            rec = protocol.from_record(ArrayRecord(
                {k: Array.from_numpy_ndarray(v) for k, v in rec.items()}))
        out.update(rec)
    return out


def _vectors(entry: dict) -> list[np.ndarray]:
    """Every numeric vector a reply carried: its arrays, and what its protocol records' bytes
    decode to as numpy arrays (the masked vector travels that way)."""
    from flwr.common import bytes_to_ndarray

    out = [np.asarray(a, np.float64).ravel() for a in _arrays(entry).values()]
    for rec in entry["configs"].values():
        for value in rec.values():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, bytes):
                    try:
                        arr = bytes_to_ndarray(item)
                    except Exception:  # noqa: BLE001 - keys, ciphertexts: not arrays
                        continue
                    if np.issubdtype(arr.dtype, np.number):
                        out.append(arr.astype(np.float64).ravel())
    return out


def _reveals(vector: np.ndarray, secret: np.ndarray) -> bool:
    """``vector`` holds ``secret`` (a hospital's update or weights), up to an affine encoding
    (clipping, scaling, quantisation): equal within quantisation, or correlated."""
    n = secret.size
    if n < 256 or vector.size < n:  # correlation of 256 random values: |r| > 0.5 is 8 sigma
        return False
    for start in range(0, vector.size - n + 1, n):  # the masked list is flat; keys are aligned
        part = vector[start:start + n]
        if np.allclose(part, secret, atol=1e-4):
            return True
        if part.std() > 0 and secret.std() > 0 and abs(np.corrcoef(part, secret)[0, 1]) > 0.5:
            return True
    return False


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_coordinator_receives_only_the_sum(tmp_path: Path) -> None:
    from server.run_folder import load_checkpoint
    from shared_models import ModelConfig, TrainConfig, encode, get_family

    keys, address, coord_args, _, tomls = lifecycle_federation(tmp_path, (*SITES, STRICT))
    empty = tmp_path / "no-slices"
    empty.mkdir()
    text = tomls[STRICT].read_text()
    start_, end = text.index('data-dir = "'), text.index('"\n', text.index('data-dir = "') + 12)
    tomls[STRICT].write_text(text[:start_] + f'data-dir = "{empty}' + text[end:]
                             + "require-secure-aggregation = true\n")  # [hospital] is last
    received = tmp_path / "received.pickle"
    coord = start("coordinator", coord_args, tmp_path,
                  env={"FEDSYNTH_TEST_RECORD_REPLIES": str(received)})
    hospitals = {n: start(n, ["hospital", str(tomls[n])], tmp_path) for n in tomls}
    procs = (coord, *hospitals.values())
    folders = {}
    try:
        wait_for("4 hospitals connected", lambda: all(
            "warm executor polling" in h.text() and "SuperNode ID" in h.text()
            for h in hospitals.values()), 240, procs)
        for run_id, secure in (("plain", False), ("secure", True)):
            launch = launch_toml(tmp_path / f"{run_id}.toml", address, keys.ca_cert,
                                 signing_key=keys.signing_key, run_dir=tmp_path / "runs",
                                 run_id=run_id, secure_aggregation=secure, **RUN)
            out = run(["launch", str(launch), "--flwr-home", str(tmp_path / "flwr")], tmp_path)
            assert out.returncode == 0, out.stderr[-3000:]
            folders[run_id] = tmp_path / "runs" / run_id
            wait_for(f"the {run_id} run's round",
                     lambda: len(metrics_rows(folders[run_id])) >= 1, 240, procs)
            rows = metrics_rows(folders[run_id])
            if not secure:  # the strict hospital refused it
                assert rows[0]["replied"] == 3, rows
                assert rows[0]["failed"] == 1 and list(rows[0]["failed_hospitals"]) == [STRICT], rows
                assert "REFUSED message (secure-aggregation)" in hospitals[STRICT].text()
            else:  # the strict one dropped out after sharing its keys
                assert rows[0]["replied"] == 3, rows
                assert rows[0]["failed_hospitals"] == {STRICT: "secure-aggregation"}, rows
    finally:
        for p in (coord, *hospitals.values()):
            p.stop()
    check_only_the_sum(folders, received)


def check_only_the_sum(folders: dict[str, Path], received: Path) -> None:
    from server.run_folder import load_checkpoint
    from shared_models import ModelConfig, TrainConfig, encode, get_family

    # the aggregate: equal within quantisation (2 x clip / 2**24 per hospital, x N / examples)
    plain, _ = load_checkpoint(folders["plain"] / "checkpoints" / "round-001.npz")
    secure, _ = load_checkpoint(folders["secure"] / "checkpoints" / "round-001.npz")
    assert set(plain) == set(secure)
    torch.manual_seed(TrainConfig().seed)  # the coordinator's initial model, as both runs built it
    initial = encode(get_family("dcgan").build(ModelConfig(image_size=32, width=8)))
    moved = 0
    for key, value in plain.items():
        if value.dtype.kind != "f":  # integer keys (num_batches_tracked) keep the global value
            assert np.array_equal(secure[key], initial[key]), key
            continue
        np.testing.assert_allclose(secure[key], value, atol=2e-4, err_msg=key)
        moved += int(value.dtype.kind == "f" and not np.array_equal(value, initial[key]))
    assert moved, "the round moved no weight: nothing was compared"

    # what reached the coordinator, by run (Flower's run ids: the plain run was launched first)
    entries = _records(received)
    runs = sorted({e["run"] for e in entries}, key=[e["run"] for e in entries].index)
    assert len(runs) == 2, runs
    by_run = {name: [e for e in entries if e["run"] == rid] for name, rid in zip(folders, runs)}
    train = [e for e in by_run["plain"] if e["type"].startswith("train") and not e["error"]]
    assert len(train) == 3  # the strict hospital's reply is an error
    secrets = []  # each hospital's update and trained weights, as its plain reply showed them
    for e in train:
        trained = _arrays(e)
        for key, value in trained.items():
            if value.dtype.kind == "f" and value.size >= 256:
                value = np.asarray(value, np.float64).ravel()
                secrets += [value, value - initial[key].astype(np.float64).ravel()]
    assert secrets
    # the check finds the trained weights where they are ...
    assert all(any(_reveals(v, s) for e in train for v in _vectors(e)) for s in secrets[0::2])
    # ... and nowhere in the secure run: no arrays but the masked vector, and no vector that
    # holds one
    secure_replies = by_run["secure"]
    # 4 stages x 4 hospitals, less the strict one's unmask (its masked vector was an error)
    assert len([e for e in secure_replies if e["type"].startswith("train")]) == 15
    # (the masked vector itself travels as chunked int64 arrays: protocol.flower_private)
    assert not any(len(rec) for e in secure_replies for name, rec in e["arrays"].items()
                   if name != SECAGG_MASKED_ARRAYS)
    masked = [v for e in secure_replies for v in _vectors(e)]
    assert masked, "no masked vector was found in the secure run's replies"
    for s in secrets:
        assert not any(_reveals(v, s) for v in masked)
