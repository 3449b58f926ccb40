"""The study PKI: a CA that signs the SuperLink certificate, and node keys in the format Flower loads."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from common.errors import ConfigError
from deploy.certificates import create_node_keys, create_study_pki


def test_pki_chain_san_and_node_keys(tmp_path: Path) -> None:
    pki = create_study_pki(tmp_path / "pki", ["hospA", "hospB"], hosts=["superlink.example.org", "10.0.0.7"])

    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    # the server certificate is signed by the CA (raises otherwise) and is not itself a CA
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                             ipaddress.ip_address("10.0.0.7")}
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "superlink.example.org"}

    assert sorted(pki.nodes) == ["hospA", "hospB"]
    publics = set()
    for keys in pki.nodes.values():
        private = load_ssh_private_key(keys.private_key.read_bytes(), None)  # what flower-supernode does
        public = load_ssh_public_key(keys.public_key.read_bytes())  # what `flwr supernode register` does
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert public.public_numbers() == private.public_key().public_numbers()
        assert stat.S_IMODE(keys.private_key.stat().st_mode) == 0o600
        publics.add(keys.public_key.read_bytes())
    assert len(publics) == 2  # one distinct key pair per hospital
    for secret in (pki.ca_key, pki.server_key):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    # the CA key is written apart: nothing under pki/ (what goes to the SuperLink host) can sign certificates
    assert not pki.ca_key.is_relative_to(pki.root) and stat.S_IMODE(pki.ca_key.parent.stat().st_mode) == 0o700
    assert not [p for p in pki.root.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()
                and p not in (pki.server_key, *[k.private_key for k in pki.nodes.values()])]


def test_node_name_must_be_a_plain_file_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not usable as a file name"):
        create_node_keys(tmp_path, "../evil")
