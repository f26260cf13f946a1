"""TLS for every transfer over an untrusted network (R-SE-5; issue 6 §6).

One place builds the :class:`ssl.SSLContext` objects the edges use: uvicorn for HTTPS (it takes the
file names), pynetdicom for DICOM TLS (PS3.15 Annex B secure transport: the SCP's listening context
and our SCU's — ``ybyx send``, C-MOVE sub-operations), and httpx for the front-end's calls to its
center (STOW-RS, token endpoint). Contexts are TLS 1.2 or newer; a client always checks the peer's
certificate chain and host name; a server asks for a client certificate only for mutual TLS
between nodes (``require_client_cert``).

``ybyx certs dev --out DIR`` (:func:`write_dev_certs`) makes a development CA and a server and a
client certificate signed by it — for the demo and tests; production certificates come from the
province's PKI.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def server_context(
    cert_file: Path, key_file: Path, *, ca_file: Path | None = None, require_client_cert: bool = False
) -> ssl.SSLContext:
    """A listener's context; with ``require_client_cert`` a peer without a certificate signed by a
    CA in ``ca_file`` is refused during the handshake (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    if ca_file is not None:
        ctx.load_verify_locations(cafile=str(ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(
    ca_file: Path | None = None, *, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """A caller's context: the peer's certificate must chain to ``ca_file`` (default: the system's
    trust store) and name the host; ``cert_file``/``key_file`` are presented for mutual TLS."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return ctx


# ---- development certificates ------------------------------------------------------------------


@dataclass(frozen=True)
class DevCerts:
    """The files :func:`write_dev_certs` made."""

    ca: Path
    ca_key: Path
    server: Path
    server_key: Path
    client: Path
    client_key: Path


def _key() -> rsa.RSAPrivateKey:
    # RSA 2048: accepted by every peer we test against (dcmtk's BCP 195 profile included)
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)


def _name(common: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ybyx development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
    )


def _sans(hosts: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for host in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def write_dev_certs(
    out: Path, *, hosts: list[str] | None = None, client_name: str = "ybyx-node", days: int = 365
) -> DevCerts:
    """A development CA and a server and a client certificate signed by it, as PEM files in ``out``
    (keys mode 600, unencrypted). ``hosts``: the server's names and addresses (default localhost,
    127.0.0.1, ::1). Refuses to overwrite existing files."""
    hosts = hosts or ["localhost", "127.0.0.1", "::1"]
    out.mkdir(parents=True, exist_ok=True)
    files = DevCerts(
        out / "ca.pem",
        out / "ca-key.pem",
        out / "server.pem",
        out / "server-key.pem",
        out / "client.pem",
        out / "client-key.pem",
    )
    existing = [str(p) for p in vars(files).values() if Path(p).exists()]
    if existing:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)}")
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ca_key = _key()
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("ybyx development CA"))
        .issuer_name(_name("ybyx development CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        common: str, usage: list[x509.ObjectIdentifier], sans: list[str]
    ) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
        key = _key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(_sans(sans)), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    # a node's certificate also serves as its client certificate (C-MOVE sub-operations, mutual
    # TLS to peers), so it carries both usages; the client certificate is for callers only
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    server, server_key = leaf(hosts[0], both, hosts)
    client, client_key = leaf(client_name, [ExtendedKeyUsageOID.CLIENT_AUTH], [])
    _write_key(files.ca_key, ca_key)
    _write_key(files.server_key, server_key)
    _write_key(files.client_key, client_key)
    for path, cert in ((files.ca, ca), (files.server, server), (files.client, client)):
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files
