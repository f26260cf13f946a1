"""Transfer keys per institution (R-CE-2, issue 6 §5; R-SE-10, R-SE-14): each institution's
uploads are sealed under a key of its own (wrapped by the KEK); rotating it re-wraps its data keys
without rewriting an object; destroying it shreds that institution's objects only — on SQLite and
PostgreSQL, through the store and end to end (STOW-RS by institution clients, the CLI, WADO-RS)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from sqlalchemy import select

from gateway.archive.blobstore import FolderBlobStore
from gateway.archive.catalog import Catalog
from gateway.archive.encrypted import DataKeys, EncryptedBlobStore
from gateway.archive.schema import audit_log, data_keys, instances
from gateway.center import Center
from gateway.config import CenterConfig, load_config
from gateway.security.envelope import SealError
from gateway.security.kms import LocalKms
from gateway.security.transfer_keys import ITK, uploading_for
from tests.conftest import auth, fetch_token, node_url
from tests.federation import tiny_study
from tests.peers.ports import free_port
from tests.test_stow import dicom_part, post
from tests.test_users import ybyx

PLAIN = {name: f"the bytes of {name} ".encode() * 5000 for name in ("a/1", "a/2", "b/1", "n/1")}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("fresh_pg_url"))
    return f"sqlite:///{tmp_path / 'center' / 'catalog.db'}"


@pytest.fixture
def sealed(db_url: str, tmp_path: Path) -> Iterator[tuple[EncryptedBlobStore, Path]]:
    catalog = Catalog.open(db_url)
    kms = LocalKms(tmp_path / "kek.json", create=True)
    folder = tmp_path / "blobs"
    store = EncryptedBlobStore(FolderBlobStore(folder), DataKeys(catalog, kms), cache_seconds=0)
    yield store, folder
    catalog.close()


def read(store: EncryptedBlobStore, key: str) -> bytes:
    return b"".join(store.get(key))


def kek_of(store: EncryptedBlobStore, key: str) -> str:
    with store.keys.catalog.engine.connect() as conn:
        return str(conn.execute(select(data_keys.c.kek_id).where(data_keys.c.blob_key == key)).scalar_one())


def put(store: EncryptedBlobStore, key: str, institution: str | None, data: bytes | None = None) -> None:
    with uploading_for(institution):
        store.put(key, io.BytesIO(PLAIN[key] if data is None else data))


def test_each_institution_has_its_key_rotation_keeps_all_readable_destroy_shreds_one(
    sealed: tuple[EncryptedBlobStore, Path],
) -> None:
    store, folder = sealed
    transfer = store.keys.transfer
    key_a, key_b = transfer.generate("A"), transfer.generate("B")
    put(store, "a/1", "A")
    put(store, "a/2", "A")
    put(store, "b/1", "B")
    put(store, "n/1", None)  # no institution: under the KEK as before
    assert kek_of(store, "a/1") == ITK + key_a and kek_of(store, "b/1") == ITK + key_b
    assert not kek_of(store, "n/1").startswith(ITK)
    on_disk = {k: (folder / k).read_bytes() for k in PLAIN}
    for k, raw in on_disk.items():
        assert PLAIN[k][:40] not in raw  # ciphertext at rest
        assert read(store, k) == PLAIN[k]

    # rotation ("modify"): a new key for A, A's data keys re-wrapped, no object rewritten
    new_a, rewrapped, _ = transfer.rotate("A")
    assert new_a != key_a and rewrapped == 2
    assert kek_of(store, "a/1") == ITK + new_a and kek_of(store, "b/1") == ITK + key_b
    assert {k: (folder / k).read_bytes() for k in PLAIN} == on_disk
    assert all(read(store, k) == PLAIN[k] for k in PLAIN)
    # a second rotation removes the key retired by the first (nothing depends on it any more)
    newer_a, _, pruned = transfer.rotate("A")
    assert pruned == 1 and [t.state for t in transfer.list() if t.key_id == key_a] == ["destroyed"]

    # a KEK rotation re-wraps the transfer keys; what they wrap is untouched and stays readable
    kms = store.keys.kms
    assert isinstance(kms, LocalKms)
    new_kek = kms.generate().key_id
    result = store.keys.rewrap(new_kek)
    assert result.unreadable == 0 and kek_of(store, "a/1") == ITK + newer_a
    assert all(read(store, k) == PLAIN[k] for k in PLAIN)

    # destroy ("delete") A: A's objects unreadable for good, B's and the rest still readable
    destroyed, lost = transfer.destroy("A")
    assert lost == 2 and newer_a in destroyed
    store.forget_cached_keys()
    for k in ("a/1", "a/2"):
        with pytest.raises(SealError, match=r"transfer key \w+ of institution A was destroyed"):
            read(store, k)
        with pytest.raises(SealError):
            store.read_range(k, 100, 10)
    assert read(store, "b/1") == PLAIN["b/1"] and read(store, "n/1") == PLAIN["n/1"]
    assert store.read_range("b/1", 100, 10) == PLAIN["b/1"][100:110]
    # A uploads again without a key: under the KEK (until a new transfer key is generated)
    put(store, "a/3", "A", b"after")
    assert read(store, "a/3") == b"after" and not kek_of(store, "a/3").startswith(ITK)


def write_center(root: Path, db_url: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "center.toml"
    path.write_text(
        f"""
