"""Signed coordinator messages: Ed25519 over arrays, config, message type and run; hospitals refuse
anything else, refuse replays, and never send what their own settings keep at home.

Trust review finding 4: an edited ``reply-components`` made a ``fedmed-gan`` hospital send its
private discriminator under a valid signature (only the arrays were signed); a round-1 model
replayed as a round-50 evaluate was accepted; unsigned models were accepted after a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from protocol import records as protocol
from fedsynth.certs import init_federation
from protocol.signing import (SIGNATURE_KEY, SignatureError, load_private_key, load_public_key,
                              sign, verify)

RUN = 4242


def _record() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return protocol.to_record({"generator.w": rng.standard_normal((4, 3)).astype(np.float32),
                               "discriminator.b": rng.standard_normal(5).astype(np.float32)})


def _config(**extra) -> ConfigRecord:
    return ConfigRecord({"server-round": 3, "train.lr_d": 2e-4, "reply-components": "generator",
                         **extra})


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


def _signed(keys, record, config, kind="train", run=RUN) -> ConfigRecord:
    config[SIGNATURE_KEY] = sign(load_private_key(keys.signing_key), record, config, kind, run)
    return config


def test_signature_round_trip_and_files(keys) -> None:
    record, config = _record(), _config()
    _signed(keys, record, config)
    verify(load_public_key(keys.signing_pub), record, config, "train", RUN)  # no exception
    assert len(config[SIGNATURE_KEY]) == 64


@pytest.mark.parametrize("key", ["generator.w", "discriminator.b", "index"])
def test_one_flipped_byte_fails(keys, key: str) -> None:
    record, config = _record(), _config()
    _signed(keys, record, config)
    with pytest.raises(SignatureError, match="does not verify"):
        verify(load_public_key(keys.signing_pub), _flip_one_byte(record, key), config, "train",
               RUN)


@pytest.mark.parametrize("edit", [
    ("reply-components", "generator,discriminator"),  # ask for the private D
    ("server-round", 50),  # replay an old round as a new one
    ("train.lr_d", 1.0),
    ("server-round", 3.0),  # same number, other type
    ("extra-key", "x"),  # an added entry
])
def test_every_config_entry_is_signed(keys, edit) -> None:
    record, config = _record(), _config()
    _signed(keys, record, config)
    config[edit[0]] = edit[1]
    with pytest.raises(SignatureError, match="does not verify"):
        verify(load_public_key(keys.signing_pub), record, config, "train", RUN)


def test_message_type_and_run_are_bound(keys) -> None:
    record, config = _record(), _config()
    _signed(keys, record, config, "train", RUN)
    public = load_public_key(keys.signing_pub)
    with pytest.raises(SignatureError):
        verify(public, record, config, "evaluate", RUN)  # a train message replayed as evaluate
    with pytest.raises(SignatureError):
        verify(public, record, config, "train", RUN + 1)  # replayed into another run
    removed = ConfigRecord({k: v for k, v in config.items() if k != "train.lr_d"})
    with pytest.raises(SignatureError):
        verify(public, record, removed, "train", RUN)  # an entry dropped


def test_unsigned_renamed_and_foreign_key_fail(keys) -> None:
    record = _record()
    public = load_public_key(keys.signing_pub)
    with pytest.raises(SignatureError, match="not signed"):
        verify(public, record, _config(), "train", RUN)
    config = _signed(keys, record, _config())
    renamed = ArrayRecord(array_dict={("x" + k): v for k, v in record.items()})
    with pytest.raises(SignatureError):
        verify(public, renamed, config, "train", RUN)
    foreign = _config()
    foreign[SIGNATURE_KEY] = sign(Ed25519PrivateKey.generate(), record, foreign, "train", RUN)
    with pytest.raises(SignatureError):
        verify(public, record, foreign, "train", RUN)


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


# ---------------------------------------------------------------- at the hospital (ClientApp)

@pytest.fixture
def task_identity():
    """Flower needs a task identity to build a Message outside its processes (as its tests do)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN, 1, 1
    yield
    TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None  # noqa: SLF001


def _message(keys, nets, server_round=1, kind="train", reply="generator,discriminator",
             sign_it=True, arrays_from=None) -> Message:
    from shared_models import ModelConfig, TrainConfig, encode

    record = protocol.to_record(encode(arrays_from or nets))
    config = protocol.train_config(ModelConfig(image_size=32),
                                   TrainConfig(local_steps=1, batch_size=4), server_round)
    config[protocol.REPLY_COMPONENTS] = reply
    if sign_it:
        _signed(keys, record, config, kind, RUN)
    return Message(RecordDict({protocol.ARRAYS: record, protocol.CONFIG: config}),
                   dst_node_id=1, message_type=kind)


