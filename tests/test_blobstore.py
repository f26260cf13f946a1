"""One behaviour suite for every blob store backend: the folder store and S3 (a real SeaweedFS).

Each test runs against both backends through the ``store`` fixture, so the archive can rely on
the same semantics whichever backend is configured. Backend-only tests are marked by name.
"""

from __future__ import annotations

import hashlib
import io
import random
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from minio import Minio

from gateway.archive.blobstore import CHUNK, BlobNotFound, BlobStore, FolderBlobStore
from gateway.archive.catalog import Catalog
from gateway.archive.encrypted import DataKeys, EncryptedBlobStore
from gateway.archive.s3 import PART_SIZE, S3BlobStore
from gateway.security.kms import LocalKms
from tests.peers.ports import free_port
from tests.peers.seaweedfs import (
    S3Endpoint,
    seaweedfs,  # noqa: F401  (session fixture used via getfixturevalue)
)


class StreamBroke(RuntimeError):
    """Raised by :class:`FailingStream`; must reach the caller of ``put`` unchanged."""


class TrickleStream(io.BytesIO):
    """A stream that returns at most ``step`` bytes per read, like a socket does."""

    def __init__(self, data: bytes, step: int = 100_003) -> None:
        super().__init__(data)
        self.step = step

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > self.step:
            size = self.step
        return super().read(size)


class FailingStream(io.BytesIO):
    """Yields ``fail_after`` bytes of ``data``, then raises :class:`StreamBroke`."""

    def __init__(self, data: bytes, fail_after: int) -> None:
        super().__init__(data)
        self.fail_after = fail_after

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() >= self.fail_after:
            raise StreamBroke(f"stream broke after {self.fail_after} bytes")
        limit = self.fail_after - self.tell()
        if size is None or size < 0 or size > limit:
            size = limit
        return super().read(size)


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_all(store: BlobStore, key: str) -> bytes:
    return b"".join(store.get(key))


def s3_client(ep: S3Endpoint) -> Minio:
    return Minio(ep.endpoint, access_key=ep.access_key, secret_key=ep.secret_key, secure=False)


def leftovers(store: BlobStore) -> list[str]:
    """Everything the backend holds: files (incl. temp files) or objects and pending uploads."""
    if isinstance(store, EncryptedBlobStore):
        store = store.inner
    if isinstance(store, FolderBlobStore):
        return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())
    assert isinstance(store, S3BlobStore)
    client = store._client
    names = [o.object_name for o in client.list_objects(store.bucket, recursive=True)]
    pending = client._list_multipart_uploads(store.bucket)
    return sorted(names) + [f"upload:{u.object_name}" for u in pending.uploads]


@contextmanager
def fresh_s3_store(ep: S3Endpoint, **options: Any) -> Iterator[S3BlobStore]:
    """An S3 store on a new, empty bucket (``t-<12 hex>``), removed again afterwards."""
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    s3 = S3BlobStore(ep.endpoint, ep.access_key, ep.secret_key, bucket, **options)
    s3.check()  # creates the bucket
    try:
        yield s3
    finally:
        client = s3_client(ep)
        for obj in client.list_objects(bucket, recursive=True):
            client.remove_object(bucket, obj.object_name)
        client.remove_bucket(bucket)  # a bucket is a SeaweedFS collection: frees its volumes


def sealed(inner: BlobStore, folder: Path) -> EncryptedBlobStore:
    """``inner`` behind envelope encryption (issue 6 §5), keys in a catalog and a local KMS."""
    catalog = Catalog.open(f"sqlite:///{folder / 'keys.db'}")
    return EncryptedBlobStore(inner, DataKeys(catalog, LocalKms(folder / "kek.json", create=True)))