role = "center"
province = "50"
[http]
host = "127.0.0.1"
port = {free_port()}
[storage]
path = "blobs"
[database]
url = "{db_url}"
[ingest]
quarantine = "quarantine"
[security]
signing_key_file = "signing.pem"
token_lifetime_seconds = 3600
[encryption]
enabled = true
key_file = "keys/kek.json"
cache_seconds = 0
""",
        encoding="utf-8",
    )
    return path


def test_stow_by_institution_clients_is_sealed_per_institution_and_cli_destroy_shreds_one(
    db_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = str(write_center(tmp_path / "center", db_url))
    secrets: dict[str, str] = {}
    for inst in ("A", "B"):
        added = ybyx(
            capsys, monkeypatch, "clients", "add", f"fe-{inst}", "--scopes", "stow",
            "--institution", inst, "-c", config,
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        secrets[inst] = added.stdout
        made = ybyx(
            capsys,
            monkeypatch,
            "keys",
            "generate",
            "--purpose",
            "transfer",
            "--institution",
            inst,
            "-c",
            config,
        )
        assert made.returncode == 0, made.stderr
    cfg = load_config(config)
    assert isinstance(cfg, CenterConfig)
    center = Center.start(cfg)
    try:
        studies = {}
        for inst in ("A", "B"):
            client_id, secret = _credentials(secrets[inst])
            token = fetch_token(center, client_id, secret).json()["access_token"]
            files = tiny_study(tmp_path / inst, count=1)
            r = post(
                f"{node_url(center)}/dicom-web/studies",
                [dicom_part(f.read_bytes()) for f in files],
                {"Authorization": f"Bearer {token}"},
            )
            assert r.status_code == 200, r.text
            ds = dcmread(files[0], stop_before_pixels=True)
            with center.archive.catalog.engine.connect() as conn:
                blob = conn.execute(
                    select(instances.c.blob_key).where(instances.c.sop_uid == ds.SOPInstanceUID)
                ).scalar_one()
            studies[inst] = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, blob)
        transfer = center.archive.store.keys.transfer  # type: ignore[attr-defined]
        for inst, (*_, blob) in studies.items():
            assert kek_of(center.archive.store, blob) == ITK + transfer.active(inst)  # type: ignore[arg-type]
        reader = auth(center)

        def wado(inst: str) -> int:
            study, series, sop, _ = studies[inst]
            url = f"{node_url(center)}/dicom-web/studies/{study}/series/{series}/instances/{sop}"
            accept = {**reader, "Accept": 'multipart/related; type="application/dicom"'}
            return httpx.get(url, headers=accept, timeout=30).status_code  # a broken body raises

        assert wado("A") == 200 and wado("B") == 200
        refused = ybyx(
            capsys,
            monkeypatch,
            "keys",
            "destroy",
            "--purpose",
            "transfer",
            "--institution",
            "A",
            "-c",
            config,
        )
        assert refused.returncode == 2 and "unreadable for good" in refused.stderr
        rotated = ybyx(
            capsys, monkeypatch, "keys", "rotate", "--purpose", "transfer", "--institution", "A", "-c", config
        )
        assert rotated.returncode == 0 and "re-wrapped 1 data keys" in rotated.stdout
        assert wado("A") == 200 and wado("B") == 200
        gone = ybyx(
            capsys, monkeypatch, "keys", "destroy", "--purpose", "transfer", "--institution", "A",
            "--yes", "-c", config,
        )  # fmt: skip
        assert gone.returncode == 0, gone.stderr
        center.archive.store.forget_cached_keys()  # type: ignore[attr-defined]
        assert wado("A") == 410 and wado("B") == 200  # shredded: 410 Gone before any body
        listed = ybyx(capsys, monkeypatch, "keys", "list", "-c", config)
        assert "transfer A" in listed.stdout and "destroyed" in listed.stdout
        with center.archive.catalog.engine.connect() as conn:
            ops = [
                json.loads(d)
                for d in conn.execute(
                    select(audit_log.c.detail).where(audit_log.c.event_type == "key-operation")
                ).scalars()
            ]
        done = [(o["operation"], o.get("institution")) for o in ops if o.get("purpose") == "transfer"]
        assert done == [
            ("generate", "A"),
            ("generate", "B"),
            ("rotate", "A"),
            ("destroy", "A"),
            ("destroy", "A"),
        ]
    finally:
        center.stop()


def transfer_of(institution: str) -> tuple[str, ...]:
    return ("--purpose", "transfer", "--institution", institution)


def _credentials(output: str) -> tuple[str, str]:
    """The client id and secret ``ybyx clients add`` printed."""
    words = output.split()
    secret = next(w for w in words if w.startswith("ybyx_cs_"))
    client_id = next(w for w in words if w.startswith("fe-"))
    return client_id, secret
