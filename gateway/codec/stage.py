"""The front-end's compression stage: a durable queue and worker threads (R-UP-1, issue 4 §1).

Ingest never waits for compression: the C-STORE (or STOW-RS) answer goes out once the received
bytes are durable and catalogued, and the catalog queues the instance here in that same
transaction (:meth:`CompressionStage.enqueue`, a catalog write hook). Worker threads then take
queued instances one by one:

1. read the stored bytes and check them against the catalogued SHA-256;
2. compress (``transcode.compress``: decoded again and compared bit for bit before use);
3. write the new file to the blob store under its own content-addressed key (``ingest.blob_key``);
4. in one catalog transaction, only if the instance still has the bytes we read: point the row at
   the new blob (transfer syntax, size, SHA-256, pixel data location, header JSON), keep the
   received bytes' hash in ``source_sha256``, drop the queue row, and re-queue the study for
   forwarding; and, in that same transaction, record the old blob in ``retired_blobs`` with a
   ``delete_after`` one grace period (``[compression] delete_grace_seconds``, 60 s) ahead;
5. :meth:`CompressionStage.sweep` (run by the worker threads, about once a second) deletes
   retired blobs whose grace period is over — never one the catalog points at again.

The grace period is for readers: a WADO-RS or C-MOVE request that looked the row up just before
the switch reads the old key a moment later, and still gets its bytes. A crash before 4 leaves the
queue row (the work is redone; an orphaned new blob at worst); after 4, the ``retired_blobs`` row,
which the next start sweeps once due: the catalog never points at a deleted blob, and a replaced
blob is never forgotten. Failures back off and are retried; after ``MAX_ATTEMPTS`` the original is
kept for good. The forwarder asks :meth:`waiting` and holds a study back while any of its instances
are queued here, so the center never gets two different byte streams for one SOP Instance UID.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Connection, bindparam, delete, func, select, update

from gateway.archive.blobstore import BlobStore
from gateway.archive.catalog import AddOutcome, Catalog
from gateway.archive.record import InstanceRecord, metadata_json
from gateway.archive.schema import codec_queue, instance_versions, instances, retired_blobs
from gateway.codec.table import Codec
from gateway.codec.transcode import Outcome, Status, compress
from gateway.ingest import _check_pixel_element, _frame_location, _read_header, blob_key
from gateway.workpool import ChildPool, LoopThreads

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5
BACKOFF = timedelta(seconds=5)
DELETE_GRACE = timedelta(seconds=60)  # default of [compression] delete_grace_seconds
SWEEP_EVERY = 1.0  # seconds between sweeps of retired blobs by the worker threads
SWEEP_BATCH = 200
BATCH = 8  # queue rows a worker thread takes per query


_UNQUEUE = delete(codec_queue).where(codec_queue.c.sop_uid == bindparam("sop"))
_QUEUE = codec_queue.insert()


class Current(NamedTuple):
    """Where a queued instance's bytes are (its catalog row)."""

    sha256: str
    blob_key: str
    source_sha256: str | None


def utcnow() -> datetime:
    return datetime.now(UTC)


