"""Signed coordinator messages: the coordinator signs, every hospital verifies before acting.

What is signed is everything a hospital acts on, bound to where it belongs: the message type
(``train``, ``evaluate``, ``train.ua_gan``), the Flower run id, and every entry of the config
record but the signature itself (family, reply components, learning rates, steps, seed, round, ...)
and, for each array in key order, its key and serialised bytes as Flower carries them. One flipped
bit, an edited ``reply-components``, a message replayed into another run or as another type fails
verification. The round number is part of the config, so a replay of an old round is recognised by
its (signed) round: the hospital refuses rounds it has already acted on (``client.app``).

Ed25519 from ``cryptography`` over a SHA-512 digest with length-prefixed, type-tagged fields (no
field can be shifted into its neighbour).
"""

from __future__ import annotations

import hashlib
import math
import struct
from pathlib import Path
from typing import Any, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from flwr.app import ArrayRecord

SIGNATURE_KEY = "model-signature"  # ConfigRecord entry carrying the signature bytes
DOMAIN = b"fedsynth-message-v2"  # a signature of this scheme means nothing to any other


class SignatureError(ValueError):
    """The message is unsigned, tampered with, replayed, or signed by another key."""


def _field(h: "hashlib._Hash", tag: bytes, data: bytes) -> None:
    h.update(tag + len(data).to_bytes(8, "big") + data)


def _value(h: "hashlib._Hash", value: Any) -> None:
    """One config value, tagged with its type (so 1, 1.0, True and "1" differ)."""
    if isinstance(value, bool):
        _field(h, b"b", b"\1" if value else b"\0")
    elif isinstance(value, int):
        _field(h, b"i", str(value).encode())
    elif isinstance(value, float):
        _field(h, b"f", struct.pack(">d", value) if not math.isnan(value) else b"nan")
    elif isinstance(value, str):
        _field(h, b"s", value.encode())
    elif isinstance(value, bytes):
        _field(h, b"y", value)
    elif isinstance(value, (list, tuple)):
        _field(h, b"l", len(value).to_bytes(8, "big"))
        for item in value:
            _value(h, item)
    else:
        raise SignatureError(f"config value of type {type(value).__name__} cannot be signed")


def digest(arrays: ArrayRecord | None, config: Mapping[str, Any] | None = None,
           message_type: str = "", run_id: int = 0) -> bytes:
    """SHA-512 over domain, message type, run id, config (minus the signature) and arrays."""
    h = hashlib.sha512()
    _field(h, b"D", DOMAIN)
    _field(h, b"T", message_type.encode())
    _field(h, b"R", str(int(run_id)).encode())
    items = sorted((k, v) for k, v in (config or {}).items() if k != SIGNATURE_KEY)
    _field(h, b"C", len(items).to_bytes(8, "big"))
    for key, value in items:
        _field(h, b"k", key.encode())
        _value(h, value)
    keys = sorted(arrays.keys()) if arrays is not None else []
    _field(h, b"A", len(keys).to_bytes(8, "big"))
    for key in keys:
        _field(h, b"k", key.encode())
        _field(h, b"a", arrays[key].data)
    return h.digest()


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise SignatureError(f"cannot read model-signing key '{path}': {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"model-signing key '{path}' is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise SignatureError(f"cannot read model-verification key '{path}': {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"model-verification key '{path}' is not an Ed25519 public key")
    return key


def sign(key: Ed25519PrivateKey, arrays: ArrayRecord | None, config: Mapping[str, Any],
         message_type: str, run_id: int) -> bytes:
    return key.sign(digest(arrays, config, message_type, run_id))


def verify(key: Ed25519PublicKey, arrays: ArrayRecord | None, config: Mapping[str, Any],
           message_type: str, run_id: int) -> None:
    """Raise ``SignatureError`` unless the config's signature is the pinned key's over it all."""
    signature = config[SIGNATURE_KEY] if SIGNATURE_KEY in config else None
    if not signature:
        raise SignatureError("the message is not signed")
    if not isinstance(signature, bytes):
        raise SignatureError("the message's signature is not bytes")
    try:
        key.verify(signature, digest(arrays, config, message_type, run_id))
    except InvalidSignature:
        raise SignatureError("the message's signature does not verify (tampered with, replayed "
                             "into another run or message type, or signed by another key)"
                             ) from None
