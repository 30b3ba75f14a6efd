"""Audit of everything a hospital sends: model arrays and scalar metrics, nothing else.

The ClientApp is called exactly as Flower calls it, on a hospital folder whose DICOM files carry a
patient's name, ID and study attributes; every reply is inspected, bytes included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from flwr.app import MessageType, RecordDict

from client.app import app
from protocol import records as protocol
from shared_models import ModelConfig, TrainConfig, encode, get_family

from tests.harness.flower_helpers import client_context, server_message, task_identity

SECRETS = ("DOE^JANE", "PID-8812345", "ACC-77441", "Oncology Private Clinic")


@pytest.fixture()
def identified_hospital(tmp_path: Path, demo_hospitals: list[Path]) -> Path:
    """A copy of a demo hospital whose files name a (fictional) patient and institution."""
    folder = tmp_path / "Hospital_St_Elsewhere" / "patient_DOE_JANE"
    folder.mkdir(parents=True)
    for i, src in enumerate(sorted(demo_hospitals[0].rglob("*.dcm"))):
        ds = pydicom.dcmread(src)
        ds.PatientName, ds.PatientID = SECRETS[0], SECRETS[1]
        ds.AccessionNumber, ds.InstitutionName = SECRETS[2], SECRETS[3]
        ds.save_as(folder / f"{i:03d}.dcm")
    return folder


def _round_message(message_type: str = MessageType.TRAIN):
    model = ModelConfig(image_size=32)
    arrays = encode(get_family("dcgan").build(model))
    config = protocol.train_config(model, TrainConfig(local_steps=2, batch_size=4), 1)
    content = RecordDict({protocol.ARRAYS: protocol.to_record(arrays), protocol.CONFIG: config})
    return server_message(content, 7, message_type), arrays


def _wire_bytes(content: RecordDict) -> bytes:
    blobs = [arr.data for rec in content.array_records.values() for arr in rec.values()]
    blobs += [repr(dict(rec)).encode() for rec in content.metric_records.values()]
    blobs += [repr(dict(rec)).encode() for rec in content.config_records.values()]
    return b"".join(blobs)


def test_replies_hold_only_model_arrays_and_scalar_metrics(identified_hospital: Path,
                                                           tmp_path: Path) -> None:
    node = {"data-dir": str(identified_hospital), "cache-dir": str(tmp_path / "cache"),
            "accept-unsigned-models": True}
    with task_identity():
        msg, sent = _round_message()
        reply = app(msg, client_context(7, node))
        eval_msg, _ = _round_message(MessageType.EVALUATE)
        eval_reply = app(eval_msg, client_context(7, node))

    assert not reply.has_error() and not eval_reply.has_error()
    content = reply.content
    assert set(content.keys()) == {protocol.ARRAYS, protocol.METRICS}
    assert not content.config_records
    received = protocol.from_record(content.array_records[protocol.ARRAYS])
    assert set(received) == set(sent), "only the model's own arrays may leave"
    for key, array in received.items():
        assert array.shape == sent[key].shape and array.dtype == sent[key].dtype, key
    metrics = dict(content.metric_records[protocol.METRICS])
    allowed = set(protocol.TRAIN_METRICS)
    assert all(k in allowed or k.startswith("num-examples") for k in metrics), metrics
    assert all(isinstance(v, (int, float)) for v in metrics.values())

    eval_content = eval_reply.content
    assert set(eval_content.keys()) == {protocol.METRICS}
    assert set(dict(eval_content.metric_records[protocol.METRICS])) <= set(protocol.EVAL_METRICS)
    # the generation family's evaluation: exactly these scalars (a new one is added here on purpose)
    assert set(dict(eval_content.metric_records[protocol.METRICS])) == {
        "eval-d-real", "eval-d-fake", "eval-frechet", "eval-mmd", "eval-examples", "eval-seconds",
        "eval-frd", "eval-precision", "eval-recall", "eval-density", "eval-coverage"}
    assert all(isinstance(v, (int, float))
               for v in dict(eval_content.metric_records[protocol.METRICS]).values())

    blob = _wire_bytes(content) + _wire_bytes(eval_content)
    needles = [s.encode() for s in SECRETS] + [b"Hospital_St_Elsewhere", b"patient_DOE_JANE",
                                               str(tmp_path).encode()]
    for needle in needles:
        assert needle not in blob, f"{needle!r} left the hospital"


def test_no_pixel_array_leaves_even_shaped_like_an_image(identified_hospital: Path,
                                                         tmp_path: Path) -> None:
    """No reply array equals a local training slice (what a leak of pixels would look like)."""
    from client.cache import load_slices
    from client.dicom import DicomSettings

    node = {"data-dir": str(identified_hospital), "cache-dir": str(tmp_path / "cache"),
            "accept-unsigned-models": True}
    with task_identity():
        msg, _ = _round_message()
        reply = app(msg, client_context(7, node))
    slices = load_slices(identified_hospital, DicomSettings(image_size=32), tmp_path / "cache")
    flat_slices = slices.images.reshape(len(slices.images), -1)
    for key, array in protocol.from_record(reply.content[protocol.ARRAYS]).items():
        if array.size == flat_slices.shape[1]:
            assert not any(np.allclose(array.ravel(), s) for s in flat_slices), key


def test_local_failure_reaches_coordinator_without_path(tmp_path: Path) -> None:
    missing = tmp_path / "Hospital_St_Elsewhere" / "patient_DOE_JANE"
    with task_identity():
        msg, _ = _round_message()
        with pytest.raises(Exception) as info:
            app(msg, client_context(7, {"data-dir": str(missing), "accept-unsigned-models": True}))
    text = f"{type(info.value)}:<'{info.value}'>"  # what Flower puts in the error reply
    assert "HospitalError" in text
    assert "Hospital_St_Elsewhere" not in text and "DOE" not in text and str(tmp_path) not in text
