"""Key material of a federation, made with the ``cryptography`` package (no openssl binary needed).

One folder (``fedsynth certs init DIR``) holds:

- ``ca.pem`` / ``ca.key``: the federation's own certificate authority (ECDSA P-384);
- ``coordinator.pem`` / ``coordinator.key``: the SuperLink's TLS certificate, signed by the CA,
  with a SAN for every host it serves (``localhost`` and ``127.0.0.1`` always);
- ``model-signing.key`` / ``model-signing.pub``: the Ed25519 pair that signs every global model
  (the ``.pub`` is what each hospital pins);
- ``nodes/<name>`` / ``nodes/<name>.pub`` (``fedsynth certs node DIR NAME``): a hospital's node key,
  an ECDSA P-384 key in OpenSSH format, which is what Flower's SuperNode authentication reads.

Private keys are written 0600, atomically, and never overwritten unless asked: re-running ``init``
must not silently invalidate every hospital's pinned key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class CertError(ValueError):
    """Key material is missing, unreadable or would be overwritten; the message names the file."""


@dataclass(frozen=True)
class FederationKeys:
    """Paths inside a key folder; the one place their names are spelled."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "coordinator.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "coordinator.key"

    @property
    def signing_key(self) -> Path:
        return self.root / "model-signing.key"

    @property
    def signing_pub(self) -> Path:
        return self.root / "model-signing.pub"

    @property
    def nodes(self) -> Path:
        return self.root / "nodes"

    def node_key(self, name: str) -> Path:
        return self.nodes / name

    def node_pub(self, name: str) -> Path:
        return self.nodes / f"{name}.pub"

    def node_public_keys(self) -> list[Path]:
        """Every hospital's public node key in the folder, sorted by name."""
        return sorted(self.nodes.glob("*.pub")) if self.nodes.is_dir() else []


def write_file(path: Path, data: bytes, private: bool = False, overwrite: bool = False) -> Path:
    """Atomic write; a private file is created 0600 before any byte lands in it."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CertError(f"'{path}' exists; pass --force to replace it (hospitals pinned to "
                        "the old key must then get the new one)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # keep order, drop duplicates
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_ca(common_name: str = "fedsynth federation CA", days: int = 3650
            ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                     hosts: Iterable[str], days: int = 825
                     ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for ``hosts`` (DNS names or IP addresses), signed by the CA."""
    hosts = list(dict.fromkeys([*hosts, *DEFAULT_HOSTS]))
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def init_federation(root: Path, hosts: Iterable[str] = (), force: bool = False) -> FederationKeys:
    """Write CA, coordinator TLS pair and model-signing pair into ``root``."""
    keys = FederationKeys(Path(root))
    ca_key, ca_cert = make_ca()
    srv_key, srv_cert = make_server_cert(ca_key, ca_cert, hosts)
    sign_key = Ed25519PrivateKey.generate()
    pem = serialization.Encoding.PEM
    write_file(keys.ca_key, _pem_key(ca_key), private=True, overwrite=force)
    write_file(keys.ca_cert, ca_cert.public_bytes(pem), overwrite=force)
    write_file(keys.server_key, _pem_key(srv_key), private=True, overwrite=force)
    write_file(keys.server_cert, srv_cert.public_bytes(pem), overwrite=force)
    write_file(keys.signing_key, sign_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        private=True, overwrite=force)
    write_file(keys.signing_pub, sign_key.public_key().public_bytes(
        pem, serialization.PublicFormat.SubjectPublicKeyInfo), overwrite=force)
    keys.nodes.mkdir(exist_ok=True)
    log.info("federation keys written to %s (TLS hosts: %s)", keys.root,
             ", ".join(dict.fromkeys([*hosts, *DEFAULT_HOSTS])))
    return keys


def new_node_key(root: Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """A hospital's SuperNode key: ECDSA P-384, OpenSSH private + public format."""
    if not NODE_NAME.match(name):
        raise CertError(f"node name {name!r} must be letters, digits, '.', '_' or '-' "
                        "(at most 63, not starting with a symbol)")
    keys = FederationKeys(Path(root))
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH)
    private = write_file(keys.node_key(name), priv, private=True, overwrite=force)
    public = write_file(keys.node_pub(name), pub + f" {name}\n".encode(), overwrite=force)
    log.info("node key for %s: %s (give %s to the coordinator)", name, private, public)
    return private, public


def check_readable(path: Path, what: str) -> Path:
    """One clear error for a key/cert file that is missing or unreadable."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CertError(f"{what} '{path}' does not exist")
    try:
        with path.open("rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise CertError(f"{what} '{path}' cannot be read: {exc.strerror}") from None
    return path


def load_certificate(path: Path, what: str = "certificate") -> x509.Certificate:
    data = check_readable(path, what).read_bytes()
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CertError(f"{what} '{path}' is not a PEM certificate") from None


def check_node_private_key(path: Path) -> Path:
    """The node key must be an OpenSSH EC private key (what Flower's SuperNode accepts)."""
    data = check_readable(path, "node key").read_bytes()
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CertError(f"node key '{path}' is not an OpenSSH private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"node key '{path}' is not an EC key (Flower node auth needs ECDSA)")
    return Path(path)


def check_server_pair(ca_cert: Path, cert: Path, key: Path) -> None:
    """Refuse a coordinator certificate that its CA did not sign or whose key does not match."""
    ca = load_certificate(ca_cert, "CA certificate")
    crt = load_certificate(cert, "coordinator certificate")
    try:
        private = serialization.load_pem_private_key(
            check_readable(key, "coordinator TLS key").read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CertError(f"coordinator TLS key '{key}' cannot be loaded: {exc}") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if (private.public_key().public_bytes(serialization.Encoding.DER, pub)
            != crt.public_key().public_bytes(serialization.Encoding.DER, pub)):
        raise CertError(f"coordinator TLS key '{key}' does not match certificate '{cert}'")
    try:
        crt.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise CertError(f"coordinator certificate '{cert}' was not issued by CA "
                        f"'{ca_cert}' ({type(exc).__name__})") from None
