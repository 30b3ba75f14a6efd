"""Key material: CA, coordinator TLS certificate, node keys Flower accepts, 0600 private keys."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedsynth.certs import (CertError, FederationKeys, check_node_private_key,
                            check_server_pair, init_federation, new_node_key)
from fedsynth.cli import main


def test_init_writes_ca_tls_and_signing_pair_with_private_modes(tmp_path: Path) -> None:
    keys = init_federation(tmp_path / "k", hosts=["coord.example.org", "10.1.2.3"])
    for private in (keys.ca_key, keys.server_key, keys.signing_key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    cert = x509.load_pem_x509_certificate(keys.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"coord.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("10.1.2.3"),
                                                           ipaddress.ip_address("127.0.0.1")}
    check_server_pair(keys.ca_cert, keys.server_cert, keys.server_key)  # CA signed, key matches


def test_wrong_ca_or_key_is_named(tmp_path: Path) -> None:
    a = init_federation(tmp_path / "a")
    b = init_federation(tmp_path / "b")
    with pytest.raises(CertError, match="not issued by CA"):
        check_server_pair(b.ca_cert, a.server_cert, a.server_key)
    with pytest.raises(CertError, match="does not match certificate"):
        check_server_pair(a.ca_cert, a.server_cert, b.server_key)


def test_node_key_is_openssh_ec_and_flower_accepts_public_key(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    private, public = new_node_key(tmp_path, "hospital-a")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert try_load_public_key(public)  # what `flwr supernode register` reads
    assert FederationKeys(tmp_path).node_public_keys() == [public]
    check_node_private_key(private)
    with pytest.raises(CertError, match="not an OpenSSH private key"):
        check_node_private_key(public)


def test_existing_keys_are_not_overwritten_without_force(tmp_path: Path) -> None:
    new_node_key(tmp_path, "h1")
    before = (tmp_path / "nodes" / "h1").read_bytes()
    with pytest.raises(CertError, match="exists"):
        new_node_key(tmp_path, "h1")
    new_node_key(tmp_path, "h1", force=True)
    assert (tmp_path / "nodes" / "h1").read_bytes() != before
    with pytest.raises(CertError, match="node name"):
        new_node_key(tmp_path, "../evil")


def test_cli_certs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["certs", "init", str(tmp_path), "--host", "coord.local"]) == 0
    assert main(["certs", "node", str(tmp_path), "h2"]) == 0
    assert (tmp_path / "nodes" / "h2.pub").exists()
    assert main(["certs", "init", str(tmp_path)]) == 2  # refuses to overwrite
    assert "exists" in capsys.readouterr().err
