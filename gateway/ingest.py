"""Durable ingest: a received Part-10 file becomes a stored, catalogued instance, or is refused.

The one domain entry point behind C-STORE (``dimse/``) and, later, STOW-RS (``dicomweb/``). The
edges only translate :class:`Accepted` / :class:`Refused` into their protocol's statuses.

Order of work (ARCHITECTURE "the data path"):

1. read the header only (``stop_before_pixels``): pixel data is passed through, never decoded;
2. check the structure: required UIDs valid, the pixel data element complete (a truncated file is
   caught here), the SOP Instance UID the sender announced matches the one in the data;
3. hash, fsync and place the bytes in the blob store under a content-addressed key;
4. catalogue in one transaction, durable when it commits — or, for the embedded node (folder
   store + SQLite), committed without a flush of its own and recorded until it is flushed by a
   name in the intake journal that step 3's fsync made durable with the file
   (:mod:`gateway.intake`: one flush per instance).

Only then is the sender told *success*. A crash between 3 and 4 leaves an unreferenced blob and no
acknowledgement; the sender's retry lands on the same key. A crash of the machine after the answer
but before the catalog's flush leaves the journal's name: :meth:`Ingest.recover` catalogues the
instance again when the node opens.

For speed (issue 2 "Numbers"), the kernel is asked to start writing the received file to disk the
moment ingest begins (folder store: the spool file *is* the blob), and the catalog record is built
before the blob is placed, so the fsync in step 3 mostly finds the data written already. The order
that matters is kept: the blob is durable before the catalog transaction commits, and both before
the answer.

Refused files are moved to the quarantine folder with a ``.reason.txt`` beside them, for the admin
(issue 2 §6).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import re
import shutil
import signal
import struct
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from io import BytesIO
from multiprocessing.connection import Connection as Connection_
from pathlib import Path
from typing import BinaryIO, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian
from sqlalchemy import Connection, select

from gateway.archive.blobstore import BlobStore, FolderBlobStore, sha256_file, start_writeback
from gateway.archive.catalog import AddOutcome, Catalog, ConflictPolicy
from gateway.archive.record import InstanceRecord, InvalidInstance
from gateway.archive.schema import instance_versions, instances
from gateway.audit import Actor, AuditLog, EventType, Result
from gateway.intake import IntakeJournal, owns, source_of

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


def _start_writeback(path: Path) -> None:
    """:func:`~gateway.archive.blobstore.start_writeback` of the file at ``path`` (best effort).

    A thread doing the fsync instead cost more CPU than it saved on 2 cores (GIL hand-overs), and
    an fsync before the blob is linked into place takes one journal commit more.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # the real read below reports it
    try:
        start_writeback(fd)
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
    """Where a pixel data (7FE0,xxxx) element's value is in the file (catalog ``pixel_offset``)."""

    offset: int  # first byte of the value (encapsulated: the Basic Offset Table item's tag)
    length: int | None  # None: undefined length (encapsulated)
    pixel_data: bool = True  # (7FE0,0010) itself, not Float / Double Float Pixel Data


def _pixel_element(fh: BinaryIO, offset: int, transfer_syntax: str) -> tuple[int, PixelValue | None] | None:
    """The group of the element at ``offset`` and, when it is Pixel Data (7FE0,0010), where its
    value is; None when the element's header is cut short.

    pydicom's header read stops before the element, so its value is never read here: whether the
    file holds all of it is checked against the file's end by :func:`_value_complete`.
    """
    fh.seek(offset)
    head = fh.read(12)
    if len(head) < 8:
        return None
    big = transfer_syntax == ExplicitVRBigEndian
    endian = ">" if big else "<"
    group, elem = struct.unpack(f"{endian}HH", head[:4])
    if group != 0x7FE0:
        return group, None
    if transfer_syntax == ImplicitVRLittleEndian:
        (length,) = struct.unpack("<I", head[4:8])
        start = offset + 8
    elif head[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"UN", b"OV"):
        if len(head) < 12:
            return None
        (length,) = struct.unpack(f"{endian}I", head[8:12])
        start = offset + 12
    else:
        (length,) = struct.unpack(f"{endian}H", head[6:8])
        start = offset + 8
    return group, PixelValue(start, None if length == 0xFFFFFFFF else length, elem == 0x0010)


