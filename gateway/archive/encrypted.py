"""Encryption at rest: a blob store that seals every object before the backend sees it.

R-SE-10, R-SE-14, issue 6 §5. :class:`EncryptedBlobStore` wraps any :class:`BlobStore` (folder or
S3) and implements the same interface, so the archive above it does not change: ``put`` returns the
*plaintext's* size and SHA-256 (the catalog's hash is of the bytes a client gets back), ``get`` and
``read_range`` return plaintext. What reaches the disk or the bucket is the sealed form of
``gateway/security/envelope.py``: a header, then AES-256-GCM segments of 64 KiB, so a WADO-RS frame
read opens only the segments it touches.

Each object version has its own random data key (DEK). The DEK is kept wrapped by the KMS's
current key-encryption key in the catalog table ``data_keys`` (:class:`DataKeys`), keyed by the id
written in the object's header — never inside the object, because a KEK rotation must re-wrap
every DEK without rewriting objects (S3 objects cannot be partially rewritten). The row is
committed *before* the object is written: a crash in between leaves an unused row, never an object
without its key.

Unwrapped DEKs are cached in memory for a short time (``cache_seconds``), so the many range reads
of one WADO request do not each ask the KMS; a destroyed KEK therefore stops reads within that
time. Key material never appears in logs or errors.
"""

from __future__ import annotations

import base64
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import delete, func, insert, select, update

from gateway.archive.blobstore import CHUNK, BlobStore
from gateway.archive.catalog import Catalog
from gateway.archive.schema import data_keys
from gateway.security.envelope import (
    HEADER_SIZE,
    SEGMENT_SIZE,
    Header,
    KeyGone,
    SealError,
    SealingReader,
    new_data_key,
    open_segments,
    open_stream,
)
from gateway.security.kms import KeyDestroyed, Kms, KmsError
from gateway.security.transfer_keys import ITK, TOMBSTONE, TransferKeys


def _context(dek_id: str) -> bytes:
    """What a wrapped DEK is bound to: its id (a row copied onto another object does not open)."""
    return b"|ybyx-dek|" + dek_id.encode()


def _check_key(key: str) -> None:
    # the same rule as the folder store, applied before the catalog is touched (both backends)
    if not key or key.startswith("/") or ".." in key.split("/"):
        raise ValueError(f"invalid blob key {key!r}")


@dataclass(frozen=True)
class Rewrapped:
    """What a rotation did: data keys re-wrapped, and those that could not be (KEK destroyed)."""

    rewrapped: int
    unreadable: int


