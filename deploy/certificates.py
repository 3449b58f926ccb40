"""A study's public-key material: the study CA, the SuperLink's TLS certificate and one key pair per hospital.

Layout written by :func:`create_study_pki`::

    pki/
      ca.crt                       the study CA's certificate (what everyone trusts)
      superlink.crt  superlink.key the SuperLink's TLS certificate (SAN: 127.0.0.1, localhost + given hosts)
      nodes/<site>.key <site>.pub  one EC P-384 key pair per hospital SuperNode (OpenSSH format, as Flower reads)
    pki-ca-offline/
      ca.key                       the CA's private key, apart: never on the SuperLink host (copying pki/ there
                                   cannot carry it); only needed to renew the SuperLink certificate

The CA certificate is what SuperNodes and the ``flwr`` CLI trust (``--root-certificates`` / ``root-certificates``);
a node's private key stays at its hospital (``--auth-supernode-private-key``) and its public key is registered
at the SuperLink with ``flwr supernode register`` (:func:`register_node`).

Run as a script: ``python -m deploy.certificates --out pki --sites hospA,hospB --host superlink.example.org``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import logging
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError
from deploy.processes import flower_command

log = logging.getLogger(__name__)

DEFAULT_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost")
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class NodeKeys:
    """One hospital SuperNode's key pair on disk."""

    site: str
    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class StudyPki:
    """Paths of a study's certificates and node keys."""

    root: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    nodes: dict[str, NodeKeys] = field(default_factory=dict)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    path.chmod(0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # ordered, unique
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def create_ca(out: Path, study: str = "fedbiopsy", days: int = 3650, key_dir: Path | None = None
              ) -> tuple[Path, Path]:
    """Write a self-signed study CA, ``ca.crt`` under ``out`` and ``ca.key`` under ``key_dir`` (default ``out``);
    returns their paths."""
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, study),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"{study} study CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    key_dir = key_dir or out
    out.mkdir(parents=True, exist_ok=True)
    key_dir.mkdir(parents=True, exist_ok=True)
    key_dir.chmod(0o700)
    (out / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(key_dir / "ca.key", _pem_key(key))
    return out / "ca.crt", key_dir / "ca.key"


def offline_key_dir(out: Path) -> Path:
    """Where :func:`create_study_pki` keeps the CA key of the PKI folder ``out``: its sibling ``<out>-ca-offline``."""
    out = Path(out).resolve()
    return out.parent / f"{out.name}-ca-offline"


def create_server_certificate(ca_cert: Path, ca_key: Path, out: Path, hosts: Sequence[str] = (),
                              name: str = "superlink", days: int = 825) -> tuple[Path, Path]:
    """Write ``<name>.crt``/``<name>.key`` signed by the CA, valid for 127.0.0.1, localhost and ``hosts``."""
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    if not isinstance(signer, ec.EllipticCurvePrivateKey):
        raise ConfigError(ca_key, "the CA key is not an EC key", "create the CA with create_ca()")
    all_hosts = [*DEFAULT_HOSTS, *hosts]
    key = _new_key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, all_hosts[-1])]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(all_hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
        .sign(signer, hashes.SHA384())
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(out / f"{name}.key", _pem_key(key))
    return out / f"{name}.crt", out / f"{name}.key"


def create_node_keys(out: Path, site: str) -> NodeKeys:
    """Write an EC P-384 key pair for one hospital SuperNode in OpenSSH format (``<site>.key``, ``<site>.pub``)."""
    if not _SITE_NAME.match(site):
        raise ConfigError("--sites", f"site name {site!r} is not usable as a file name",
                          "use letters, digits, '.', '_' or '-'")
    private = out / f"{site}.key"
    public = out / f"{site}.pub"
    if private.exists() or public.exists():
        raise ConfigError(private, "a key pair for this site exists already",
                          "write a new key pair into another folder (key rotation), never over a registered one")
    key = _new_key()
    _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + f" {site}\n".encode())
    return NodeKeys(site, private, public)