def _value_complete(fh: BinaryIO, value: PixelValue, size: int) -> bool:
    """Whether the file ``fh`` of ``size`` bytes holds all of the pixel data ``value``."""
    if value.length is not None:
        return value.offset + value.length <= size
    # Encapsulated: the value ends with a sequence delimitation item (FFFE,E0DD). It is normally
    # the file's last 8 bytes; allow a little trailing padding after it.
    tail_len = min(size - value.offset, 4096)
    if tail_len < 8:
        return False
    fh.seek(size - tail_len)
    return b"\xfe\xff\xdd\xe0\x00\x00\x00\x00" in fh.read(tail_len)


def _complete_in(path: str, value: PixelValue, size: int) -> bool:
    """:func:`_value_complete` of the file at ``path`` (opened only for encapsulated data)."""
    if value.length is not None:
        return value.offset + value.length <= size
    with open(path, "rb") as fh:
        return _value_complete(fh, value, size)


def _check_pixel_element(
    fh: BinaryIO, offset: int, size: int, transfer_syntax: str
) -> tuple[bool, PixelValue | None]:
    """Whether the element at ``offset`` (where the header read stopped) is complete in ``fh`` of
    ``size`` bytes, and where its value is when it is Pixel Data (7FE0,0010). For files in
    memory (``gateway/codec``); received files go through :func:`read_header` and :func:`complete`."""
    located = _pixel_element(fh, offset, transfer_syntax)
    if located is None:
        return False, None
    group, value = located
    if group != 0x7FE0 or value is None:
        return True, None
    return _value_complete(fh, value, size), value if value.pixel_data else None


def _frame_location(ds: Dataset, transfer_syntax: str, value: PixelValue | None) -> PixelValue | None:
    """``value`` if WADO-RS frames can be cut from it with the catalog's columns alone (Pixel Data).

    Not for big-endian native data (frames are byte-swapped), native YBR_FULL_422 (two samples per
    pixel) or BitsAllocated not a whole number of bytes: those keep parsing the header per request.
    """
    if value is None or not value.pixel_data or transfer_syntax == ExplicitVRBigEndian:
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


@dataclass(frozen=True)
class Header:
    """What :func:`read_header` found: the catalog record but for what only the whole file gives
    (size, SHA-256, blob key), and where the pixel data element is, to be checked at the end."""

    record: InstanceRecord
    pixel_start: int | None  # offset of the pixel data element's tag; None: no pixel data
    value: PixelValue | None  # where its value is (None: deflated data, or no pixel data element)


_NO_HASH = "0" * 64
_TRUNCATED = "pixel data is truncated (the file ends inside the pixel data element)"