def _context(data: Path, **settings) -> Context:
    return Context(run_id=RUN, node_id=1, state=RecordDict(), run_config={},
                   node_config={"data-dir": str(data), **settings})


@pytest.fixture(scope="module")
def nets():
    from shared_models import ModelConfig, get_family

    return get_family("dcgan").build(ModelConfig(image_size=32))


@pytest.mark.parametrize("tamper", ["flipped-byte", "unsigned", "edited-reply-components"])
def test_clientapp_refuses_tampered_message(keys, tmp_path: Path, task_identity, nets, tamper: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """The ClientApp's train handler refuses before loading, logs it, and sends only a reason."""
    import client.app as clientapp

    msg = _message(keys, nets, reply="generator", sign_it=tamper != "unsigned")
    if tamper == "flipped-byte":
        first = next(iter(protocol.from_record(msg.content[protocol.ARRAYS])))
        msg.content[protocol.ARRAYS] = _flip_one_byte(msg.content[protocol.ARRAYS], first)
    elif tamper == "edited-reply-components":  # fedmed-gan asked for G only; now it asks for D
        msg.content[protocol.CONFIG][protocol.REPLY_COMPONENTS] = "generator,discriminator"
    data = tmp_path / "data"
    data.mkdir()
    context = _context(data, **{"model-public-key": str(keys.signing_pub)})
    with caplog.at_level(logging.ERROR), pytest.raises(clientapp.HospitalError) as err:
        clientapp.train(msg, context)
    assert "REFUSED message (signature)" in caplog.text
    assert str(data) not in str(err.value)  # the reply names no hospital path
    assert "SignatureError" in str(err.value)


def test_hospital_without_pinned_key_refuses_unless_flagged(keys, tmp_path: Path, task_identity,
                                                            nets, caplog) -> None:
    """Unsigned messages used to be accepted after a start-up warning; now only with the flag."""
    from client.admission import check_signature
    from client.settings import HospitalSettings

    msg = _message(keys, nets, sign_it=False)
    with caplog.at_level(logging.ERROR), pytest.raises(SignatureError, match="no model-public-key"):
        check_signature(HospitalSettings(data_dir=tmp_path), msg)
    assert "REFUSED message (unsigned)" in caplog.text
    check_signature(HospitalSettings(data_dir=tmp_path, accept_unsigned_models=True), msg)


def test_replayed_rounds_are_refused(keys, tmp_path: Path, task_identity, nets) -> None:
    """A validly signed message acted on once is refused the second time, and so is an older
    round after a newer one; the evaluate of the same round is its own message type."""
    from client.admission import check_signature
    from client.settings import HospitalSettings

    hospital = HospitalSettings(data_dir=tmp_path, model_public_key=keys.signing_pub)
    context = _context(tmp_path)
    round1 = _message(keys, nets, 1)
    check_signature(hospital, round1, context)
    with pytest.raises(SignatureError, match="replayed"):
        check_signature(hospital, round1, context)  # the same message again
    check_signature(hospital, _message(keys, nets, 5), context)
    with pytest.raises(SignatureError, match="replayed"):
        check_signature(hospital, _message(keys, nets, 4), context)  # an older, signed round
    check_signature(hospital, _message(keys, nets, 5, kind="evaluate"), context)
    # a train message of round 1 cannot pass as a round-50 evaluate: the type is signed
    evil = _message(keys, nets, 1)
    evil.metadata.__dict__["_message_type"] = "evaluate"
    with pytest.raises(SignatureError, match="does not verify"):
        check_signature(hospital, evil, _context(tmp_path))


def test_never_send_wins_over_a_signed_request(keys, tmp_path: Path, task_identity, nets,
                                               demo_hospitals, caplog) -> None:
    """Even a validly signed message cannot make a hospital send what its settings keep home."""
    import client.app as clientapp

    msg = _message(keys, nets, reply="generator,discriminator")
    context = _context(demo_hospitals[0], **{"model-public-key": str(keys.signing_pub),
                                             "never-send": "discriminator,d_a,d_b"})
    with caplog.at_level(logging.ERROR), pytest.raises(clientapp.HospitalError,
                                                       match="PolicyRefused"):
        clientapp.train(msg, context)
    assert "never-send" in caplog.text and "discriminator" in caplog.text
    ok = _message(keys, nets, server_round=2, reply="generator")
    reply = clientapp.train(ok, context)
    sent = protocol.from_record(reply.content[protocol.ARRAYS])
    assert sent and all(k.startswith("generator.") for k in sent)


def test_replay_record_survives_a_restart(keys, tmp_path: Path, task_identity, nets) -> None:
    """Flower keeps context.state in the SuperNode's memory: with a cache folder the rounds acted
    on are kept on disk too, so a restarted hospital still refuses an old round."""
    from client.admission import check_signature
    from client.settings import HospitalSettings

    hospital = HospitalSettings(data_dir=tmp_path, cache_dir=tmp_path / "cache",
                                model_public_key=keys.signing_pub)
    check_signature(hospital, _message(keys, nets, 3), _context(tmp_path))
    fresh = _context(tmp_path)  # a restarted SuperNode: empty state
    with pytest.raises(SignatureError, match="replayed"):
        check_signature(hospital, _message(keys, nets, 3), fresh)
    check_signature(hospital, _message(keys, nets, 4), fresh)


def test_hospitals_sharing_a_cache_keep_their_own_replay_records(keys, tmp_path: Path,
                                                                 task_identity, nets) -> None:
    """Virtual hospitals over one folder share its cache: one's record must not refuse another's
    first message (it did: 100 virtual hospitals over 3 folders lost most of their rounds)."""
    from client.admission import check_signature
    from client.settings import HospitalSettings

    shared = tmp_path / "cache"
    first, second = (HospitalSettings(data_dir=tmp_path, cache_dir=shared, name=name,
                                      model_public_key=keys.signing_pub)
                     for name in ("virtual-1", "virtual-4"))
    check_signature(first, _message(keys, nets, 1), _context(tmp_path))
    check_signature(second, _message(keys, nets, 1), _context(tmp_path))
    with pytest.raises(SignatureError, match="replayed"):  # each still refuses its own replay
        check_signature(second, _message(keys, nets, 1), _context(tmp_path))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not-a-number", "a-list", "a-folder",
                                    "a-fifo", "empty"])
