"""Signed global models: Ed25519 over the exact wire bytes; hospitals refuse anything else."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedsynth import protocol
from fedsynth.certs import init_federation
from fedsynth.signing import (SIGNATURE_KEY, SignatureError, load_private_key, load_public_key,
                              sign, verify)


def _record() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return protocol.to_record({"generator.w": rng.standard_normal((4, 3)).astype(np.float32),
                               "discriminator.b": rng.standard_normal(5).astype(np.float32)})


def _flip_one_byte(record: ArrayRecord, key: str, index: int = 7) -> ArrayRecord:
    """``record`` with one byte of tensor ``key`` flipped (or of the packed index, key "index")."""
    if key == "index":  # the JSON index that names and shapes the tensors
        packed = record[protocol.PACKED]
        data = bytearray(packed.data)
        data[150] ^= 0x01  # past the .npy header (128 B) and the 8-byte length: in the JSON
        return ArrayRecord(array_dict={protocol.PACKED: Array(
            dtype=packed.dtype, shape=tuple(packed.shape), stype=packed.stype, data=bytes(data))})
    arrays = {k: v.copy() for k, v in protocol.from_record(record).items()}
    arrays[key].reshape(-1).view(np.uint8)[index] ^= 0x01
    return protocol.to_record(arrays)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):
    return init_federation(tmp_path_factory.mktemp("keys"))


def test_signature_round_trip_and_files(keys) -> None:
    record = _record()
    signature = sign(record, load_private_key(keys.signing_key))
    verify(record, signature, load_public_key(keys.signing_pub))  # no exception
    assert len(signature) == 64


@pytest.mark.parametrize("key", ["generator.w", "discriminator.b", "index"])
def test_one_flipped_byte_fails(keys, key: str) -> None:
    record = _record()
    signature = sign(record, load_private_key(keys.signing_key))
    with pytest.raises(SignatureError, match="does not verify"):
        verify(_flip_one_byte(record, key), signature, load_public_key(keys.signing_pub))


def test_unsigned_renamed_and_foreign_key_fail(keys) -> None:
    record = _record()
    public = load_public_key(keys.signing_pub)
    with pytest.raises(SignatureError, match="not signed"):
        verify(record, None, public)
    signature = sign(record, load_private_key(keys.signing_key))
    renamed = ArrayRecord(array_dict={("x" + k): v for k, v in record.items()})
    with pytest.raises(SignatureError):
        verify(renamed, signature, public)
    with pytest.raises(SignatureError):
        verify(record, sign(record, Ed25519PrivateKey.generate()), public)


def test_unreadable_keys_name_the_file(tmp_path: Path, keys) -> None:
    bad = tmp_path / "garbage.key"
    bad.write_text("not a key")
    with pytest.raises(SignatureError, match="garbage.key"):
        load_private_key(bad)
    with pytest.raises(SignatureError, match="missing.pub"):
        load_public_key(tmp_path / "missing.pub")
    # a node (EC) key is not a model-signing key
    ec_pem = tmp_path / "ec.pub"
    from cryptography.hazmat.primitives.asymmetric import ec
    ec_pem.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(SignatureError, match="not an Ed25519"):
        load_public_key(ec_pem)


@pytest.fixture
def task_identity():
    """Flower needs a task identity to build a Message outside its processes (as its tests do)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None  # noqa: SLF001


def _train_message(record: ArrayRecord, signature: bytes | None) -> Message:
    from shared_models import ModelConfig, TrainConfig

    config: ConfigRecord = protocol.train_config(ModelConfig(image_size=32),
                                                 TrainConfig(local_steps=1, batch_size=4), 1)
    if signature is not None:
        config[SIGNATURE_KEY] = signature
    return Message(RecordDict({protocol.ARRAYS: record, protocol.CONFIG: config}),
                   dst_node_id=1, message_type="train")


@pytest.mark.parametrize("tamper", ["flipped-byte", "unsigned"])
def test_clientapp_refuses_tampered_global_model(keys, tmp_path: Path, task_identity, tamper: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The ClientApp's train handler refuses before loading, logs it, and sends only a reason."""
    import client.app as clientapp
    from shared_models import ModelConfig, encode, get_family

    nets = get_family("dcgan").build(ModelConfig(image_size=32))
    record = protocol.to_record(encode(nets))
    signature = sign(record, load_private_key(keys.signing_key))
    first = next(iter(encode(nets)))  # its first tensor
    msg = (_train_message(_flip_one_byte(record, first), signature) if tamper == "flipped-byte"
           else _train_message(record, None))
    data = tmp_path / "data"
    data.mkdir()
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"data-dir": str(data),
                                   "model-public-key": str(keys.signing_pub)})
    with caplog.at_level(logging.ERROR), pytest.raises(clientapp.HospitalError) as err:
        clientapp.train(msg, context)
    assert "REFUSED global model" in caplog.text
    assert str(data) not in str(err.value)  # the reply names no hospital path
    assert "SignatureError" in str(err.value)


def test_clientapp_accepts_signed_model_signature_check(keys, task_identity) -> None:
    """The intact, signed model passes the same check (so the refusal above is not blanket)."""
    from client.app import check_signature
    from client.settings import HospitalSettings
    from shared_models import ModelConfig, encode, get_family

    nets = get_family("dcgan").build(ModelConfig(image_size=32))
    record = protocol.to_record(encode(nets))
    msg = _train_message(record, sign(record, load_private_key(keys.signing_key)))
    check_signature(HospitalSettings(data_dir=Path("."), model_public_key=keys.signing_pub), msg)