def read_header(
    path: str,
    source: str,
    expected_sop_uid: str | None,
    received_at: datetime,
    prefix: int | None = None,
) -> Header | Unfit | Unreadable | None:
    """Step 1-2 of the module docstring for the file at ``path``: the header read and checked and
    the catalog record built, without the pixel data. Reads the file only; a pure function of its
    arguments, so it runs the same in a helper process (:class:`Helpers`).

    ``prefix``: only the first ``prefix`` bytes are there yet (a data set still being received).
    The answer is then a :class:`Header` only if the header ends inside them, at the pixel data
    element; anything else — the header longer than the prefix, no pixel data, a damaged element
    — is None ("not known yet": the whole file is read once it is complete, and judged then).
    """
    try:
        with open(path, "rb") as fh:
            if prefix is not None:
                fh = BytesIO(fh.read(prefix))  # type: ignore[assignment]  # never past the prefix
            ds, pixel_start = _read_header(fh)
            has_pixels = pixel_start is not None
            ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if ds.file_meta else ""
            if not ts:
                raise InvalidInstance("file meta has no TransferSyntaxUID")
            value: PixelValue | None = None
            if pixel_start is not None and ts != DeflatedExplicitVRLittleEndian:
                located = _pixel_element(fh, pixel_start, ts)
                if located is None:
                    if prefix is not None:
                        return None
                    raise _Malformed(_TRUNCATED)
                group, value = located
                if group != 0x7FE0:  # trailing non-pixel elements (e.g. padding): parsed already
                    pixel_start = None
            elif prefix is not None:
                return None  # no pixel data within the prefix, or deflated: wait for the whole file
        identified = InstanceRecord.identify(ds)
        sop = identified[2]
        media_sop = ds.file_meta.get("MediaStorageSOPInstanceUID")
    except InvalidInstance as exc:
        return None if prefix is not None else Unfit(str(exc), "missing-attribute", expected_sop_uid)
    except OSError as exc:  # our own spool file could not be read: not the sender's fault
        return None if prefix is not None else Unreadable(f"storage unavailable: {exc}", expected_sop_uid)
    except Exception as exc:
        if prefix is not None:
            return None
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
        # _frame_location reads element values too (Photometric Interpretation, Bits Allocated)
        frames = _frame_location(ds, ts, value) is not None
        record = InstanceRecord.from_dataset(
            ds,
            transfer_syntax=ts,
            has_pixels=has_pixels,
            size=0,
            sha256=_NO_HASH,
            blob_key="",
            received_at=received_at,
            source_ae=source,
            pixel_offset=value.offset if value is not None and frames else None,
            pixel_length=value.length if value is not None and frames else None,
            identified=identified,
        )
    except Exception as exc:
        if prefix is not None:
            return None
        # Only the data set's own values can fail here (a length that does not fit the VR, an
        # undecodable value): refuse it as malformed before any byte is placed (issue 6 §8).
        return Unfit(f"not readable as DICOM: {exc}", "malformed", sop)
    return Header(record, pixel_start, value)


def complete(header: Header, path: str, known: tuple[int, str] | None) -> InstanceRecord | Unfit | Unreadable:
    """The record of the whole file at ``path``: its pixel data element checked against the file's
    end (a truncated file is refused here) and the size, SHA-256 and blob key filled in (``known``:
    size and SHA-256 computed by whoever wrote the file; otherwise the file is hashed)."""
    rec = header.record
    try:
        size, sha = known or sha256_file(Path(path))
        if (
            header.pixel_start is not None
            and header.value is not None
            and not _complete_in(path, header.value, size)
        ):
            return Unfit(
                f"not readable as DICOM: {_TRUNCATED}",
                "malformed",
                rec.sop_uid,
            )
    except OSError as exc:
        return Unreadable(f"storage unavailable: {exc}", rec.sop_uid)
    return replace(
        rec, size=size, sha256=sha, blob_key=blob_key(rec.study_uid, rec.series_uid, rec.sop_uid, sha)
    )


def examine(
    path: str,
    source: str,
    expected_sop_uid: str | None,
    received_at: datetime,
    known: tuple[int, str] | None = None,
) -> InstanceRecord | Unfit | Unreadable:
    """:func:`read_header` and :func:`complete` of a whole file: the header checked, the bytes
    hashed (unless ``known`` gives their size and SHA-256), the catalog record built."""
    header = read_header(path, source, expected_sop_uid, received_at)
    if not isinstance(header, Header):
        assert header is not None  # only a prefix read answers "not known yet"
        return header
    return complete(header, path, known)


def _helper_main(conn: Connection_) -> None:
    """A helper process: :func:`read_header` for each request received on ``conn`` until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node stops its helpers itself
    read_header("", "", None, datetime.now(UTC))  # imports pydicom and the record code now
    conn.send("ready")
    while True:
        try:
            args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            answer: object = read_header(*args)
        except Exception as exc:  # read_header catches the data set's faults; this is a bug
            answer = exc
        conn.send(answer)


class _Helper:
    """One helper process and our end of its pipe."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork: the node has threads and sockets
        self.conn, theirs = ctx.Pipe()
        self.process = ctx.Process(target=_helper_main, args=(theirs,), name="ingest-helper", daemon=True)
        self.process.start()
        theirs.close()

    def wait_ready(self, timeout: float) -> bool:
        return self.conn.poll(timeout) and self.conn.recv() == "ready"

    def close(self) -> None:
        self.conn.close()
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


