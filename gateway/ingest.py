"""Durable ingest: a received Part-10 file becomes a stored, catalogued instance, or is refused.

The one domain entry point behind C-STORE (``dimse/``) and, later, STOW-RS (``dicomweb/``). The
edges only translate :class:`Accepted` / :class:`Refused` into their protocol's statuses.

Order of work (ARCHITECTURE "the data path"):

1. read the header only (``stop_before_pixels``): pixel data is passed through, never decoded;
2. check the structure: required UIDs valid, the pixel data element complete (a truncated file is
   caught here), the SOP Instance UID the sender announced matches the one in the data;
3. hash, fsync and place the bytes in the blob store under a content-addressed key;
4. catalogue in one transaction (committed with ``synchronous=FULL`` on SQLite).

Only then is the sender told *success*. A crash between 3 and 4 leaves an unreferenced blob and no
acknowledgement; the sender's retry lands on the same key.

For speed (issue 2 "Numbers"), the kernel is asked to start writing the received file to disk the
moment ingest begins (folder store: the spool file *is* the blob), and the catalog record is built
before the blob is placed, so the fsync in step 3 mostly finds the data written already. The order
that matters is kept: the blob is durable before the catalog transaction commits, and both before
the answer.

Refused files are moved to the quarantine folder with a ``.reason.txt`` beside them, for the admin
(issue 2 §6).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import struct
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian
from sqlalchemy import Connection, select

from gateway.archive.blobstore import BlobStore, FolderBlobStore, sha256_file
from gateway.archive.catalog import AddOutcome, Catalog, ConflictPolicy
from gateway.archive.record import InstanceRecord, InvalidInstance
from gateway.archive.schema import instance_versions, instances
from gateway.audit import Actor, AuditLog, EventType, Result
from gateway.workpool import ChildPool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Accepted:
    """The instance is durable and catalogued."""

    sop_uid: str
    sop_class_uid: str
    study_uid: str
    outcome: AddOutcome
    sha256: str
    size: int


@dataclass(frozen=True)
class Refused:
    """The instance was not stored; ``reason`` says why in words an admin can act on."""

    reason: str
    kind: str  # "malformed" | "missing-attribute" | "mismatch" | "storage"
    sop_uid: str | None = None
    quarantined: Path | None = None


def blob_key(study: str, series: str, sop: str, sha256: str) -> str:
    """Content-addressed key: a new version of an instance never overwrites the old bytes."""
    return f"{study}/{series}/{sop}.{sha256[:16]}.dcm"


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux/glibc: no early write-back, fsync does it all
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start write-out of the dirty pages; do not wait (linux/fs.h)


def _start_writeback(path: Path) -> None:
    """Ask the kernel to start writing ``path``'s data to disk now, without waiting for it.

    Not a durability step (the blob store's fsync is): it lets the disk work while the header is
    checked and the record built, so that fsync waits ~0.3 ms less (measured, 526 KB CT slices).
    A thread doing the fsync instead cost more CPU than it saved on 2 cores (GIL hand-overs).
    """
    if _sync_file_range is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # the real read below reports it
    try:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
    finally:
        os.close(fd)


def _read_header(fh: BinaryIO) -> tuple[Dataset, int | None]:
    """The dataset without pixel data, and the offset of the pixel data element (None if absent)."""
    ds = dcmread(fh, stop_before_pixels=True)
    offset = fh.tell()
    fh.seek(0, os.SEEK_END)
    return ds, (offset if fh.tell() > offset else None)


@dataclass(frozen=True)
class PixelValue:
    """Where the Pixel Data (7FE0,0010) value is in the file (catalog ``pixel_offset``)."""

    offset: int  # first byte of the value (encapsulated: the Basic Offset Table item's tag)
    length: int | None  # None: undefined length (encapsulated)


def _check_pixel_element(
    fh: BinaryIO, offset: int, size: int, transfer_syntax: str
) -> tuple[bool, PixelValue | None]:
    """Whether the pixel data element at ``offset`` is complete in a file of ``size`` bytes, and
    where its value is when it is Pixel Data (7FE0,0010).

    pydicom's header read stops before the element, so a file cut short in its pixel data would
    look fine; here the element's length (or, when encapsulated, its sequence delimiter) is checked
    against the file's end without reading the pixel bytes.
    """
    fh.seek(offset)
    head = fh.read(12)
    if len(head) < 8:
        return False, None
    big = transfer_syntax == ExplicitVRBigEndian
    endian = ">" if big else "<"
    group, elem = struct.unpack(f"{endian}HH", head[:4])
    if group != 0x7FE0:
        # trailing non-pixel elements (e.g. padding); pydicom parsed everything before
        return True, None
    if transfer_syntax == ImplicitVRLittleEndian:
        (length,) = struct.unpack("<I", head[4:8])
        start = offset + 8
    elif head[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"UN", b"OV"):
        if len(head) < 12:
            return False, None
        (length,) = struct.unpack(f"{endian}I", head[8:12])
        start = offset + 12
    else:
        (length,) = struct.unpack(f"{endian}H", head[6:8])
        start = offset + 8
    value = PixelValue(start, None if length == 0xFFFFFFFF else length) if elem == 0x0010 else None
    if length == 0xFFFFFFFF:
        # Encapsulated: the value ends with a sequence delimitation item (FFFE,E0DD). It is
        # normally the file's last 8 bytes; allow a little trailing padding after it.
        tail_len = min(size - start, 4096)
        fh.seek(size - tail_len)
        return b"\xfe\xff\xdd\xe0\x00\x00\x00\x00" in fh.read(tail_len), value
    return start + length <= size, value


def _frame_location(ds: Dataset, transfer_syntax: str, value: PixelValue | None) -> PixelValue | None:
    """``value`` if WADO-RS frames can be cut from it with the catalog's columns alone.

    Not for big-endian native data (frames are byte-swapped), native YBR_FULL_422 (two samples per
    pixel) or BitsAllocated not a whole number of bytes: those keep parsing the header per request.
    """
    if value is None or transfer_syntax == ExplicitVRBigEndian:
        return None
    if value.length is None:
        return value
    if str(ds.get("PhotometricInterpretation", "")) == "YBR_FULL_422":
        return None
    bits = ds.get("BitsAllocated")
    if not isinstance(bits, int) or bits <= 0 or bits % 8:
        return None
    return value


@dataclass(frozen=True)
class Unfit:
    """The data set itself is at fault: refused and quarantined."""

    reason: str
    kind: str  # "malformed" | "missing-attribute" | "mismatch"
    sop: str | None


@dataclass(frozen=True)
class Unreadable:
    """Our own spool file could not be read: not the sender's fault, nothing quarantined."""

    reason: str
    sop: str | None


def examine(
    path: str,
    source: str,
    expected_sop_uid: str | None,
    received_at: datetime,
    known: tuple[int, str] | None = None,
) -> InstanceRecord | Unfit | Unreadable:
    """Steps 1-2 of the module docstring and the record of step 4, for the received file at ``path``:
    the header checked, the bytes hashed (unless ``known`` gives their size and SHA-256, computed by
    whoever wrote the file), the catalog record built. Reads the file only; a pure function of its
    arguments, so it runs the same in a helper process (:class:`Helpers`)."""
    try:
        with open(path, "rb") as fh:
            ds, pixel_offset = _read_header(fh)
            ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if ds.file_meta else ""
            if not ts:
                raise InvalidInstance("file meta has no TransferSyntaxUID")
            size = os.fstat(fh.fileno()).st_size
            located: PixelValue | None = None
            if pixel_offset is not None and ts != DeflatedExplicitVRLittleEndian:
                complete, located = _check_pixel_element(fh, pixel_offset, size, ts)
                if not complete:
                    raise _Malformed("pixel data is truncated (the file ends inside the pixel data element)")
                located = _frame_location(ds, ts, located)
        study, series_uid, sop, _sop_class = InstanceRecord.identify(ds)
        media_sop = ds.file_meta.get("MediaStorageSOPInstanceUID")
    except InvalidInstance as exc:
        return Unfit(str(exc), "missing-attribute", expected_sop_uid)
    except OSError as exc:  # our own spool file could not be read: not the sender's fault
        return Unreadable(f"storage unavailable: {exc}", expected_sop_uid)
    except Exception as exc:
        # pydicom reports damaged data with many exception types (ValueError, EOFError,
        # struct.error, NotImplementedError for an unknown VR, BytesLengthException…): all of
        # them mean the same to the sender (fuzzed in tests/test_fuzz.py, issue 6 §8)
        return Unfit(f"not readable as DICOM: {exc}", "malformed", expected_sop_uid)

    if expected_sop_uid and expected_sop_uid != sop:
        return Unfit(
            f"SOPInstanceUID {sop} in the data set differs from {expected_sop_uid} announced in the request",
            "mismatch",
            sop,
        )
    if media_sop not in (None, "", sop):
        return Unfit("MediaStorageSOPInstanceUID differs from SOPInstanceUID", "mismatch", sop)

    try:
        size, sha = known or sha256_file(Path(path))
    except OSError as exc:
        return Unreadable(f"storage unavailable: {exc}", sop)
    try:
        return InstanceRecord.from_dataset(
            ds,
            transfer_syntax=ts,
            has_pixels=pixel_offset is not None,
            size=size,
            sha256=sha,
            blob_key=blob_key(study, series_uid, sop, sha),
            received_at=received_at,
            source_ae=source,
            pixel_offset=located.offset if located is not None else None,
            pixel_length=located.length if located is not None else None,
        )
    except Exception as exc:
        # Only the data set's own values can fail here (a length that does not fit the VR, an
        # undecodable value): refuse it as malformed before any byte is placed (issue 6 §8).
        return Unfit(f"not readable as DICOM: {exc}", "malformed", sop)


def _warm() -> bool:
    return True


class Helpers:
    """Helper processes for :func:`examine` while several associations are being received.

    **Why.** One node process receives every association; pynetdicom's PDU handling and the
    catalog write need its interpreter lock, and so did reading the header and building the record
    (~1.5 ms of a CT slice's ~4.5 ms of CPU). With two associations the second core then sat
    mostly idle (issue 2: "several associations must proceed in parallel"). In a helper process
    that part runs beside the node's threads. With one association the round trip to a helper
    would only add latency, so the caller asks for it (``offload``) only when others are in flight.

    The pool starts on the first request for it and is used once its processes have imported
    what they need (until then, and whenever it is broken, the work is done in the calling
    thread): no request ever waits for a process to start.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._lock = threading.Lock()
        self._pool: ChildPool | None = None
        self._ready = threading.Event()
        self.used = 0  # instances examined by a helper (a count for tests and the bench)

    def start(self) -> None:
        """Start the processes now (they are otherwise started by the first request for them)."""
        self._started()

    @property
    def started(self) -> bool:
        return self._pool is not None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float) -> bool:
        """Whether the processes are started and ready within ``timeout`` seconds."""
        return self._ready.wait(timeout)

    def examine(
        self,
        path: str,
        source: str,
        expected_sop_uid: str | None,
        received_at: datetime,
        known: tuple[int, str] | None = None,
    ) -> InstanceRecord | Unfit | Unreadable | None:
        """The answer from a helper, or None when none is ready (the caller does it itself)."""
        pool = self._started()
        if pool is None or not self._ready.is_set():
            return None
        try:
            answer = pool.run(examine, path, source, expected_sop_uid, received_at, known)
            with self._lock:
                self.used += 1
            return answer
        except Exception:  # a helper died (the pool replaces itself) or the pool is shut down
            log.warning("ingest helper failed; reading %s in the receiving thread", path, exc_info=True)
            return None

    def _started(self) -> ChildPool | None:
        with self._lock:
            if self._pool is None:
                self._pool = ChildPool(self.workers)
                threading.Thread(
                    target=self._warm, args=(self._pool,), name="ingest-helpers", daemon=True
                ).start()
            return self._pool

    def _warm(self, pool: ChildPool) -> None:
        try:
            for _ in range(self.workers):
                pool.run(_warm)
            pool.run(examine, "", "", None, datetime.now(UTC))  # imports pydicom and the record
        except Exception:
            log.warning("ingest helpers did not start; associations are read in their own threads")
            return
        self._ready.set()

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            self._ready.clear()
        if pool is not None:
            pool.shutdown()


class Ingest:
    """Accepts received files into one archive (catalog + blob store)."""

    def __init__(
        self,
        catalog: Catalog,
        store: BlobStore,
        *,
        quarantine: Path,
        policy: ConflictPolicy = "keep-newest",
        audit: AuditLog | None = None,
        helpers: int = 0,
    ) -> None:
        self.catalog = catalog
        self.store = store
        self.quarantine = quarantine
        self.policy: ConflictPolicy = policy
        self.audit = audit
        self.helpers = Helpers(helpers) if helpers > 0 else None
        quarantine.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        """Stop the helper processes, if any were started."""
        if self.helpers is not None:
            self.helpers.close()

    def accept_file(
        self,
        path: Path,
        *,
        source: str,
        expected_sop_uid: str | None = None,
        who: Actor | None = None,
        offload: bool = False,
        known: tuple[int, str] | None = None,
    ) -> Accepted | Refused:
        """Store the Part-10 file at ``path`` (the caller keeps ownership of ``path``).

        Audited (R-SE-4) as an ``upload`` by ``who`` (default: the ``source``): an accepted instance
        in its own catalog transaction, a refusal with its reason.

        ``offload``: the caller is receiving other instances at the same time (several
        associations): the header is read and the record built in a helper process when the node
        has them, so that the receiving threads keep the interpreter lock.

        ``known``: the file's size and SHA-256, computed by the caller while it wrote the file (and
        the caller started its write-back): not read again here.
        """
        who = who or Actor(source, "", "", "")
        result = self._accept_file(
            path, source=source, expected_sop_uid=expected_sop_uid, who=who, offload=offload, known=known
        )
        if isinstance(result, Refused) and self.audit is not None:
            self.audit.record_as(
                who,
                EventType.UPLOAD,
                resource=f"instance:{result.sop_uid or '?'}",
                result=Result.FAILURE,
                detail={
                    "sop_instance_uid": result.sop_uid or "",
                    "refused": result.kind,
                    "reason": result.reason,
                },
            )
        return result

    def _accept_file(
        self,
        path: Path,
        *,
        source: str,
        expected_sop_uid: str | None,
        who: Actor,
        offload: bool,
        known: tuple[int, str] | None,
    ) -> Accepted | Refused:
        if known is None and isinstance(self.store, FolderBlobStore):
            _start_writeback(path)
        examined = self._examine(path, source, expected_sop_uid, offload, known)
        if isinstance(examined, Unfit):
            return self._refuse(path, source, examined.reason, examined.kind, examined.sop)
        if isinstance(examined, Unreadable):
            return Refused(examined.reason, "storage", examined.sop)
        rec = examined
        try:
            size, sha_stored = self.store.put_file(rec.blob_key, path, known=(rec.size, rec.sha256))
        except OSError as exc:
            log.error("blob store write failed for %s: %s", rec.sop_uid, exc)
            return Refused(f"storage unavailable: {exc}", "storage", rec.sop_uid)
        if sha_stored != rec.sha256:
            return Refused("file changed while being stored", "storage", rec.sop_uid)
        try:
            outcome = self.catalog.add_instance(rec, self.policy, also=self._audited(who, rec))
        except Exception as exc:  # the catalog must not turn a DB outage into a lost instance
            log.exception("catalog write failed for %s", rec.sop_uid)
            return Refused(f"catalog unavailable: {exc}", "storage", rec.sop_uid)
        if outcome is AddOutcome.DUPLICATE:
            log.info("duplicate %s from %s (same bytes): nothing to do", rec.sop_uid, source)
            self._drop_received_copy(rec.sop_uid, rec.blob_key)
        elif outcome in (AddOutcome.REPLACED, AddOutcome.VERSION_KEPT):
            log.warning(
                "instance %s received again from %s with different bytes: %s",
                rec.sop_uid,
                source,
                outcome.value,
            )
        return Accepted(rec.sop_uid, rec.sop_class_uid, rec.study_uid, outcome, rec.sha256, size)

    def _examine(
        self,
        path: Path,
        source: str,
        expected_sop_uid: str | None,
        offload: bool,
        known: tuple[int, str] | None,
    ) -> InstanceRecord | Unfit | Unreadable:
        """:func:`examine` here, or in a helper process when the caller says others are being
        received at the same time (see :class:`Helpers`)."""
        received_at = datetime.now(UTC)
        if offload and self.helpers is not None:
            answer = self.helpers.examine(str(path), source, expected_sop_uid, received_at, known)
            if answer is not None:
                return answer
        return examine(str(path), source, expected_sop_uid, received_at, known)

    def _drop_received_copy(self, sop: str, key: str) -> None:
        """A duplicate of the bytes once received for an instance now stored losslessly compressed
        (``gateway/codec``, R-UP-1) was placed again under its own key, which nothing references:
        remove it (the blob the catalog points at is a different key)."""
        with self.catalog.engine.connect() as conn:
            current = conn.execute(select(instances.c.blob_key).where(instances.c.sop_uid == sop)).scalar()
            if current is None or current == key:
                return
            kept = conn.execute(
                select(instance_versions.c.id).where(instance_versions.c.blob_key == key).limit(1)
            ).first()
        if kept is None:
            self.store.delete(key)

    def _audited(self, who: Actor, rec: InstanceRecord) -> Callable[[Connection, AddOutcome], None] | None:
        """The audit record of a stored instance, written in the catalog's transaction (R-SE-4):
        no instance is catalogued (and acknowledged) without it, for no extra commit."""
        audit = self.audit
        if audit is None:
            return None

        def record(conn: Connection, outcome: AddOutcome) -> None:
            audit.record_in(
                conn,
                who,
                EventType.UPLOAD,
                resource=f"study:{rec.study_uid}",
                result=Result.SUCCESS,
                detail=_upload_detail(rec, outcome),
            )

        return record

    def _refuse(self, path: Path, source: str, reason: str, kind: str, sop: str | None) -> Refused:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", source)[:32]  # AE titles may hold '/' or spaces
        dest = self.quarantine / f"{stamp}-{safe}-{uuid.uuid4().hex[:8]}.dcm"
        try:
            shutil.copyfile(path, dest)
            dest.with_suffix(".reason.txt").write_text(
                f"source: {source}\nsop: {sop or '?'}\nreason: {reason}\n", encoding="utf-8"
            )
        except OSError as exc:
            log.error("could not quarantine %s: %s", path, exc)
            return Refused(reason, kind, sop, None)
        log.warning("refused instance from %s: %s (kept in %s)", source, reason, dest)
        return Refused(reason, kind, sop, dest)


def _upload_detail(rec: InstanceRecord, outcome: AddOutcome) -> dict[str, str | int]:
    return {
        "study_instance_uid": rec.study_uid,
        "series_instance_uid": rec.series_uid,
        "sop_instance_uid": rec.sop_uid,
        "sop_class_uid": rec.sop_class_uid,
        "outcome": outcome.value,
        "sha256": rec.sha256,
        "size": rec.size,
    }


class _Malformed(Exception):
    pass
