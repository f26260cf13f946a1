"""The QC worker: grades queued instances off the ingest path (R-QC-1 front-end, R-CE-5 center).

Threads take due rows of ``qc_queue`` (:meth:`QcBook.claim`, leased), read the stored bytes,
check them against the catalogued SHA-256, grade them with the :class:`QcEngine`, and store the
result and drop the queue row in one transaction. A slice of a sampled modality is graded by its
header first; the book queues the series' sample again for the pixel measures once every header
of the study is graded (``gateway/qc/sampling.py``). The C-STORE / STOW-RS answer never waits for
it. With ``processes`` (what the nodes use) the grading runs in a pool of spawned processes, one
per worker thread: in the node's own process its Python work would hold the GIL the DIMSE and
HTTP threads need, and ingest would slow down (``bench/qc.py``). A failure backs off and is
retried; at start, :meth:`QcBook.backfill` takes back rows a dead run had claimed and queues
instances stored while QC was off.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from gateway.archive.blobstore import BlobNotFound, BlobStore
from gateway.qc.book import QcBook
from gateway.qc.engine import QcEngine
from gateway.qc.result import QcResult
from gateway.qc.rules import QcRules
from gateway.workpool import ChildPool, LoopThreads

log = logging.getLogger(__name__)


class QcWorker:
    """Grades the queue of one catalog with one engine."""

    def __init__(
        self,
        book: QcBook,
        engine: QcEngine,
        store: BlobStore,
        *,
        workers: int = 1,
        on_graded: Callable[[QcResult], None] | None = None,
        processes: bool = False,
    ) -> None:
        self.book = book
        self.engine = engine
        self.store = store
        self.workers = workers
        self.on_graded = on_graded  # e.g. wake the forwarder
        self._threads = LoopThreads("qc", lambda _n: self.run_once(), workers, idle=0.25)
        self.processes = processes
        self._pool: ChildPool | None = None
        self.graded = 0
        self.millis = 0.0  # total grading time, for /metrics-style reporting

    def start(self) -> None:
        if self.processes and self._pool is None:
            self._pool = ChildPool(self.workers, _init_child, (self.engine.rules,))
        queued = self.book.backfill()
        if queued:
            log.info("QC: %d stored instances queued for grading", queued)
        self._threads.start()

    def stop(self) -> None:
        self._threads.stop(30)
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def wake(self) -> None:
        self._threads.wake()

    def run_once(self, *, study_uid: str | None = None, limit: int = 4) -> bool:
        """Grade up to ``limit`` due rows (or one study's queued rows); True if there were any."""
        rows = self.book.claim(limit=limit, study_uid=study_uid)
        for row in rows:
            self.grade(row)
        return bool(rows)

    def grade_study(self, study_uid: str, *, budget_seconds: float = 10.0) -> int:
        """Grade what of the study is still queued, now (the center's manifest answer), each
        row once and for at most ``budget_seconds`` (the front-end waits for the answer); the
        number of its instances still queued after."""
        deadline = time.monotonic() + budget_seconds
        for _ in range(2):  # what is queued; then the series' samples (they need every header)
            seen: set[int] = set()  # per pass: SQLite may give a new row a deleted row's id
            while time.monotonic() < deadline:
                rows = [r for r in self.book.claim(limit=8, study_uid=study_uid) if r["id"] not in seen]
                if not rows:
                    break
                for row in rows:
                    seen.add(row["id"])
                    self.grade(row)
            if self.book.queued(study_uid) or not self.book.queue_samples(study_uid):
                break
        return self.book.queued(study_uid)

    def grade(self, row: dict[str, Any]) -> QcResult | None:
        started = time.perf_counter()
        try:
            data = self._read(row)
            # the first pass may leave a slice's pixels to its series' sample; a row the book
            # queued again for that sample ("measure") gets the full measures
            result = self._assess(data, defer_pixels=not row.get("measure", False))
            if result.sop_uid != row["sop_uid"]:  # the catalog's key wins over a broken header
                result = replace(result, sop_uid=row["sop_uid"])
        except Exception as exc:  # unreadable blob, bug: retried with backoff, never lost
            log.warning("QC of %s failed: %s", row["sop_uid"], exc)
            self.book.failed(row["id"], f"{type(exc).__name__}: {exc}")
            return None
        self.book.store(result, version=row["version"], queue_id=row["id"])
        self.graded += 1
        self.millis += 1000 * (time.perf_counter() - started)
        if self.on_graded is not None:
            self.on_graded(result)
        return result

    def _read(self, row: dict[str, Any]) -> bytes:
        """The instance's stored bytes, checked against the catalog. The compression stage may have
        replaced them since the row was claimed (new blob, old one deleted): then read again what
        the catalog says now (same version: the pixels are the same, bit for bit)."""
        for attempt in (1, 2):
            try:
                data = b"".join(self.store.get(row["blob_key"]))
                if hashlib.sha256(data).hexdigest() == row["sha256"]:
                    return data
            except BlobNotFound:
                if attempt == 2:
                    raise
            now = self.book.current(row["sop_uid"])
            if now is None or now == {k: row[k] for k in now}:
                break
            row.update(now)
        raise ValueError(f"stored bytes of {row['sop_uid']} do not match the catalog's SHA-256")

    def _assess(self, data: bytes, *, defer_pixels: bool) -> QcResult:
        if self._pool is None:
            return self.engine.assess_bytes(data, defer_pixels=defer_pixels)
        # a child that dies (e.g. out of memory) raises here: the row is retried with backoff
        return self._pool.run(_assess_in_child, data, defer_pixels)


_child_engine: QcEngine | None = None


def _init_child(rules: QcRules) -> None:
    global _child_engine
    _child_engine = QcEngine(rules)


def _assess_in_child(data: bytes, defer_pixels: bool) -> QcResult:
    assert _child_engine is not None
    return _child_engine.assess_bytes(data, defer_pixels=defer_pixels)