def create_study_pki(out: Path | str, sites: Sequence[str], hosts: Sequence[str] = (),
                     study: str = "fedbiopsy", reuse_ca: bool = False) -> StudyPki:
    """Create the CA, the SuperLink certificate and one node key pair per site under ``out``.

    ``reuse_ca`` keeps an existing ``ca.crt``/``ca.key`` and only issues a new SuperLink certificate (and the
    listed sites' key pairs): certificate renewal without touching what SuperNodes trust. The CA key is written
    apart, in :func:`offline_key_dir` (never inside ``out``).
    """
    root = Path(out)
    key_dir = offline_key_dir(root)
    if reuse_ca and (root / "ca.crt").is_file() and (key_dir / "ca.key").is_file():
        ca_cert, ca_key = root / "ca.crt", key_dir / "ca.key"
    else:
        ca_cert, ca_key = create_ca(root, study, key_dir=key_dir)
    cert, key = create_server_certificate(ca_cert, ca_key, root, hosts)
    nodes = {site: create_node_keys(root / "nodes", site) for site in sites}
    log.info("wrote the study CA, the SuperLink certificate (%s) and %d node key pair(s) under %s",
             ", ".join([*DEFAULT_HOSTS, *hosts]), len(nodes), root)
    return StudyPki(root, ca_cert, ca_key, cert, key, nodes)


def flwr_env(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment for Flower commands: its own ``FLWR_HOME``, telemetry and update checks off."""
    env = dict(os.environ if base is None else base)
    env.update(FLWR_HOME=str(flwr_home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    return env


def register_node(public_key: Path, connection: str | None, flwr_home: Path, name: str | None = None,
                  timeout_s: float = 60.0) -> int:
    """Register a node's public key at the SuperLink named ``connection`` in ``flwr_home``/config.toml.

    Runs ``flwr supernode register <public_key> [<connection>] --name <name> --format json`` (None: the
    default connection) and returns the node id the SuperLink assigned.
    """
    cmd = [flower_command("flwr"), "supernode", "register", str(public_key), *([connection] if connection else []),
           "--format", "json"]
    if name:
        cmd += ["--name", name]
    proc = subprocess.run(cmd, env=flwr_env(flwr_home), capture_output=True, text=True, timeout=timeout_s,
                          check=False)
    node_id = _json_field(proc.stdout, "node-id")
    if proc.returncode != 0 or node_id is None:
        raise ConfigError(public_key, f"`{' '.join(cmd)}` failed (exit {proc.returncode}): "
                          f"{(proc.stdout + proc.stderr).strip()[-600:]}",
                          "check that the SuperLink runs with --enable-supernode-auth and the key is not registered")
    log.info("registered %s as node %s", name or public_key.stem, node_id)
    return int(str(node_id))


def _json_field(stdout: str, key: str) -> object | None:
    """The value of ``key`` in the JSON object a ``flwr ... --format json`` command prints last."""
    start = stdout.rfind("\n{")
    try:
        data = json.loads(stdout[start + 1 if start >= 0 else 0:])
    except json.JSONDecodeError:
        return None
    return data.get(key) if isinstance(data, dict) else None


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m deploy.certificates``: create a study's CA, SuperLink certificate and node keys."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the PKI into")
    parser.add_argument("--sites", default="", help="comma-separated hospital names, one key pair each")
    parser.add_argument("--reuse-ca", action="store_true", help="keep an existing CA, renew the SuperLink certificate")
    parser.add_argument("--host", action="append", default=[], help="extra SuperLink DNS name or IP (repeatable)")
    parser.add_argument("--study", default="fedbiopsy", help="organisation name in the CA certificate")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    create_study_pki(args.out, [s for s in args.sites.split(",") if s], args.host, args.study, args.reuse_ca)


if __name__ == "__main__":
    main()