class CompressionStage:
    """Compresses stored instances after ingest, one queue row at a time."""

    def __init__(
        self,
        catalog: Catalog,
        store: BlobStore,
        codec: Codec,
        *,
        transcode_lossless: bool = False,
        workers: int = 1,
        processes: bool = False,
        delete_grace: timedelta = DELETE_GRACE,
    ) -> None:
        """``processes``: encode in ``workers`` child processes (the front-end: its ingest keeps the
        interpreter lock to itself); otherwise in the calling thread (tests, benchmarks).
        ``delete_grace``: how long a replaced blob stays readable before :meth:`sweep` deletes it."""
        self.delete_grace = delete_grace
        self._next_sweep = 0.0
        self.processes = processes
        self.threads_per_process = 2
        self._pool: ChildPool | None = None
        self.catalog = catalog
        self.store = store
        self.codec = codec
        self.transcode_lossless = transcode_lossless
        self.workers = workers
        # counts by outcome (compressed, kept, mismatch, failed, gave-up) and bytes, for /metrics
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._threads = LoopThreads("codec", self._step, self._thread_count(), idle=0.5)

    # ---- the queue ---------------------------------------------------------------------------

    def install(self) -> None:
        """Queue every instance stored from now on (call before ingest starts)."""
        self.catalog.write_hooks.append(self.enqueue)

    def enqueue(self, conn: Connection, rec: InstanceRecord, outcome: AddOutcome) -> None:
        """Catalog write hook: queue a newly stored instance in its own transaction."""
        now = utcnow()
        # statements built once: this runs in every stored instance's transaction (C-STORE path)
        conn.execute(_UNQUEUE, {"sop": rec.sop_uid})
        conn.execute(
            _QUEUE,
            {
                "sop_uid": rec.sop_uid,
                "study_uid": rec.study_uid,
                "attempts": 0,
                "next_attempt_at": now,
                "last_error": "",
                "enqueued_at": now,
            },
        )
        self._threads.wake()

    def waiting(self, study_uid: str) -> int:
        """How many of the study's instances are still to be compressed (the forwarder waits)."""
        with self.catalog.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).select_from(codec_queue).where(codec_queue.c.study_uid == study_uid)
                ).scalar_one()
            )

    def backlog(self) -> int:
        with self.catalog.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(codec_queue)).scalar_one())

    def discard_queue(self) -> int:
        """Compression is off: forget queued instances (they stay as received); how many."""
        with self.catalog.write() as conn:
            return int(conn.execute(delete(codec_queue)).rowcount)

    # ---- running -----------------------------------------------------------------------------

    def start(self) -> None:
        if self.processes and self._pool is None:
            self._pool = ChildPool(self.workers)
        self._threads.count = self._thread_count()
        self._threads.start()

    def stop(self) -> None:
        self._threads.stop(60)
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _thread_count(self) -> int:
        # With child processes, more threads than processes: while one thread waits for its
        # encoder, another reads, writes and commits (I/O is ~1/3 of an instance's time).
        return self.workers * self.threads_per_process if self.processes else self.workers

    def _step(self, worker: int) -> bool:
        if worker == 0 and time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + SWEEP_EVERY
            self.sweep()
        return self.run_once(worker=worker, of=self._thread_count(), limit=BATCH)

    def run_once(self, *, worker: int = 0, of: int = 1, limit: int = 1) -> bool:
        """Compress up to ``limit`` due queued instances (rows are split between workers by id);
        True if any. One query finds the rows and where their bytes are (a query per instance
        was a fifth of the node process's interpreter time during a C-STORE burst)."""
        with self.catalog.engine.connect() as conn:
            stmt = (
                select(
                    codec_queue.c.id,
                    codec_queue.c.sop_uid,
                    codec_queue.c.attempts,
                    instances.c.sha256,
                    instances.c.blob_key,
                    instances.c.source_sha256,
                )
                .select_from(codec_queue.outerjoin(instances, instances.c.sop_uid == codec_queue.c.sop_uid))
                .where(codec_queue.c.next_attempt_at <= utcnow())
                .order_by(codec_queue.c.id)
                .limit(limit)
            )
            if of > 1:
                stmt = stmt.where(codec_queue.c.id % of == worker)
            rows = conn.execute(stmt).all()
        for row in rows:
            if self._threads.stopping:
                break
            current = None if row.blob_key is None else Current(row.sha256, row.blob_key, row.source_sha256)
            try:
                self.process(int(row.id), str(row.sop_uid), current)
            except Exception as exc:
                self._failed(int(row.id), str(row.sop_uid), int(row.attempts) + 1, str(exc))
        return bool(rows)

    def drain(self) -> int:
        """Process every due row in this thread (tests, benchmarks); how many were processed."""
        n = 0
        while self.run_once():
            n += 1
        return n

    # ---- one instance ------------------------------------------------------------------------

    def process(self, queue_id: int, sop_uid: str, current: Current | None = None) -> Outcome | None:
        """Compress one queued instance; ``current``: where its bytes are, if the caller looked
        (the catalog switch checks the SHA-256 again, so a stale answer costs a wasted encode)."""
        cur: Any = current
        if cur is None:
            with self.catalog.engine.connect() as conn:
                cur = conn.execute(
                    select(instances.c.sha256, instances.c.blob_key, instances.c.source_sha256).where(
                        instances.c.sop_uid == sop_uid
                    )
                ).first()
        if cur is None:  # gone (deleted): nothing to do
            self._finish(queue_id)
            return None
        data = b"".join(self.store.get(cur.blob_key))
        if hashlib.sha256(data).hexdigest() != cur.sha256:
            raise OSError(f"stored bytes of {sop_uid} do not match the catalogued SHA-256")
        prepared = self._compress(data)
        outcome = prepared.outcome
        self._count(outcome)
        if outcome.status is Status.MISMATCH:
            log.error("compression of %s kept the original: %s", sop_uid, outcome.reason)
        elif outcome.status is Status.FAILED:
            log.warning("compression of %s failed, original kept: %s", sop_uid, outcome.reason)
        if outcome.status is not Status.COMPRESSED or outcome.data is None:
            self._finish(queue_id)
            return outcome
        self._replace(queue_id, sop_uid, cur.sha256, cur.blob_key, cur.source_sha256, prepared)
        return outcome

    def _compress(self, data: bytes) -> Prepared:
        if self._pool is None:
            return prepare(data, self.codec, transcode_lossless=self.transcode_lossless)
        # a child that dies (out of memory?) raises here: the queue row is retried later
        return self._pool.run(prepare, data, self.codec, transcode_lossless=self.transcode_lossless)

    def _replace(
        self,
        queue_id: int,
        sop_uid: str,
        old_sha: str,
        old_key: str,
        source_sha: str | None,
        prepared: Prepared,
    ) -> None:
        data = prepared.outcome.data
        assert data is not None
        study, series_uid, sop, sha = prepared.study, prepared.series, prepared.sop, prepared.sha256
        if sop != sop_uid:
            raise ValueError(f"the compressed file names SOP Instance UID {sop}, not {sop_uid}")
        key = blob_key(study, series_uid, sop, sha)
        size, stored_sha = self.store.put(key, io.BytesIO(data))
        if stored_sha != sha:
            raise OSError(f"blob store wrote {stored_sha}, expected {sha}")
        now = utcnow()
        with self.catalog.write() as conn:
            changed = conn.execute(
                update(instances)
                .where(instances.c.sop_uid == sop_uid, instances.c.sha256 == old_sha)
                .values(
                    transfer_syntax=prepared.transfer_syntax,
                    size=size,
                    sha256=sha,
                    blob_key=key,
                    pixel_offset=prepared.pixel_offset,
                    pixel_length=prepared.pixel_length,
                    metadata_json=prepared.metadata_json,
                    source_sha256=source_sha or old_sha,
                )
            ).rowcount
            conn.execute(delete(codec_queue).where(codec_queue.c.id == queue_id))
            if changed:
                self.catalog.queue_forward(conn, study, now)
                if key != old_key:
                    # not deleted now: a reader may hold the old key (R-UP-1, the module docstring)
                    self.retire(conn, sop_uid, old_key, now)
        if not changed:
            # new bytes arrived meanwhile (and were queued again): ours are not wanted (no reader
            # can know the key of a blob the catalog never pointed at)
            log.info("instance %s changed while being compressed; result dropped", sop_uid)
            if key != old_key:
                self.store.delete(key)

    # ---- replaced blobs ----------------------------------------------------------------------

    def retire(self, conn: Connection, sop_uid: str, key: str, now: datetime) -> None:
        """Record ``key`` (a blob of instance ``sop_uid``) for deletion one grace period from
        ``now``, in the caller's transaction."""
        conn.execute(
            retired_blobs.insert().values(
                sop_uid=sop_uid, blob_key=key, retired_at=now, delete_after=now + self.delete_grace
            )
        )

    def retired(self) -> int:
        """How many replaced blobs wait for deletion."""
        with self.catalog.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(retired_blobs)).scalar_one())

    def sweep(self, now: datetime | None = None) -> int:
        """Delete the retired blobs whose grace period is over; how many were deleted.

        The blob goes first, its row after: a crash in between leaves the row, and the next sweep
        deletes again (deleting a missing key is no error). A key the catalog points at again (an
        instance row or a kept version) is not deleted; only its row is dropped.
        """
        due_by = now or utcnow()
        with self.catalog.engine.connect() as conn:
            due = conn.execute(
                select(retired_blobs.c.id, retired_blobs.c.sop_uid, retired_blobs.c.blob_key)
                .where(retired_blobs.c.delete_after <= due_by)
                .order_by(retired_blobs.c.id)
                .limit(SWEEP_BATCH)
            ).all()
        deleted = 0
        for row in due:
            key, sop = str(row.blob_key), str(row.sop_uid)
            with self.catalog.engine.connect() as conn:  # both by the indexed SOP Instance UID
                in_use = (
                    conn.execute(
                        select(instances.c.id).where(instances.c.sop_uid == sop, instances.c.blob_key == key)
                    ).first()
                    or conn.execute(
                        select(instance_versions.c.id).where(
                            instance_versions.c.sop_uid == sop, instance_versions.c.blob_key == key
                        )
                    ).first()
                )
            if in_use is None:
                self.store.delete(key)
                deleted += 1
            with self.catalog.write() as conn:
                conn.execute(delete(retired_blobs).where(retired_blobs.c.id == row.id))
        return deleted

    def _finish(self, queue_id: int) -> None:
        with self.catalog.write() as conn:
            conn.execute(delete(codec_queue).where(codec_queue.c.id == queue_id))

    def _failed(self, queue_id: int, sop_uid: str, attempts: int, error: str) -> None:
        if attempts >= MAX_ATTEMPTS:
            log.error(
                "compression of %s given up after %d attempts, original kept: %s", sop_uid, attempts, error
            )
            self._bump("gave-up")
            self._finish(queue_id)
            return
        delay = BACKOFF * 2 ** (attempts - 1)
        log.warning("compression of %s failed (attempt %d, next in %s): %s", sop_uid, attempts, delay, error)
        with self.catalog.write() as conn:
            conn.execute(
                update(codec_queue)
                .where(codec_queue.c.id == queue_id)
                .values(attempts=attempts, next_attempt_at=utcnow() + delay, last_error=error[:2000])
            )

    # ---- counting ----------------------------------------------------------------------------

    def _bump(self, name: str, by: int = 1) -> None:
        with self._lock:
            self.counts[name] += by

    def _count(self, outcome: Outcome) -> None:
        with self._lock:
            self.counts[outcome.status.value] += 1
            if outcome.status is Status.COMPRESSED:
                self.counts["bytes_before"] += outcome.size_before
                self.counts["bytes_after"] += outcome.size_after

    def metrics(self) -> dict[str, float]:
        """Counters since start plus the queue's depth — for Prometheus."""
        with self._lock:
            out = {k: float(v) for k, v in self.counts.items()}
        out["backlog"] = float(self.backlog())
        return out


