"""Signing and pseudonym keys held by the KMS (issue 6 §5; R-SE-14, R-SE-4, R-SE-8): the node's
token-signing key, its audit checkpoint key and the national pseudonym key are managed keys of the
node's KMS, used only through it; token keys rotate without a restart (the retired key verifies
until destroyed), the pseudonym key refuses rotation with the reason; every key operation is
audited; key material never appears in logs, output or audit records."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select

from gateway.archive import ArchiveUnavailable
from gateway.archive.schema import audit_log, exams
from gateway.config import FrontendConfig, load_config
from gateway.frontend import Frontend
from gateway.identity import IdType, normalise, person_key, write_new_key
from gateway.security.kms import NOT_ROTATABLE, KeyDestroyed, KmsError, LocalKms
from gateway.security.managed import KmsPseudonymKey, KmsSigner
from tests.conftest import fetch_token, node_url, register_client
from tests.peers.ports import free_port
from tests.test_exams import exam_body
from tests.test_users import ybyx


def write_config(root: Path, db_url: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "frontend.toml"
    path.write_text(
        f"""
role = "frontend"
institution = "TEST_HOSPITAL"
[dicom]
ae_title = "YBYX"
host = "127.0.0.1"
port = {free_port()}
allow_any_calling_ae = true
[http]
host = "127.0.0.1"
port = {free_port()}
[storage]
path = "blobs"
[database]
url = "{db_url}"
[ingest]
quarantine = "quarantine"
[compression]
transfer_syntax = "none"
[identity]
key_source = "kms"
[security]
signing_key_source = "kms"
token_lifetime_seconds = 600
[audit]
signing_key_source = "kms"
checkpoint_every_records = 5
[encryption]
enabled = true
key_file = "keys/kek.json"
cache_seconds = 0
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("fresh_pg_url"))
    return f"sqlite:///{tmp_path / 'fe' / 'catalog.db'}"


@pytest.fixture
def stopped() -> Iterator[list[Frontend]]:
    nodes: list[Frontend] = []
    yield nodes
    for node in nodes:
        node.stop()


def materials(key_file: Path) -> list[str]:
    """Every secret in the key file, as stored (base64) and as hex: what must never leak."""
    doc = json.loads(key_file.read_text())
    entries = [*doc["keys"], *(e for ring in doc.get("managed", {}).values() for e in ring["keys"])]
    found = [e["material"] for e in entries if "material" in e]
    return found + [base64.b64decode(m).hex() for m in found]


def bearer(fe: Frontend) -> str:
    client_id, secret = register_client(fe, "t", "qido")
    r = fetch_token(fe, client_id, secret)
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


def qido(fe: Frontend, token: str) -> int:
    return httpx.get(
        f"{node_url(fe)}/dicom-web/studies", headers={"Authorization": f"Bearer {token}"}, timeout=10
    ).status_code


