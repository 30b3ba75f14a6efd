"""Signed global models: the coordinator signs, every hospital verifies before loading.

The signature is Ed25519 (cryptography's implementation) over a SHA-512 digest of the exact bytes
that travel: for each array in key order, the key, then the array's serialised bytes as Flower
carries them. One flipped bit anywhere in any array, or a renamed key, fails verification.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from flwr.app import ArrayRecord

SIGNATURE_KEY = "model-signature"  # ConfigRecord entry carrying the signature bytes


class SignatureError(ValueError):
    """The global model is unsigned, tampered with, or signed by another key."""


def digest(record: ArrayRecord) -> bytes:
    h = hashlib.sha512()
    for key in sorted(record.keys()):
        data = record[key].data
        h.update(len(key).to_bytes(4, "big") + key.encode())
        h.update(len(data).to_bytes(8, "big") + data)
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


def sign(record: ArrayRecord, key: Ed25519PrivateKey) -> bytes:
    return key.sign(digest(record))


def verify(record: ArrayRecord, signature: bytes | None, key: Ed25519PublicKey) -> None:
    """Raise ``SignatureError`` unless ``signature`` is the pinned key's over ``record``."""
    if not signature:
        raise SignatureError("the global model is not signed")
    try:
        key.verify(signature, digest(record))
    except InvalidSignature:
        raise SignatureError("the global model's signature does not verify "
                             "(tampered with, or signed by another key)") from None
