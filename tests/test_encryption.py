"""Encryption at rest (issue 6 §5; R-SE-10, R-SE-14): what a stolen disk or bucket shows, and the
key lifecycle — rotation keeps everything readable without rewriting objects, destruction makes
data unreadable, frames are still cut by range reads.

The archive's own behaviour over a sealed store is proven by the shared suites
(``tests/test_blobstore.py`` and ``tests/test_archive.py``, parametrized ``*-sealed``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from minio import Minio
from pydicom import dcmread
from sqlalchemy import select

from dimse.scu import send
from gateway.archive.blobstore import BlobStore, FolderBlobStore
from gateway.archive.catalog import Catalog
from gateway.archive.encrypted import DataKeys, EncryptedBlobStore
from gateway.archive.schema import audit_log, data_keys
from gateway.frontend import Frontend
from gateway.security.envelope import HEADER_SIZE, MAGIC, SEGMENT_SIZE, SealError
from gateway.security.kms import KeyDestroyed, KmsError, LocalKms
from tests.conftest import auth
from tests.peers.seaweedfs import S3Endpoint

ROOT = Path(__file__).resolve().parents[1]
SEALED = {"enabled": True}


def ybyx(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


class CountingStore:
    """A real backend that counts what is read from it (to prove reads are ranged)."""

    def __init__(self, inner: BlobStore) -> None:
        self.inner = inner
        self.ranges: list[tuple[int, int]] = []
        self.gets = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        data = self.inner.read_range(key, offset, length)
        if offset > 0:  # the header read (offset 0) is cached per object
            self.ranges.append((offset, len(data)))
        return data

    def get(self, key: str) -> Iterator[bytes]:
        self.gets += 1
        return self.inner.get(key)


@pytest.fixture
def sealed_store(tmp_path: Path) -> Iterator[EncryptedBlobStore]:
    catalog = Catalog.open(f"sqlite:///{tmp_path / 'catalog.db'}")
    kms = LocalKms(tmp_path / "kek.json", create=True)
    yield EncryptedBlobStore(FolderBlobStore(tmp_path / "blobs"), DataKeys(catalog, kms), cache_seconds=0)
    catalog.close()


def raw_objects(fe: Frontend) -> dict[str, bytes]:
    """Every stored object as the backend holds it (disk files or S3 objects), by key."""
    store = fe.archive.store
    assert isinstance(store, EncryptedBlobStore)
    inner = store.inner
    if isinstance(inner, FolderBlobStore):
        return {
            str(p.relative_to(inner.root)): p.read_bytes()
            for p in inner.root.rglob("*.dcm")
            if ".spool" not in p.parts
        }
    client: Minio = inner._client  # type: ignore[attr-defined]
    bucket = inner.bucket  # type: ignore[attr-defined]
    return {
        o.object_name: client.get_object(bucket, o.object_name).read()
        for o in client.list_objects(bucket, recursive=True)
    }


# ---- what the disk and the bucket hold ----------------------------------------------------------


@pytest.mark.parametrize("backend", ["folder", "s3"])
def test_stored_objects_are_ciphertext_on_disk_and_in_s3(
    backend: str, start_frontend: Callable[..., Frontend], samples: Path, request: pytest.FixtureRequest
) -> None:
    s3: S3Endpoint | None = request.getfixturevalue("seaweedfs") if backend == "s3" else None
    fe = start_frontend(s3=s3, encryption=SEALED)
    files = sorted((samples / "03_DX_chest").iterdir()) + sorted((samples / "01_CT_chest").iterdir())[:2]
    assert send(files, "127.0.0.1", fe.dicom_port, "YBYX").ok
    raw = raw_objects(fe)
    assert len(raw) == 3
    originals = [f.read_bytes() for f in files]
    names = [str(dcmread(f, stop_before_pixels=True).PatientName) for f in files]
    for key, blob in raw.items():
        assert blob.startswith(MAGIC), key
        assert b"DICM" not in blob, f"{key}: the DICOM preamble is visible"
        for name in names:
            for part in name.split("="):  # alphabetic and ideographic forms, in their encodings
                for enc in ("utf-8", "gb18030"):
                    assert part.encode(enc) not in blob, f"{key}: patient name {part!r} visible"
        assert not any(o[1000:1064] in blob for o in originals)  # no plaintext run
    # … and through the store every byte comes back, hash-checked against the catalog
    for inst in fe.archive.catalog.locate({}):
        data = b"".join(fe.archive.store.get(inst.blob_key))
        assert hashlib.sha256(data).hexdigest() == inst.sha256
        assert dcmread(io.BytesIO(data)).SOPInstanceUID == inst.sop_uid


# ---- rotation and destruction -----------------------------------------------------------------


def test_rotation_rewraps_data_keys_and_keeps_everything_readable(
    start_frontend: Callable[..., Frontend], samples: Path, tmp_path: Path
) -> None:
    fe = start_frontend(encryption=SEALED)
    files = sorted((samples / "02_MR_brain").iterdir())[:6]
    assert send(files, "127.0.0.1", fe.dicom_port, "YBYX").ok
    store = fe.archive.store
    assert isinstance(store, EncryptedBlobStore)
    kms = store.keys.kms
    first = kms.active()
    before = raw_objects(fe)

    new = kms.generate()
    done = store.keys.rewrap()
    assert done.rewrapped == 6 and done.unreadable == 0
    assert store.keys.counts() == {new.key_id: 6}
    assert raw_objects(fe) == before  # no object was rewritten: only the wrapped keys changed

    kms.destroy(first)  # the old KEK is gone: nothing depends on it any more
    store.forget_cached_keys()
    held = fe.archive.catalog.locate({})
    assert len(held) == 6
    for inst in held:  # every byte back, checked against the hash recorded at ingest
        assert hashlib.sha256(b"".join(store.get(inst.blob_key))).hexdigest() == inst.sha256


def test_destroyed_key_makes_its_data_unreadable(sealed_store: EncryptedBlobStore) -> None:
    sealed_store.put("a/secret.dcm", io.BytesIO(b"patient data " * 10_000))
    kms = sealed_store.keys.kms
    kek = kms.active()
    info = kms.destroy(kek)
    assert info.state == "destroyed"
    with pytest.raises(SealError, match=f"unreadable, KEK {kek} was destroyed"):
        b"".join(sealed_store.get("a/secret.dcm"))
    with pytest.raises(SealError):
        sealed_store.read_range("a/secret.dcm", 100, 10)
    with pytest.raises(KmsError, match="no active KEK"):  # nothing new is sealed until a new KEK
        sealed_store.put("b", io.BytesIO(b"x"))
    key_file = json.loads((sealed_store.keys.kms.path).read_text())  # type: ignore[attr-defined]
    assert all("material" not in k for k in key_file["keys"])  # the material is really gone
    with pytest.raises(KeyDestroyed):
        kms.destroy(kek)


def test_tampering_is_detected(sealed_store: EncryptedBlobStore) -> None:
    """Changed, reordered or truncated segments fail authentication instead of returning bytes."""
    data = os.urandom(3 * SEGMENT_SIZE + 100)
    sealed_store.put("t", io.BytesIO(data))
    inner = sealed_store.inner
    assert isinstance(inner, FolderBlobStore)
    path = inner.local_path("t")
    good = path.read_bytes()
    stride = SEGMENT_SIZE + 16
    segs = [good[HEADER_SIZE + i * stride : HEADER_SIZE + (i + 1) * stride] for i in range(4)]

    def attempt(blob: bytes) -> None:
        path.write_bytes(blob)
        with pytest.raises(SealError):
            b"".join(sealed_store.get("t"))

    flipped = bytearray(good)
    flipped[HEADER_SIZE + stride + 5] ^= 1
    attempt(bytes(flipped))
    attempt(good[:HEADER_SIZE] + segs[1] + segs[0] + segs[2] + segs[3])  # reordered
    attempt(good[: HEADER_SIZE + 3 * stride])  # cut at a segment boundary: the final one is missing
    attempt(good[:HEADER_SIZE])
    path.write_bytes(good)
    assert b"".join(sealed_store.get("t")) == data


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    kms = LocalKms(tmp_path / "kek.json", create=True)
    assert (kms.path.stat().st_mode & 0o777) == 0o600
    kms.path.chmod(0o640)
    with pytest.raises(KmsError, match="readable by group or others"):
        LocalKms(kms.path)


def test_missing_key_file_with_sealed_data_stops_the_start(
    start_frontend: Callable[..., Frontend], samples: Path, tmp_path: Path
) -> None:
    from gateway.archive import ArchiveUnavailable

    root = tmp_path / "node"
    fe = start_frontend(root=root, encryption=SEALED)
    assert send(sorted((samples / "03_DX_chest").iterdir()), "127.0.0.1", fe.dicom_port, "YBYX").ok
    fe.stop()
    (root / "data" / "keys" / "kek.json").rename(root / "elsewhere.json")
    with pytest.raises(ArchiveUnavailable, match=r"encryption.key_file: .*missing, but 1 stored objects"):
        start_frontend(root=root, encryption=SEALED)


# ---- frames by range reads ---------------------------------------------------------------------


def test_frames_are_served_by_range_reads_of_the_sealed_object(
    start_frontend: Callable[..., Frontend], samples: Path
) -> None:
    fe = start_frontend(encryption=SEALED)
    [xa] = sorted((samples / "04_XA_coronary").iterdir())
    ds = dcmread(xa)
    assert send([xa], "127.0.0.1", fe.dicom_port, "YBYX").ok
    store = fe.archive.store
    assert isinstance(store, EncryptedBlobStore)
    counting = CountingStore(store.inner)
    store.inner = counting
    url = (
        f"http://127.0.0.1:{fe.http_port}/dicom-web/studies/{ds.StudyInstanceUID}/series/"
        f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/frames/5"
    )
    rsp = httpx.get(url, headers={**auth(fe), "Accept": "multipart/related; type=application/octet-stream"})
    assert rsp.status_code == 200, rsp.text
    frame = _native_frame(ds, 5)
    assert frame in rsp.content
    assert counting.gets == 0  # never the whole object
    read = sum(n for _, n in counting.ranges)
    assert read <= len(frame) + 2 * (SEGMENT_SIZE + 16) + 1, (read, len(xa.read_bytes()))
    assert read < len(xa.read_bytes()) / 2


def _native_frame(ds: Any, number: int) -> bytes:
    size = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * (int(ds.BitsAllocated) // 8)
    return bytes(ds.PixelData[(number - 1) * size : number * size])


# ---- the command line ------------------------------------------------------------------------


def test_keys_cli_generate_rotate_destroy_are_audited_and_never_print_keys(
    start_frontend: Callable[..., Frontend], samples: Path, tmp_path: Path
) -> None:
    root = tmp_path / "node"
    fe = start_frontend(root=root, encryption=SEALED)
    assert send(sorted((samples / "03_DX_chest").iterdir()), "127.0.0.1", fe.dicom_port, "YBYX").ok
    cfg = fe.cfg
    fe.stop()
    config = root / "fe.toml"
    config.write_text(
        "\n".join(
            [
                'role = "frontend"',
                'institution = "TEST_HOSPITAL"',
                "[dicom]",
                "allow_any_calling_ae = true",
                "[database]",
                f'url = "{cfg.database.url}"',
                "[encryption]",
                "enabled = true",
                f'key_file = "{cfg.encryption.key_file}"',
                "[audit]",
                f'signing_key = "{cfg.audit.signing_key}"',
                f'export_path = "{cfg.audit.export_path}"',
            ]
        )
    )
    first = LocalKms(cfg.encryption.key_file).active()
    again = ybyx("keys", "generate", "-c", str(config))
    assert again.returncode == 2 and "exists" in again.stderr
    rotated = ybyx("keys", "rotate", "-c", str(config))
    assert rotated.returncode == 0, rotated.stderr
    assert "re-wrapped 1 data keys" in rotated.stdout
    second = LocalKms(cfg.encryption.key_file).active()
    assert second != first
    listed = ybyx("keys", "list", "-c", str(config))
    assert f"{second}\tactive" in listed.stdout and "1 data keys" in listed.stdout
    refused = ybyx("keys", "destroy", second, "-c", str(config))
    assert refused.returncode == 2 and "1 stored objects" in refused.stderr
    assert ybyx("keys", "destroy", first, "-c", str(config)).returncode == 0
    assert ybyx("keys", "destroy", second, "-c", str(config), "--yes").returncode == 0

    material = json.dumps(json.loads(cfg.encryption.key_file.read_text()))
    outputs = rotated.stdout + rotated.stderr + listed.stdout
    assert "material" not in material  # every KEK destroyed: no material left in the file
    assert "==" not in outputs  # no base64 key material printed
    catalog = Catalog.open(cfg.database.url)
    try:
        with catalog.engine.connect() as conn:
            ops = [
                json.loads(r.detail)["operation"]
                for r in conn.execute(
                    select(audit_log.c.detail).where(audit_log.c.event_type == "key-operation")
                )
            ]
            wrapped = conn.execute(select(data_keys.c.kek_id)).scalars().all()
    finally:
        catalog.close()
    assert ops == ["generate", "rotate", "destroy", "destroy"]
    assert wrapped == [second]


# ---- both roles sealed, forwarding between them ---------------------------------------------------


def test_a_sealed_front_end_forwards_to_a_sealed_center(
    start_frontend: Callable[..., Frontend], samples: Path, tmp_path: Path
) -> None:
    """The demo's set-up: the forwarder reads sealed blobs, the center seals what it receives."""
    import time

    from gateway.center import Center
    from tests.conftest import center_config, forward_to

    cfg = center_config(tmp_path / "center")
    center = Center.start(cfg.model_copy(update={"encryption": cfg.encryption.model_copy(update=SEALED)}))
    try:
        fast = {"settle_seconds": 0.2, "backoff_initial_seconds": 0.2, "backoff_max_seconds": 1.0}
        fe = start_frontend(encryption=SEALED, forward=forward_to(center, **fast))
        files = sorted((samples / "02_MR_brain").iterdir())[:4]
        assert send(files, "127.0.0.1", fe.dicom_port, "YBYX").ok
        deadline = time.monotonic() + 30
        while center.archive.catalog.counts()["instances"] < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        held = center.archive.catalog.locate({})
        assert len(held) == 4
        store = center.archive.store
        assert isinstance(store, EncryptedBlobStore) and isinstance(store.inner, FolderBlobStore)
        for inst in held:
            assert store.inner.local_path(inst.blob_key).read_bytes().startswith(MAGIC)
            assert hashlib.sha256(b"".join(store.get(inst.blob_key))).hexdigest() == inst.sha256
    finally:
        center.stop()