class DataKeys:
    """The ``data_keys`` table: wrapped DEKs of sealed objects (see the module docstring)."""

    def __init__(self, catalog: Catalog, kms: Kms) -> None:
        self.catalog = catalog
        self.kms = kms
        self.transfer = TransferKeys(catalog, kms)  # per-institution transfer keys (R-CE-2)

    def add(self, blob_key: str, dek_id: str, dek: bytes) -> None:
        # an institution's upload: wrapped by its transfer key (which the KEK wraps), else the KEK
        by_institution = None if blob_key.startswith(":") else self.transfer.wrap(dek_id, dek)
        if by_institution is not None:
            kek, wrapped = by_institution
        else:
            kek = self.kms.active()
            wrapped = base64.b64encode(self.kms.wrap(kek, dek, _context(dek_id))).decode()
        with self.catalog.write() as conn:
            if conn.dialect.name == "postgresql":
                # No WAL flush of its own: the catalog commit that references the object (ingest
                # acknowledges only after it) flushes the WAL past this row too — one fsync fewer.
                conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
            conn.execute(
                insert(data_keys).values(
                    dek_id=dek_id,
                    blob_key=blob_key,
                    kek_id=kek,
                    wrapped=wrapped,
                    created_at=datetime.now(UTC),
                )
            )

    def get(self, dek_id: str, where: str) -> bytes:
        with self.catalog.engine.connect() as conn:
            row = conn.execute(
                select(data_keys.c.kek_id, data_keys.c.wrapped).where(data_keys.c.dek_id == dek_id)
            ).first()
        if row is None:
            raise KeyGone(f"{where}: its data key {dek_id} is not in the catalog (deleted or shredded)")
        return self._open(row.kek_id, row.wrapped, dek_id, where)

    def gone(self, blob_keys: Sequence[str], *, batch: int = 500) -> dict[str, str | None]:
        """For each of ``blob_keys`` that has data keys: None when one opens, else why none does
        (:class:`KeyGone`, crypto-shredded). One catalog query per ``batch`` keys and an unwrap
        per data key (the KMS or the cached transfer key), no object read. Keys without any data
        key row are left out (a plain object from before encryption, or its row deleted):
        :meth:`EncryptedBlobStore.gone` reads their header."""
        out: dict[str, str | None] = {}
        c = data_keys.c
        for start in range(0, len(blob_keys), batch):
            chunk = list(dict.fromkeys(blob_keys[start : start + batch]))
            with self.catalog.engine.connect() as conn:
                rows = conn.execute(
                    select(c.blob_key, c.dek_id, c.kek_id, c.wrapped).where(c.blob_key.in_(chunk))
                ).all()
            reasons: dict[str, str | None] = {}  # blob key -> None once one of its data keys opens
            for r in rows:
                if reasons.get(r.blob_key, "") is None:
                    continue
                try:
                    self._open(r.kek_id, r.wrapped, r.dek_id, f"blob {r.blob_key}")
                    reasons[r.blob_key] = None
                except KeyGone as exc:
                    reasons[r.blob_key] = str(exc)
            out.update(reasons)
        return out

    def _open(self, kek_id: str, wrapped: str, dek_id: str, where: str) -> bytes:
        if kek_id.startswith(ITK):  # under an institution's transfer key (R-CE-2)
            return self.transfer.unwrap(kek_id, wrapped, dek_id, where)
        try:
            return self.kms.unwrap(kek_id, base64.b64decode(wrapped), _context(dek_id))
        except KeyDestroyed as exc:
            raise KeyGone(f"{where}: unreadable, {exc}") from None

    def forget(self, blob_key: str, *, keep: str | None = None) -> None:
        """Drop the DEKs of ``blob_key`` (all, or all but ``keep``): those versions are gone."""
        cond = data_keys.c.blob_key == blob_key
        if keep is not None:
            cond = cond & (data_keys.c.dek_id != keep)
        with self.catalog.write() as conn:
            conn.execute(delete(data_keys).where(cond))

    def drop(self, dek_id: str) -> None:
        with self.catalog.write() as conn:
            conn.execute(delete(data_keys).where(data_keys.c.dek_id == dek_id))

    def sealed(self, blob_key: str) -> bool:
        """Whether any version of ``blob_key`` was ever sealed (it has a data key)."""
        with self.catalog.engine.connect() as conn:
            row = conn.execute(
                select(data_keys.c.id).where(data_keys.c.blob_key == blob_key).limit(1)
            ).first()
        return row is not None

    def counts(self) -> dict[str, int]:
        """Data keys per KEK id."""
        with self.catalog.engine.connect() as conn:
            rows = conn.execute(select(data_keys.c.kek_id, func.count()).group_by(data_keys.c.kek_id)).all()
        return {str(r[0]): int(r[1]) for r in rows}

    def rewrap(self, to: str | None = None, *, batch: int = 500) -> Rewrapped:
        """Re-wrap every DEK not under KEK ``to`` (default: the active one). Objects are untouched.

        Rows under a destroyed KEK cannot be opened and are counted as unreadable (left as they are).
        Restartable: an interrupted rotation is finished by running it again.
        """
        target = to or self.kms.active()
        done = lost = 0
        last_id = 0
        while True:
            with self.catalog.engine.connect() as conn:
                rows = conn.execute(
                    select(data_keys.c.id, data_keys.c.dek_id, data_keys.c.kek_id, data_keys.c.wrapped)
                    .where(
                        data_keys.c.kek_id != target,
                        data_keys.c.id > last_id,
                        # transfer-key-wrapped data keys follow their transfer key, which is re-wrapped
                        ~data_keys.c.kek_id.like(ITK + "%"),
                        data_keys.c.kek_id != TOMBSTONE,
                    )
                    .order_by(data_keys.c.id)
                    .limit(batch)
                ).all()
            if not rows:
                return Rewrapped(done, lost)
            last_id = int(rows[-1].id)
            updates: list[tuple[int, str, str]] = []
            for r in rows:
                ctx = _context(r.dek_id)
                try:
                    dek = self.kms.unwrap(r.kek_id, base64.b64decode(r.wrapped), ctx)
                except KmsError:
                    lost += 1
                    continue
                wrapped = base64.b64encode(self.kms.wrap(target, dek, ctx)).decode()
                updates.append((int(r.id), r.kek_id, wrapped))
            now = datetime.now(UTC)
            with self.catalog.write() as conn:
                for row_id, old_kek, wrapped in updates:
                    # only if nobody re-wrapped it meanwhile (a concurrent rotation)
                    conn.execute(
                        update(data_keys)
                        .where(data_keys.c.id == row_id, data_keys.c.kek_id == old_kek)
                        .values(kek_id=target, wrapped=wrapped, rewrapped_at=now)
                    )
            done += len(updates)