@dataclass(frozen=True)
class Prepared:
    """:func:`compress`'s outcome and, when it compressed, what the catalog row needs of the new
    file — worked out where the encoding ran (a child process), not in the node's process whose
    interpreter lock the C-STORE threads need."""

    outcome: Outcome
    transfer_syntax: str = ""
    study: str = ""
    series: str = ""
    sop: str = ""
    sha256: str = ""
    pixel_offset: int | None = None
    pixel_length: int | None = None
    metadata_json: str = ""


def prepare(data: bytes, codec: Codec, *, transcode_lossless: bool = False) -> Prepared:
    """Compress ``data`` (``transcode.compress``: verified bit for bit) and read the result's header
    for the catalog: transfer syntax, identity, pixel data location, DICOM JSON, SHA-256."""
    outcome = compress(data, codec, transcode_lossless=transcode_lossless)
    new = outcome.data
    if outcome.status is not Status.COMPRESSED or new is None:
        return Prepared(outcome)
    with io.BytesIO(new) as fh:
        ds, pixel_at = _read_header(fh)
        ts = str(ds.file_meta.TransferSyntaxUID)
        located = None
        if pixel_at is not None:
            complete, located = _check_pixel_element(fh, pixel_at, len(new), ts)
            if not complete:
                raise ValueError("the compressed file's pixel data element is incomplete")
            located = _frame_location(ds, ts, located)
    study, series_uid, sop, _ = InstanceRecord.identify(ds)
    return Prepared(
        outcome,
        transfer_syntax=ts,
        study=study,
        series=series_uid,
        sop=sop,
        sha256=hashlib.sha256(new).hexdigest(),
        pixel_offset=located.offset if located is not None else None,
        pixel_length=located.length if located is not None else None,
        metadata_json=metadata_json(
            ds, study=study, series=series_uid, sop=sop, has_pixels=pixel_at is not None
        ),
    )