@pytest.fixture(params=["folder", "s3", "folder-sealed", "s3-sealed"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    backend, _, seal = str(request.param).partition("-")
    if backend == "folder":
        inner: BlobStore = FolderBlobStore(tmp_path / "blobs")
        yield sealed(inner, tmp_path) if seal else inner
    else:
        with fresh_s3_store(request.getfixturevalue("seaweedfs")) as s3:
            yield sealed(s3, tmp_path) if seal else s3


@pytest.fixture
def s3_store(seaweedfs: S3Endpoint) -> Iterator[S3BlobStore]:  # noqa: F811
    with fresh_s3_store(seaweedfs) as s3:
        yield s3


# -- round trips ---------------------------------------------------------------------------------


def test_put_get_round_trip(store: BlobStore) -> None:
    data = payload(300_000)
    size, digest = store.put("1.2.3/4.5.6/7.8.9.dcm", io.BytesIO(data))
    assert (size, digest) == (len(data), sha(data))
    assert store.exists("1.2.3/4.5.6/7.8.9.dcm")
    chunks = list(store.get("1.2.3/4.5.6/7.8.9.dcm"))
    assert all(0 < len(c) <= CHUNK for c in chunks)
    assert b"".join(chunks) == data


def test_put_empty_object(store: BlobStore) -> None:
    assert store.put("empty", io.BytesIO(b"")) == (0, sha(b""))
    assert store.exists("empty")
    assert read_all(store, "empty") == b""
    assert store.read_range("empty", 0, 10) == b""


@pytest.mark.parametrize(
    "size",
    [PART_SIZE, PART_SIZE + 1, 2 * PART_SIZE + 12_345],
    ids=["one-part", "part+1", "three-parts"],
)
def test_put_large_streams(store: BlobStore, size: int) -> None:
    """Objects around and above the part size (multipart on S3), fed in short reads."""
    data = payload(size, seed=size)
    assert store.put("big/object", TrickleStream(data)) == (size, sha(data))
    got = read_all(store, "big/object")
    assert len(got) == size
    assert sha(got) == sha(data)


@pytest.mark.parametrize("size", [1000, PART_SIZE + 5], ids=["small", "multipart"])
def test_put_file(store: BlobStore, tmp_path: Path, size: int) -> None:
    data = payload(size, seed=7)
    src = tmp_path / "spool.dcm"
    src.write_bytes(data)
    assert store.put_file("from/file", src) == (size, sha(data))
    src.unlink()  # the caller may drop its own name for the file afterwards
    assert read_all(store, "from/file") == data


def test_overwrite_replaces_content(store: BlobStore) -> None:
    store.put("k", io.BytesIO(b"first version, rather long"))
    assert store.put("k", io.BytesIO(b"second")) == (6, sha(b"second"))
    assert read_all(store, "k") == b"second"
    assert store.read_range("k", 0, 100) == b"second"


# -- ranges, existence, deletion -------------------------------------------------------------------


def test_read_range(store: BlobStore) -> None:
    data = payload(10_000, seed=3)
    store.put("r", io.BytesIO(data))
    assert store.read_range("r", 1234, 500) == data[1234:1734]  # middle
    assert store.read_range("r", 0, 1) == data[:1]
    assert store.read_range("r", 9_990, 100) == data[9_990:]  # runs past the end: fewer bytes
    assert store.read_range("r", 10_000, 10) == b""  # starts at the end
    assert store.read_range("r", 20_000, 10) == b""  # starts past the end
    with pytest.raises(BlobNotFound):
        store.read_range("missing", 0, 10)


def test_exists_and_delete(store: BlobStore) -> None:
    assert not store.exists("d/x")
    store.put("d/x", io.BytesIO(b"payload"))
    assert store.exists("d/x")
    store.delete("d/x")
    assert not store.exists("d/x")
    with pytest.raises(BlobNotFound):
        store.get("d/x")
    store.delete("d/x")  # already gone: fine
    store.delete("never/stored")  # never existed: fine
    assert leftovers(store) == []


def test_get_missing_raises_blob_not_found(store: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        store.get("no/such/key")  # raised at once, not on first iteration


def test_check_passes_on_a_working_store(store: BlobStore) -> None:
    store.check()
    assert leftovers(store) == []  # the probe is cleaned up


@pytest.mark.parametrize("key", ["../escape", "a/../../b", "a/..", "/absolute", ""])
def test_unsafe_keys_refused(store: BlobStore, key: str) -> None:
    """The folder store must not escape its root; S3 refuses the same keys so both stay portable."""
    with pytest.raises(ValueError):
        store.put(key, io.BytesIO(b"x"))
    with pytest.raises(ValueError):
        store.get(key)
    assert leftovers(store) == []


# -- failures --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fail_after",
    [1 << 20, PART_SIZE + (3 << 20)],
    ids=["in-first-part", "mid-multipart"],
)
def test_failing_stream_leaves_no_object(store: BlobStore, fail_after: int) -> None:
    data = payload(fail_after + (1 << 20))
    with pytest.raises(StreamBroke):  # the stream's own error, not rewrapped
        store.put("half/written", FailingStream(data, fail_after))
    assert not store.exists("half/written")
    with pytest.raises(BlobNotFound):
        store.get("half/written")
    assert leftovers(store) == []  # no temp file, no object, no pending multipart upload


def test_failing_overwrite_keeps_previous_object(store: BlobStore) -> None:
    store.put("k", io.BytesIO(b"good"))
    with pytest.raises(StreamBroke):
        store.put("k", FailingStream(payload(1 << 20), 1000))
    assert read_all(store, "k") == b"good"


# -- S3 only ---------------------------------------------------------------------------------------


def test_s3_check_unreachable_endpoint_names_it() -> None:
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there
    store = S3BlobStore(endpoint, "AKNOBODY", "secret-nobody", "t-unreachable")
    with pytest.raises(OSError, match=rf"^s3 endpoint {endpoint}: unreachable"):
        store.check()


def test_s3_check_bad_credentials(seaweedfs: S3Endpoint) -> None:  # noqa: F811
    store = S3BlobStore(seaweedfs.endpoint, seaweedfs.access_key, "wrong-secret", "t-badcreds")
    with pytest.raises(OSError, match=rf"^s3 endpoint {seaweedfs.endpoint}: credentials rejected"):
        store.check()


def test_s3_check_missing_bucket_without_create(seaweedfs: S3Endpoint) -> None:  # noqa: F811
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    store = S3BlobStore(
        seaweedfs.endpoint, seaweedfs.access_key, seaweedfs.secret_key, bucket, create_bucket=False
    )
    with pytest.raises(OSError, match="does not exist"):
        store.check()
    assert not s3_client(seaweedfs).bucket_exists(bucket)


@pytest.mark.parametrize("size", [1000, PART_SIZE + 1], ids=["single-put", "multipart"])
def test_s3_object_carries_sha256_metadata(s3_store: S3BlobStore, size: int, tmp_path: Path) -> None:
    data = payload(size, seed=11)
    s3_store.put("meta/put", io.BytesIO(data))
    src = tmp_path / "f"
    src.write_bytes(data)
    s3_store.put_file("meta/file", src)
    assert s3_store.stored_sha256("meta/put") == sha(data)
    assert s3_store.stored_sha256("meta/file") == sha(data)
    for key in ("meta/put", "meta/file"):
        stat = s3_store._client.stat_object(s3_store.bucket, key)
        assert stat.content_type == "application/octet-stream"  # kept through the metadata copy


def test_s3_prefix_places_objects_below_it(seaweedfs: S3Endpoint) -> None:  # noqa: F811
    with fresh_s3_store(seaweedfs, prefix="/archive/") as s3:
        s3.put("a/b", io.BytesIO(b"x"))
        names = [o.object_name for o in s3._client.list_objects(s3.bucket, recursive=True)]
        assert names == ["archive/a/b"]
        assert read_all(s3, "a/b") == b"x"
        assert s3.exists("a/b")