class Pending:
    """A header being read by a helper (:meth:`Helpers.begin`)."""

    def __init__(self, helpers: Helpers, helper: _Helper, path: str) -> None:
        self._helpers = helpers
        self._helper: _Helper | None = helper
        self._path = path
        self._answer: Header | Unfit | Unreadable | None = None

    def result(self) -> Header | Unfit | Unreadable | None:
        """The helper's answer (waits for it; None: not known, read the file here)."""
        helper, self._helper = self._helper, None
        if helper is not None:
            try:
                answer: object = helper.conn.recv()
            except (EOFError, OSError):  # the helper died (out of memory?): replace it
                self._helpers._lost(helper)
                return None
            except Exception as exc:  # an answer that does not unpickle (a bug): read it here
                answer = exc
            self._answer = self._helpers._answered(helper, answer, self._path)
        return self._answer

    def cancel(self) -> None:
        """Not wanted any more (the association ended): wait for the helper and free it."""
        self.result()


class Helpers:
    """Helper processes for :func:`read_header`, beside the threads receiving associations.

    **Why.** One node process receives every association; the receive loop and the catalog write
    need its interpreter lock, and so did reading the header and building the record (~0.65 of
    the ~1.4 ms a CT slice holds the lock, ~1.2 ms of its ~4 ms from request to answer). In a
    helper process that part runs on another CPU, and *while the data set is still arriving*: the
    DICOM receiver (``dimse/store_receiver.py``) asks for it as soon as the first part of the data
    set is on disk (:meth:`Ingest.begin`), so that by the last byte the record is mostly built
    (issue 2: one association as fast as Orthanc; several in parallel).

    Each helper is a process with its own pipe: a receiving thread takes an idle helper, sends it
    the request and waits on the pipe (without the interpreter lock) — no feeder or result threads
    in between, which in a ``ProcessPoolExecutor`` cost more hand-overs of the lock than the work
    saved (measured: the pool's one helper round trip was 70% of a store's time with two
    associations). When no helper is idle, none is ready yet, or one died, the work is done in the
    calling thread: no request ever waits for a process to start.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._lock = threading.Lock()
        self._idle: queue.SimpleQueue[_Helper] = queue.SimpleQueue()
        self._all: list[_Helper] = []
        self._ready = threading.Event()
        self._closed = False
        self.used = 0  # instances examined by a helper (a count for tests and the bench)

    def start(self) -> None:
        """Start the processes now (they are otherwise started by the first request for them)."""
        with self._lock:
            if self._all or self._closed:
                return
            self._all = [_Helper() for _ in range(self.workers)]
        threading.Thread(target=self._warm, name="ingest-helpers", daemon=True).start()

    @property
    def started(self) -> bool:
        return bool(self._all)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float) -> bool:
        """Whether the processes are started and ready within ``timeout`` seconds."""
        return self._ready.wait(timeout)

    def _warm(self) -> None:
        ready = 0
        for helper in list(self._all):
            try:
                if helper.wait_ready(120):
                    self._idle.put(helper)
                    ready += 1
            except (EOFError, OSError):
                pass
        if not ready:
            log.warning("ingest helpers did not start; associations are read in their own threads")
            return
        self._ready.set()

    def begin(
        self, path: str, source: str, expected_sop_uid: str | None, received_at: datetime, prefix: int | None
    ) -> Pending | None:
        """Have an idle helper :func:`read_header` (of the first ``prefix`` bytes, if given); the
        answer is taken with :meth:`Pending.result`. None when no helper is idle or ready."""
        if not self._ready.is_set():
            self.start()
            return None
        try:
            helper = self._idle.get_nowait()
        except queue.Empty:
            return None
        try:
            helper.conn.send((path, source, expected_sop_uid, received_at, prefix))
        except (OSError, ValueError):
            self._lost(helper)
            return None
        return Pending(self, helper, path)

    def _answered(self, helper: _Helper, answer: object, path: str) -> Header | Unfit | Unreadable | None:
        self._idle.put(helper)
        if isinstance(answer, Exception):
            log.error("ingest helper failed on %s: %r; reading it in the receiving thread", path, answer)
            return None
        with self._lock:
            self.used += 1
        return cast("Header | Unfit | Unreadable | None", answer)

    def _lost(self, helper: _Helper) -> None:
        log.warning("an ingest helper died; its work is done in the receiving thread")
        threading.Thread(target=self._replace, args=(helper,), daemon=True).start()

    def _replace(self, dead: _Helper) -> None:
        dead.close()
        with self._lock:
            if self._closed:
                return
            fresh = _Helper()
            self._all = [fresh if h is dead else h for h in self._all]
        try:
            if fresh.wait_ready(120):
                self._idle.put(fresh)
        except (EOFError, OSError):
            log.warning("a replacement ingest helper did not start")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            helpers, self._all = self._all, []
            self._ready.clear()
        for helper in helpers:
            helper.close()


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
        journal: IntakeJournal | None = None,
    ) -> None:
        """``journal``: one flush per instance (:mod:`gateway.intake`); used only with a folder
        store and a catalog that can defer its flush (SQLite), ignored otherwise."""
        self.catalog = catalog
        self.store = store
        self.quarantine = quarantine
        self.policy: ConflictPolicy = policy
        self.audit = audit
        self.helpers = Helpers(helpers) if helpers > 0 else None
        usable = journal is not None and isinstance(store, FolderBlobStore) and catalog.can_defer
        self.journal = journal if usable else None
        quarantine.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        """Flush the intake journal; stop the helper processes, if any were started."""
        if self.journal is not None:
            self.journal.close()
        if self.helpers is not None:
            self.helpers.close()

    def recover(self) -> int:
        """Catalogue again what the intake journal holds from before a crash of the machine
        (:mod:`gateway.intake`); run before anything is received. The number catalogued."""
        journal = self.journal
        if journal is None:
            return 0
        recovered = 0
        for name in journal.leftovers():
            if self._recover_one(name):
                recovered += 1
            name.unlink(missing_ok=True)
        if recovered:
            self.catalog.sync()
            log.warning("intake journal: %d instances catalogued again after a crash", recovered)
        return recovered

    def _recover_one(self, name: Path) -> bool:
        assert isinstance(self.store, FolderBlobStore)
        source = source_of(name)
        try:
            received_at = datetime.fromtimestamp(name.stat().st_mtime, UTC)
        except OSError:
            return False
        rec = examine(str(name), source, None, received_at)
        if not isinstance(rec, InstanceRecord) or not owns(name, self.store.local_path(rec.blob_key)):
            # the machine stopped before this file's fsync: it was never acknowledged
            log.warning(
                "intake journal: %s is not a stored instance (never acknowledged); removed", name.name
            )
            return False
        with self.catalog.engine.connect() as conn:
            found = (
                conn.execute(
                    select(instances.c.sop_uid).where(
                        instances.c.sop_uid == rec.sop_uid, instances.c.blob_key == rec.blob_key
                    )
                ).first()
                or conn.execute(
                    select(instance_versions.c.id)
                    .where(instance_versions.c.blob_key == rec.blob_key)
                    .limit(1)
                ).first()
            )
        if found is not None:
            return False  # its row reached the disk
        who = Actor(source or "intake-recovery", "", "", "local")
        self.catalog.add_instance(rec, self.policy, also=self._audited(who, rec, recovered=True))
        return True

    def accept_file(
        self,
        path: Path,
        *,
        source: str,
        expected_sop_uid: str | None = None,
        who: Actor | None = None,
        offload: bool = False,
        known: tuple[int, str] | None = None,
        pending: Pending | None = None,
    ) -> Accepted | Refused:
        """Store the Part-10 file at ``path`` (the caller keeps ownership of ``path``).

        Audited (R-SE-4) as an ``upload`` by ``who`` (default: the ``source``): an accepted instance
        in its own catalog transaction, a refusal with its reason.

        ``offload``: the caller is receiving other instances at the same time (several
        associations): the header is read and the record built in a helper process when the node
        has them, so that the receiving threads keep the interpreter lock.

        ``known``: the file's size and SHA-256, computed by the caller while it wrote the file (and
        the caller started its write-back): not read again here. ``pending``: the header as read by
        a helper while the file arrived (:meth:`begin`).
        """
        who = who or Actor(source, "", "", "")
        result = self._accept_file(
            path,
            source=source,
            expected_sop_uid=expected_sop_uid,
            who=who,
            offload=offload,
            known=known,
            pending=pending,
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
        pending: Pending | None,
    ) -> Accepted | Refused:
        if known is None and isinstance(self.store, FolderBlobStore):
            _start_writeback(path)
        examined = self._examine(path, source, expected_sop_uid, offload, known, pending)
        if isinstance(examined, Unfit):
            return self._refuse(path, source, examined.reason, examined.kind, examined.sop)
        if isinstance(examined, Unreadable):
            return Refused(examined.reason, "storage", examined.sop)
        rec = examined
        journal = self.journal
        name = journal.new_name(source) if journal is not None else None
        try:
            if name is not None:
                assert isinstance(self.store, FolderBlobStore)
                size, sha_stored = self.store.put_file(
                    rec.blob_key, path, known=(rec.size, rec.sha256), also_link=name
                )
            else:
                size, sha_stored = self.store.put_file(rec.blob_key, path, known=(rec.size, rec.sha256))
        except OSError as exc:
            log.error("blob store write failed for %s: %s", rec.sop_uid, exc)
            if journal is not None and name is not None:
                journal.discard(name)
            return Refused(f"storage unavailable: {exc}", "storage", rec.sop_uid)
        if sha_stored != rec.sha256:
            if journal is not None and name is not None:
                journal.discard(name)
            return Refused("file changed while being stored", "storage", rec.sop_uid)
        try:
            outcome = self.catalog.add_instance(
                rec, self.policy, also=self._audited(who, rec), deferred=name is not None
            )
        except Exception as exc:  # the catalog must not turn a DB outage into a lost instance
            log.exception("catalog write failed for %s", rec.sop_uid)
            if journal is not None and name is not None:
                journal.discard(name)
            return Refused(f"catalog unavailable: {exc}", "storage", rec.sop_uid)
        if journal is not None and name is not None:
            if outcome is AddOutcome.DUPLICATE:
                journal.discard(name)  # nothing new was catalogued
            else:
                journal.committed(name)
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
        pending: Pending | None,
    ) -> InstanceRecord | Unfit | Unreadable:
        """:func:`examine`, its header part taken from ``pending`` when a helper read it while the
        file arrived, else read by a helper now when the caller says others are being received at
        the same time, else read here (see :class:`Helpers`)."""
        header = pending.result() if pending is not None else None
        if header is None and offload and self.helpers is not None:
            asked = self.helpers.begin(str(path), source, expected_sop_uid, datetime.now(UTC), None)
            header = asked.result() if asked is not None else None
        if header is None:
            header = read_header(str(path), source, expected_sop_uid, datetime.now(UTC))
        if not isinstance(header, Header):
            assert header is not None  # only a prefix read answers "not known yet"
            return header
        return complete(header, str(path), known)

    def begin(self, path: Path, prefix: int, *, source: str, expected_sop_uid: str | None) -> Pending | None:
        """Have a helper read the header of the file being received at ``path`` from its first
        ``prefix`` bytes, now, while the rest arrives; pass the answer to :meth:`accept_file`
        (``pending``). None when there are no helpers or none is idle."""
        if self.helpers is None:
            return None
        return self.helpers.begin(str(path), source, expected_sop_uid, datetime.now(UTC), prefix)

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

    def _audited(
        self, who: Actor, rec: InstanceRecord, *, recovered: bool = False
    ) -> Callable[[Connection, AddOutcome], None] | None:
        """The audit record of a stored instance, written in the catalog's transaction (R-SE-4):
        no instance is catalogued (and acknowledged) without it, for no extra commit."""
        audit = self.audit
        if audit is None:
            return None

        def record(conn: Connection, outcome: AddOutcome) -> None:
            detail = _upload_detail(rec, outcome)
            if recovered:
                detail["recovered"] = "intake journal, after a crash"
            audit.record_in(
                conn,
                who,
                EventType.UPLOAD,
                resource=f"study:{rec.study_uid}",
                result=Result.SUCCESS,
                detail=detail,
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