def test_switching_encryption_on_keeps_plain_objects_readable_until_sealed_in_place(
    start_frontend: Callable[..., Frontend], samples: Path, tmp_path: Path
) -> None:
    """An archive that held plain objects turns [encryption] on: they stay readable, `ybyx keys
    seal-existing` seals them in place (hash-checked), and from then on plaintext in a sealed
    object's place is refused as tampering."""
    root = tmp_path / "node"
    fe = start_frontend(root=root)
    files = sorted((samples / "02_MR_brain").iterdir())[:3]
    assert send(files, "127.0.0.1", fe.dicom_port, "YBYX").ok
    fe.stop()
    fe = start_frontend(root=root, encryption=SEALED)
    [dx] = sorted((samples / "03_DX_chest").iterdir())
    assert send([dx], "127.0.0.1", fe.dicom_port, "YBYX").ok  # new objects are sealed
    store = fe.archive.store
    assert isinstance(store, EncryptedBlobStore) and isinstance(store.inner, FolderBlobStore)
    held = fe.archive.catalog.locate({})
    on_disk = {i.blob_key: store.inner.local_path(i.blob_key).read_bytes() for i in held}
    assert sum(b.startswith(MAGIC) for b in on_disk.values()) == 1
    for inst in held:  # plain and sealed alike read back
        assert hashlib.sha256(b"".join(store.get(inst.blob_key))).hexdigest() == inst.sha256
        assert store.read_range(inst.blob_key, 128, 4) == b"DICM"
    cfg = fe.cfg
    fe.stop()
    config = root / "fe.toml"
    config.write_text(
        "\n".join(
            [
                'role = "frontend"',
                'institution = "TEST_HOSPITAL"',
                "[dicom]",
                "allow_any_calling_ae = true",
                "[storage]",
                f'path = "{cfg.storage.path}"',
                "[database]",
                f'url = "{cfg.database.url}"',
                "[encryption]",
                "enabled = true",
                f'key_file = "{cfg.encryption.key_file}"',
                "[audit]",
                f'signing_key = "{cfg.audit.signing_key}"',
                f'export_path = "{cfg.audit.export_path}"',
            ]
        )
    )
    done = ybyx("keys", "seal-existing", "-c", str(config))
    assert done.returncode == 0, done.stderr
    assert "sealed 3 objects in place, 1 were sealed already" in done.stdout
    fe = start_frontend(root=root, encryption=SEALED)
    store = fe.archive.store
    assert isinstance(store, EncryptedBlobStore) and isinstance(store.inner, FolderBlobStore)
    for inst in fe.archive.catalog.locate({}):
        path = store.inner.local_path(inst.blob_key)
        assert path.read_bytes().startswith(MAGIC)
        assert hashlib.sha256(b"".join(store.get(inst.blob_key))).hexdigest() == inst.sha256
    victim = held[0].blob_key
    store.inner.local_path(victim).write_bytes(
        on_disk[victim] if not on_disk[victim].startswith(MAGIC) else b"x"
    )
    store.forget_cached_keys()
    with pytest.raises(SealError, match="replaced by something unsealed"):
        b"".join(store.get(victim))