def test_a_corrupt_replay_record_refuses_never_accepts(keys, tmp_path: Path, task_identity, nets,
                                                       damage: str, caplog) -> None:
    """An unreadable record was read as empty, so after a restart an old round got through
    (issue 25, item 7): now every message of the run is refused until an operator removes it."""
    import os
    import stat

    from client.admission import check_signature
    from client.settings import HospitalSettings

    hospital = HospitalSettings(data_dir=tmp_path, cache_dir=tmp_path / "cache",
                                state_dir=tmp_path / "state", model_public_key=keys.signing_pub)
    check_signature(hospital, _message(keys, nets, 3), _context(tmp_path))
    record = hospital.run_state_path(RUN, "seen")
    assert (tmp_path / "state") in record.parents  # the state folder, not the cache
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert [p.name for p in record.parent.iterdir()] == [record.name]  # no temp file left
    text = record.read_text()
    if damage == "garbage":
        record.write_bytes(os.urandom(64))
    elif damage == "truncated":
        record.write_text(text[: len(text) // 2])
    elif damage == "not-a-number":
        record.write_text('{"train": "3"}')
    elif damage == "a-list":
        record.write_text("[3]")
    elif damage == "a-fifo":  # a plain read would block the ClientApp for ever
        record.unlink()
        os.mkfifo(record)
    elif damage == "empty":  # what a crash mid-write left before the write was atomic
        record.write_text("")
    else:
        record.unlink()
        record.mkdir()
    for context in (_context(tmp_path), _context(tmp_path)):  # a restart; and again
        with caplog.at_level(logging.ERROR), pytest.raises(SignatureError,
                                                           match="replay record") as info:
            check_signature(hospital, _message(keys, nets, 1), context)  # the old round
        assert str(record) in str(info.value) and "\n" not in str(info.value)
        with pytest.raises(SignatureError, match="replay record"):
            check_signature(hospital, _message(keys, nets, 9), context)  # and a new one
    assert "REFUSED message (replay-record)" in caplog.text
    # the operator removes it: the hospital rejoins (memory of this run starts anew)
    if record.is_dir() and not record.is_symlink():
        record.rmdir()
    else:
        record.unlink()
    check_signature(hospital, _message(keys, nets, 10), _context(tmp_path))


def test_a_replay_record_of_the_cache_still_counts_after_moving_to_the_state_folder(
        keys, tmp_path: Path, task_identity, nets) -> None:
    """Before the state folder, records were in the cache: an upgrade mid-run forgets none."""
    from client.admission import check_signature
    from client.settings import HospitalSettings

    before = HospitalSettings(data_dir=tmp_path, cache_dir=tmp_path / "cache",
                              model_public_key=keys.signing_pub)
    check_signature(before, _message(keys, nets, 6), _context(tmp_path))
    after = HospitalSettings(data_dir=tmp_path, cache_dir=tmp_path / "cache",
                             state_dir=tmp_path / "state", model_public_key=keys.signing_pub)
    with pytest.raises(SignatureError, match="replayed"):
        check_signature(after, _message(keys, nets, 5), _context(tmp_path))
    check_signature(after, _message(keys, nets, 7), _context(tmp_path))
    assert after.run_state_path(RUN, "seen").exists()