def test_signing_and_pseudonym_keys_live_in_the_kms_and_rotate_as_they_may(
    db_url: str,
    tmp_path: Path,
    stopped: list[Frontend],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    root = tmp_path / "fe"
    config = str(write_config(root, db_url))
    cfg = load_config(config)
    assert isinstance(cfg, FrontendConfig)

    # the pseudonym key is never made at start: every front-end must share the national one
    with pytest.raises(ArchiveUnavailable) as exc:
        Frontend.start(cfg)
    assert exc.value.key == "identity.key_source" and "ybyx keys import" in exc.value.reason
    national = tmp_path / "national.key"
    write_new_key(national)
    raw_key = bytes.fromhex(national.read_text().strip())
    done = ybyx(
        capsys, monkeypatch, "keys", "import", "--purpose", "pseudonym", "--from", str(national), "-c", config
    )
    assert done.returncode == 0, done.stderr
    again = ybyx(
        capsys, monkeypatch, "keys", "import", "--purpose", "pseudonym", "--from", str(national), "-c", config
    )
    assert again.returncode == 2 and "already holds an active pseudonym key" in again.stderr

    fe = Frontend.start(cfg)
    stopped.append(fe)
    assert not (root / "signing.pem").exists() and not (root / "data/signing-key.pem").exists()
    assert not (root / "data/audit/signing-key.pem").exists()  # the checkpoint key is in the KMS too
    kms = LocalKms(cfg.encryption.key_file)
    first = kms.managed_active("token-signing")

    # the pseudonym through the KMS is the HMAC the key file gives: the same person, the same key
    body = exam_body("1.2.840.7.1")
    r = httpx.post(
        f"{node_url(fe)}/api/v1/exams",
        json=body,
        headers={"Authorization": f"Bearer {_token(fe, 'api:exams')}"},
        timeout=10,
    )
    assert r.status_code in (200, 201), r.text
    with fe.archive.catalog.engine.connect() as conn:
        stored = conn.execute(select(exams.c.person_key)).scalar_one()
    number = normalise(IdType.RESIDENT_ID, body["id_number"])
    assert stored == person_key(IdType.RESIDENT_ID, number, raw_key)
    refused = ybyx(capsys, monkeypatch, "keys", "rotate", "--purpose", "pseudonym", "-c", config)
    assert refused.returncode == 2 and NOT_ROTATABLE["pseudonym"] in " ".join(refused.stderr.split())

    # token signing: rotate without a restart; the retired key verifies until destroyed
    old_token = bearer(fe)
    old_kid = fe.security.issuer.key.kid if fe.security.issuer else ""
    assert qido(fe, old_token) == 200
    rotated = ybyx(capsys, monkeypatch, "keys", "rotate", "--purpose", "token-signing", "-c", config)
    assert rotated.returncode == 0, rotated.stderr
    second = kms.managed_active("token-signing")
    assert second != first and f"was {first}" in rotated.stdout
    new_token = bearer(fe)
    assert fe.security.issuer is not None and fe.security.issuer.key.kid != old_kid
    assert qido(fe, new_token) == 200 and qido(fe, old_token) == 200
    jwks = httpx.get(f"{node_url(fe)}/.well-known/jwks.json").json()
    assert len(jwks["keys"]) == 2

    active = ybyx(capsys, monkeypatch, "keys", "destroy", "--purpose", "token-signing", second, "-c", config)
    assert active.returncode == 2 and "active" in active.stderr
    early = ybyx(capsys, monkeypatch, "keys", "destroy", "--purpose", "token-signing", first, "-c", config)
    assert early.returncode == 2 and "tokens it signed live 600 s" in early.stderr
    gone = ybyx(
        capsys, monkeypatch, "keys", "destroy", "--purpose", "token-signing", first, "--yes", "-c", config
    )
    assert gone.returncode == 0, gone.stderr
    assert qido(fe, old_token) == 401 and qido(fe, new_token) == 200
    assert len(httpx.get(f"{node_url(fe)}/.well-known/jwks.json").json()["keys"]) == 1

    # the audit checkpoint key rotates too; verify trusts every checkpoint key the KMS held
    ck = ybyx(capsys, monkeypatch, "keys", "rotate", "--purpose", "audit-checkpoint", "-c", config)
    assert ck.returncode == 0, ck.stderr
    fe.stop()
    stopped.remove(fe)
    fe = Frontend.start(cfg)  # the new checkpoint key signs from this start on
    stopped.append(fe)
    for _ in range(6):
        qido(fe, new_token)
    fe.audit.checkpoint()
    listed = ybyx(capsys, monkeypatch, "keys", "list", "-c", config)
    assert "audit-checkpoint" in listed.stdout and "retired" in listed.stdout
    fe.stop()
    stopped.remove(fe)
    verified = ybyx(capsys, monkeypatch, "audit", "verify", "-c", config)
    assert verified.returncode == 0, verified.stderr + verified.stdout
    assert "no public key" not in verified.stderr and "not trusted" not in verified.stderr
    checkpoint_keys = {r.key_id for r in _rows(cfg, "SELECT DISTINCT key_id FROM audit_checkpoints")}
    assert len(checkpoint_keys) == 2, checkpoint_keys  # signed under both checkpoint keys

    # every key operation audited, by key id; no key material in any log, output or record
    with _engine(cfg) as conn:
        rows = conn.execute(
            select(audit_log.c.resource, audit_log.c.detail).where(audit_log.c.event_type == "key-operation")
        ).all()
    ops = [(json.loads(r.detail)["operation"], json.loads(r.detail).get("purpose")) for r in rows]
    for op in [
        ("generate", "token-signing"),
        ("generate", "audit-checkpoint"),
        ("import", "pseudonym"),
        ("rotate", "token-signing"),
        ("destroy", "token-signing"),
        ("rotate", "audit-checkpoint"),
    ]:
        assert op in ops, ops
    secrets_ = [*materials(cfg.encryption.key_file), raw_key.hex()]
    seen = caplog.text + "".join(str(r) for r in rows) + capsys.readouterr().err
    for secret in secrets_:
        assert secret not in seen


def _token(fe: Frontend, scopes: str) -> str:
    client_id, secret = register_client(fe, "t", scopes)
    r = fetch_token(fe, client_id, secret)
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


def _rows(cfg: FrontendConfig, sql: str) -> list[Any]:
    from sqlalchemy import text

    with _engine(cfg) as conn:
        return list(conn.execute(text(sql)).all())


class _engine:
    def __init__(self, cfg: FrontendConfig) -> None:
        from gateway.archive.catalog import make_engine

        self.engine = make_engine(cfg.database.url)

    def __enter__(self):  # type: ignore[no-untyped-def]
        self.conn = self.engine.connect()
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()
        self.engine.dispose()


def test_local_kms_managed_keys_sign_mac_and_keep_public_halves(tmp_path: Path) -> None:
    kms = LocalKms(tmp_path / "k.json", create=True)
    with pytest.raises(KmsError, match="no active token-signing key"):
        kms.managed_active("token-signing")
    with pytest.raises(KmsError, match="not a managed key purpose"):
        kms.create_managed("backup")
    info = kms.create_managed("token-signing")
    signer = KmsSigner(kms, "token-signing", info.key_id)
    sig = signer.sign(b"message")
    Ed25519PublicKey.from_public_bytes(kms.public_key("token-signing", info.key_id)).verify(sig, b"message")
    assert "material" not in repr(signer) and info.key_id in repr(signer)

    material = secrets.token_bytes(32)
    pk = kms.create_managed("pseudonym", material)
    mac_key = KmsPseudonymKey(kms)
    assert mac_key.digest(b"resident-id:X") == hmac.new(material, b"resident-id:X", hashlib.sha256).digest()
    with pytest.raises(KmsError, match="not a signing key"):
        kms.sign("pseudonym", pk.key_id, b"x")
    with pytest.raises(KmsError, match="not a MAC key"):
        kms.mac("token-signing", info.key_id, b"x")

    kms.destroy_managed("token-signing", info.key_id)
    with pytest.raises(KeyDestroyed) as gone:
        signer.sign(b"message")
    assert material.hex() not in str(gone.value)
    # a destroyed signing key's public half stays: what it signed can still be verified
    Ed25519PublicKey.from_public_bytes(kms.public_key("token-signing", info.key_id)).verify(sig, b"message")
    # a KEK rotation keeps the managed keys (one key file)
    kms.generate()
    assert [k.state for k in kms.managed_keys("token-signing")] == ["destroyed"]
    assert KmsPseudonymKey(kms).digest(b"a") == hmac.new(material, b"a", hashlib.sha256).digest()
    (tmp_path / "k.json").chmod(0o640)
    with pytest.raises(KmsError, match="chmod 600"):
        kms.managed_active("pseudonym")