class _ChunkStream:
    """A read-only stream over an iterator of chunks (a blob being re-written sealed)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buf) < size:
            nxt = next(self._chunks, None)
            if nxt is None:
                break
            self._buf += nxt
        if size < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:size], self._buf[size:]
        return out


_PLAIN = Header(0, "", b"", b"")  # cache marker: a plain object from before encryption


class _KeyCache:
    """Recently used (header, DEK) per blob key, for ``ttl`` seconds (thread-safe LRU)."""

    def __init__(self, size: int, ttl: float) -> None:
        self._items: OrderedDict[str, tuple[float, Header, bytes]] = OrderedDict()
        self._lock = threading.Lock()
        self._size = size
        self._ttl = ttl

    def get(self, key: str) -> tuple[Header, bytes] | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if time.monotonic() - item[0] > self._ttl:
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return item[1], item[2]

    def put(self, key: str, header: Header, dek: bytes) -> None:
        with self._lock:
            self._items[key] = (time.monotonic(), header, dek)
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def drop(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class EncryptedBlobStore:
    """A :class:`BlobStore` sealing every object into ``inner`` (see the module docstring)."""

    def __init__(
        self,
        inner: BlobStore,
        keys: DataKeys,
        *,
        segment_size: int = SEGMENT_SIZE,
        cache_seconds: float = 60.0,
        cache_size: int = 1024,
    ) -> None:
        self.inner = inner
        self.keys = keys
        self.segment_size = segment_size
        self._cache = _KeyCache(cache_size, cache_seconds)
        keys.transfer.cache_seconds = min(keys.transfer.cache_seconds, cache_seconds)

    def __repr__(self) -> str:
        return f"EncryptedBlobStore({self.inner!r})"

    # ---- writing ---------------------------------------------------------------------------

    def put(self, key: str, stream: BinaryIO) -> tuple[int, str]:
        _check_key(key)
        header = Header.new(self.segment_size)
        dek = new_data_key()
        self.keys.add(key, header.key_id, dek)  # durable before the object that needs it
        reader = SealingReader(stream, header, dek)
        try:
            self.inner.put(key, reader)  # type: ignore[arg-type]  # a read-only stream is enough
        except BaseException:
            with suppress(Exception):  # an unused row is harmless; the put's own error matters
                self.keys.drop(header.key_id)
            raise
        self._cache.drop(key)
        self.keys.forget(key, keep=header.key_id)  # an overwritten version's key goes with it
        return reader.size, reader.hexdigest()

    def put_file(self, key: str, path: Path, *, known: tuple[int, str] | None = None) -> tuple[int, str]:
        """Seal a copy of the file (it cannot be linked into place: the store holds ciphertext)."""
        with path.open("rb") as fh:
            return self.put(key, fh)

    # ---- reading ---------------------------------------------------------------------------

    def _key(self, key: str, *, fresh: bool = False) -> tuple[Header, bytes] | None:
        """The object's header and data key; None for a plain object stored before encryption was
        switched on (no data key was ever made for its key: see :meth:`seal_existing`)."""
        _check_key(key)
        if not fresh and (hit := self._cache.get(key)) is not None:
            return None if hit[0] is _PLAIN else hit
        head = self.inner.read_range(key, 0, HEADER_SIZE)
        try:
            header = Header.parse(head, f"blob {key}")
        except SealError:
            if self.keys.sealed(key):  # it was sealed: plaintext in its place is tampering
                raise SealError(f"blob {key}: sealed object replaced by something unsealed") from None
            self._cache.put(key, _PLAIN, b"")
            return None
        dek = self.keys.get(header.key_id, f"blob {key}")
        self._cache.put(key, header, dek)
        return header, dek

    def get(self, key: str) -> Iterator[bytes]:
        found = self._key(key, fresh=True)  # raises BlobNotFound at once, like the backends
        body = self.inner.get(key)
        if found is None:
            return body
        return self._plain(key, found[0], found[1], body)

    def gone(self, keys: Sequence[str]) -> dict[str, str]:
        """Which of the objects ``keys`` can no longer be read because their data key was destroyed
        (:class:`KeyGone`: crypto-shredding), with the reason. WADO-RS asks before a response
        starts, so a shredded object is a clear status rather than a body that breaks off. Data
        keys are checked in batches from the catalog; an object without any (stored plain before
        encryption, or its key row deleted) has its header read."""
        judged = self.keys.gone(keys)
        found = {key: why for key, why in judged.items() if why is not None}
        for key in keys:
            if key not in judged:
                try:
                    self._key(key, fresh=True)
                except KeyGone as exc:
                    found[key] = str(exc)
        return found

    def is_sealed(self, key: str) -> bool:
        return self._key(key, fresh=True) is not None

    def seal_existing(self, key: str) -> tuple[int, str] | None:
        """Seal a plain object in place (after encryption was switched on for an archive that
        held plain objects); its (size, sha256), or None when it is sealed already."""
        if self.is_sealed(key):
            return None
        return self.put(key, _ChunkStream(self.inner.get(key)))  # type: ignore[arg-type]

    def _plain(self, key: str, header: Header, dek: bytes, body: Iterator[bytes]) -> Iterator[bytes]:
        skip = HEADER_SIZE

        def after_header() -> Iterator[bytes]:
            nonlocal skip
            for chunk in body:
                if skip:
                    cut = min(skip, len(chunk))
                    chunk = chunk[cut:]
                    skip -= cut
                if chunk:
                    yield chunk

        buf = bytearray()
        for plain in open_stream(header, dek, after_header(), where=f"blob {key}"):
            buf += plain
            while len(buf) >= CHUNK:
                yield bytes(buf[:CHUNK])
                del buf[:CHUNK]
        if buf:
            yield bytes(buf)

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        try:
            return self._read_range(key, offset, length, fresh=False)
        except SealError:
            # the object may have been replaced by a new version (another DEK) since it was cached
            self._cache.drop(key)
            return self._read_range(key, offset, length, fresh=True)

    def _read_range(self, key: str, offset: int, length: int, *, fresh: bool) -> bytes:
        found = self._key(key, fresh=fresh)
        if found is None:
            return self.inner.read_range(key, offset, length)
        header, dek = found
        size = header.segment_size
        first, last = offset // size, (offset + length - 1) // size
        start = HEADER_SIZE + first * header.stride
        want = (last - first + 1) * header.stride
        data = self.inner.read_range(key, start, want + 1)  # one byte more: is the last one final?
        more = len(data) > want
        plain = open_segments(header, dek, first, data[:want], more=more, where=f"blob {key}")
        skip = offset - first * size
        return plain[skip : skip + length]

    # ---- the rest --------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        _check_key(key)
        return self.inner.exists(key)

    def delete(self, key: str) -> None:
        _check_key(key)
        self.inner.delete(key)
        self._cache.drop(key)
        self.keys.forget(key)

    def check(self) -> None:
        self.inner.check()
        try:
            self.keys.kms.active()
        except KmsError as exc:
            raise OSError(f"encryption: {exc}") from exc

    def forget_cached_keys(self) -> None:
        """Drop every cached DEK (after a key was destroyed in this process)."""
        self._cache.clear()
        self.keys.transfer.forget_cached_keys()


def shredded(store: BlobStore, keys: Sequence[str]) -> dict[str, str]:
    """The objects of ``keys`` whose data key was destroyed, with the reason ({} for a store
    that does not seal: nothing in it can be shredded)."""
    return store.gone(keys) if isinstance(store, EncryptedBlobStore) else {}
