"""The S3 blob store: the storage area in an S3-compatible object store (MinIO in production).

Implements :class:`gateway.archive.blobstore.BlobStore` through the ``minio`` SDK so that the
archive code never knows which backend it writes to. The design points:

* **Streaming, bounded memory.** ``put`` hashes the bytes as the SDK reads them (a small
  hashing reader around the caller's stream); objects up to one part (16 MiB — nearly every
  DICOM instance) go up in a single PUT, bigger ones as a multipart upload of 16 MiB parts,
  uploaded one at a time, so at most about two parts are ever held in memory.
* **The checksum travels with the object.** Every object carries its SHA-256 as user metadata
  (``x-amz-meta-sha256``), so a bucket can be audited, or a catalog rebuilt, without the
  database. A single PUT sends it with the object; a multipart upload only knows the hash at the
  end, so it is attached afterwards with a metadata-only self-copy.
* **No half-written objects.** S3 makes a PUT visible only when complete, and the SDK aborts a
  multipart upload whose stream fails; a failed ``put`` therefore leaves nothing under the key
  (an earlier object under the same key is kept).
* **Errors look like the folder backend's.** A missing object raises
  :class:`~gateway.archive.blobstore.BlobNotFound`; every transport or server failure is
  re-raised as ``OSError("s3 endpoint HOST:PORT: reason")`` so callers handle one exception type
  whichever backend is configured. Errors raised by the caller's own stream pass through as-is.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO, Final, cast

import urllib3
from minio import Minio
from minio.commonconfig import REPLACE, CopySource
from minio.error import MinioException, S3Error
from minio.helpers import DictType
from urllib3.exceptions import HTTPError, MaxRetryError
from urllib3.util import Retry, Timeout

from gateway.archive.blobstore import CHUNK, BlobNotFound, sha256_file


def minio_client(
    endpoint: str,
    access_key: str,
    secret_key: str,
    *,
    secure: bool,
    region: str | None,
    read_timeout: float = 120.0,
    retries: int = 3,
    pool_size: int = 10,
) -> Minio:
    """A ``minio`` client on our own connection pool instead of the SDK default (5 retries, a 5 min
    connect timeout): a dead endpoint must fail within seconds, not minutes, so that start-up
    checks report it promptly. The one way ybyx makes S3 clients (blob store, audit export)."""
    http = urllib3.PoolManager(
        timeout=Timeout(connect=10.0, read=read_timeout),
        maxsize=pool_size,
        cert_reqs="CERT_REQUIRED" if secure else "CERT_NONE",
        retries=Retry(total=retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )
    return Minio(
        endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region, http_client=http
    )


PART_SIZE: Final = 16 << 20
"""Multipart part size; also the largest object sent as a single PUT."""

CONTENT_TYPE: Final = "application/octet-stream"
SHA256_META: Final = "x-amz-meta-sha256"

_NOT_FOUND: Final = frozenset({"NoSuchKey", "NoSuchObject", "ResourceNotFound"})
_BAD_CREDENTIALS: Final = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"}
)


class _HashingReader:
    """A read-only stream over ``source`` that counts and SHA-256-hashes every byte read.

    Also remembers an exception raised by ``source``, so that the store can tell the caller's
    stream failing (re-raised unchanged) from the object store failing (turned into ``OSError``).
    """

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self._digest = hashlib.sha256()
        self.size = 0
        self.error: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        try:
            data = self._source.read(size)
        except BaseException as exc:
            self.error = exc
            raise
        self._digest.update(data)
        self.size += len(data)
        return data

    def read_upto(self, size: int) -> bytes:
        """Read until ``size`` bytes or end of stream (``read`` may return short counts)."""
        parts: list[bytes] = []
        want = size
        while want > 0:
            data = self.read(min(want, CHUNK))
            if not data:
                break
            parts.append(data)
            want -= len(data)
        return b"".join(parts)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


class _Prefixed:
    """``head`` followed by the rest of ``tail``: hands the already-read first part to the SDK."""

    def __init__(self, head: bytes, tail: _HashingReader) -> None:
        self._head: bytes | None = head
        self._tail = tail

    def read(self, size: int = -1) -> bytes:
        head = self._head
        if head is None:
            return self._tail.read(size)
        if size < 0 or size >= len(head):
            self._head = None  # drop our reference so the part buffer can be freed once sent
            if size < 0:
                return head + self._tail.read()
            return head
        self._head = head[size:]
        return head[:size]


class S3BlobStore:
    """Objects in one bucket of an S3-compatible store; the key (plus ``prefix``) is the object name.

    ``endpoint`` is ``host:port`` (an ``http://`` or ``https://`` prefix is accepted and decides
    ``secure``). ``region`` may be left ``None`` for MinIO/SeaweedFS. With ``create_bucket`` the
    bucket is created on first use if missing; without it a missing bucket is an error reported by
    :meth:`check`. The constructor does no network I/O: call :meth:`check` at start to find
    configuration problems early.
    """

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        *,
        secure: bool = False,
        region: str | None = None,
        prefix: str = "",
        create_bucket: bool = True,
    ) -> None:
        for scheme, is_secure in (("https://", True), ("http://", False)):
            if endpoint.startswith(scheme):
                endpoint, secure = endpoint[len(scheme) :], is_secure
        endpoint = endpoint.rstrip("/")
        prefix = prefix.strip("/")
        self.endpoint = endpoint
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.create_bucket = create_bucket
        self._bucket_ready = False
        self._client = minio_client(endpoint, access_key, secret_key, secure=secure, region=region)

    def __repr__(self) -> str:
        return f"S3BlobStore({self.endpoint!r}, bucket={self.bucket!r}, prefix={self.prefix!r})"

    # -- helpers ---------------------------------------------------------------------------------

    def _name(self, key: str) -> str:
        """The object name for ``key``; refuses the keys the folder backend refuses, for parity."""
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"invalid blob key {key!r}")
        return self.prefix + key

    def _error(self, exc: BaseException) -> OSError:
        """An ``OSError`` naming the endpoint and saying why, for any SDK/transport failure."""
        if isinstance(exc, S3Error):
            code = exc.code or "error"
            if code in _BAD_CREDENTIALS:
                reason = f"credentials rejected ({code}: {exc.message})"
            elif code == "NoSuchBucket":
                reason = f"bucket {self.bucket!r} does not exist"
            else:
                reason = f"{code}: {exc.message} (bucket {self.bucket!r})"
        elif isinstance(exc, MaxRetryError):
            reason = f"unreachable ({exc.reason})"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        return OSError(f"s3 endpoint {self.endpoint}: {reason}")

    @contextmanager
    def _errors(self, key: str | None = None, source: _HashingReader | None = None) -> Iterator[None]:
        """Translate SDK errors: missing ``key`` -> BlobNotFound, anything else -> OSError."""
        try:
            yield
        except (MinioException, HTTPError) as exc:
            if source is not None and source.error is exc:
                raise  # the caller's own stream failed; not ours to rename
            if key is not None and isinstance(exc, S3Error) and exc.code in _NOT_FOUND:
                raise BlobNotFound(key) from None
            raise self._error(exc) from exc

    def _ensure_bucket(self, *, force: bool = False) -> None:
        """Make sure the bucket exists (creating it if allowed); checked once per store."""
        if self._bucket_ready and not force:
            return
        with self._errors():
            if not self._client.bucket_exists(self.bucket):
                if not self.create_bucket:
                    raise OSError(
                        f"s3 endpoint {self.endpoint}: bucket {self.bucket!r} does not exist "
                        "(and create_bucket is off)"
                    )
                try:
                    self._client.make_bucket(self.bucket)
                except S3Error as exc:
                    if exc.code != "BucketAlreadyOwnedByYou":  # lost a race with ourselves: fine
                        raise
        self._bucket_ready = True

    def _metadata(self, sha256: str) -> DictType:
        return {"Content-Type": CONTENT_TYPE, SHA256_META: sha256}

    # -- BlobStore -------------------------------------------------------------------------------

    def put(self, key: str, stream: BinaryIO) -> tuple[int, str]:
        """Stream ``stream`` into the object ``key``; return (size, sha256 hex).

        The first part is read here: if the stream ends within it, the hash is known before
        sending and the object goes up in one PUT with its checksum metadata. Otherwise the SDK
        streams a multipart upload (``length=-1``) and the checksum is attached afterwards.
        """
        name = self._name(key)
        self._ensure_bucket()
        reader = _HashingReader(stream)
        head = reader.read_upto(PART_SIZE + 1)
        if len(head) <= PART_SIZE:
            sha = reader.hexdigest()
            with self._errors():
                self._client.put_object(
                    self.bucket,
                    name,
                    io.BytesIO(head),
                    len(head),
                    content_type=CONTENT_TYPE,
                    metadata={SHA256_META: sha},
                )
            return len(head), sha

        with self._errors(source=reader):
            # One part at a time: bounded memory, and no worker threads left behind (the SDK's
            # parallel pool is never shut down when the stream fails mid-upload).
            self._client.put_object(
                self.bucket,
                name,
                cast(BinaryIO, _Prefixed(head, reader)),  # the SDK only calls read()
                -1,
                content_type=CONTENT_TYPE,
                part_size=PART_SIZE,
                num_parallel_uploads=1,
            )
        del head
        sha = reader.hexdigest()
        try:
            with self._errors():
                self._client.copy_object(
                    self.bucket,
                    name,
                    CopySource(self.bucket, name),
                    metadata=self._metadata(sha),
                    metadata_directive=REPLACE,
                )
        except OSError:
            self._discard(name)  # an object without its checksum must not pass for a stored one
            raise
        return reader.size, sha

    def put_file(self, key: str, path: Path, *, known: tuple[int, str] | None = None) -> tuple[int, str]:
        """Upload the file at ``path`` (known length); return (size, sha256).

        The file is hashed first so the checksum can go with the upload, and hashed again as it
        is sent: if the two differ (the file changed underneath us) the object is removed and
        ``OSError`` raised, so what is stored always matches what is returned.
        """
        name = self._name(key)
        self._ensure_bucket()
        size, sha = known or sha256_file(path)
        with path.open("rb") as fh:
            reader = _HashingReader(fh)
            with self._errors(source=reader):
                self._client.put_object(
                    self.bucket,
                    name,
                    cast(BinaryIO, reader),  # the SDK only calls read()
                    size,
                    content_type=CONTENT_TYPE,
                    metadata={SHA256_META: sha},
                    part_size=PART_SIZE,
                    num_parallel_uploads=1,
                )
        if (reader.size, reader.hexdigest()) != (size, sha):
            self._discard(name)
            raise OSError(f"{path}: changed while being uploaded to {self!r}")
        return size, sha

    def get(self, key: str) -> Iterator[bytes]:
        """The object's bytes in chunks of up to 1 MiB; raises :class:`BlobNotFound` at once.

        The HTTP response is opened here (so a missing key fails before iteration) and closed and
        returned to the pool when the iterator is exhausted or closed.
        """
        name = self._name(key)
        with self._errors(key):
            response = self._client.get_object(self.bucket, name)
        return self._chunks(response)

    def _chunks(self, response: Any) -> Iterator[bytes]:
        try:
            with self._errors():
                yield from response.stream(CHUNK)
        finally:
            response.close()
            response.release_conn()

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` via a ranged GET (fewer at the end, none past it)."""
        if offset < 0 or length < 0:
            raise ValueError(f"invalid range offset={offset} length={length}")
        name = self._name(key)
        if length == 0:
            if not self.exists(key):
                raise BlobNotFound(key)
            return b""
        with self._errors(key):
            try:
                response = self._client.get_object(self.bucket, name, offset=offset, length=length)
            except S3Error as exc:
                # S3 answers 416 for a range starting at/after the end; the folder backend reads b"".
                if exc.code == "InvalidRange":
                    return b""
                raise
        try:
            with self._errors(key):
                data: bytes = response.read()
                return data
        finally:
            response.close()
            response.release_conn()

    def exists(self, key: str) -> bool:
        try:
            self._stat(key)
        except BlobNotFound:
            return False
        return True

    def _stat(self, key: str) -> Any:
        with self._errors(key):
            return self._client.stat_object(self.bucket, self._name(key))

    def stored_sha256(self, key: str) -> str | None:
        """The SHA-256 recorded on the object at upload (``None`` if it carries none)."""
        value = self._stat(key).metadata.get(SHA256_META)
        return str(value) if value is not None else None

    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error."""
        name = self._name(key)
        try:
            with self._errors(key):
                self._client.remove_object(self.bucket, name)
        except BlobNotFound:
            pass

    def _discard(self, name: str) -> None:
        """Best-effort removal after a failed upload; the original error is what matters."""
        with suppress(MinioException, HTTPError):
            self._client.remove_object(self.bucket, name)

    def check(self) -> None:
        """Raise ``OSError`` with the reason unless the bucket is reachable and writable.

        Makes sure the bucket exists (creating it if allowed), then writes, reads back and
        deletes a small probe object, so bad credentials, a read-only policy or a dead endpoint
        are reported at start rather than on the first stored instance.
        """
        self._ensure_bucket(force=True)
        probe = f"{self.prefix}.probe-{uuid.uuid4().hex}"
        payload = b"ybyx-probe"
        with self._errors():
            self._client.put_object(self.bucket, probe, io.BytesIO(payload), len(payload))
            try:
                response = self._client.get_object(self.bucket, probe)
                try:
                    echoed = response.read()
                finally:
                    response.close()
                    response.release_conn()
            finally:
                self._client.remove_object(self.bucket, probe)
        if echoed != payload:
            raise OSError(f"s3 endpoint {self.endpoint}: probe object read back wrong in {self.bucket!r}")
