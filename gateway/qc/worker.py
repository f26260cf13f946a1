"""The QC worker: grades queued instances off the ingest path (R-QC-1 front-end, R-CE-5 center).

Threads take due rows of ``qc_queue`` (:meth:`QcBook.claim`, leased), read the stored bytes,
check them against the catalogued SHA-256, grade them with the :class:`QcEngine`, and store the
result and drop the queue row in one transaction. The C-STORE / STOW-RS answer never waits for
it. With ``processes`` (what the nodes use) the grading runs in a pool of spawned processes, one
per worker thread: in the node's own process its Python work would hold the GIL the DIMSE and
HTTP threads need, and ingest would slow down (``bench/qc.py``). A failure backs off and is
retried; at start, :meth:`QcBook.backfill` takes back rows a dead run had claimed and queues
instances stored while QC was off.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from typing import Any

from gateway.archive.blobstore import BlobNotFound, BlobStore
from gateway.qc.book import QcBook
from gateway.qc.engine import QcEngine
from gateway.qc.result import QcResult
from gateway.qc.rules import QcRules

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
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self.graded = 0
        self.millis = 0.0  # total grading time, for /metrics-style reporting

    def start(self) -> None:
        if self.processes:
            self._pool = _new_pool(self.workers, self.engine.rules)
        queued = self.book.backfill()
        if queued:
            log.info("QC: %d stored instances queued for grading", queued)
        for n in range(self.workers):
            t = threading.Thread(target=self._loop, name=f"qc-{n}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(30)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.run_once()
            except Exception:  # a database hiccup must not kill the worker
                log.exception("QC pass failed")
                worked = False
            if not worked:
                self._wake.wait(0.25)
                self._wake.clear()

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
        seen: set[int] = set()
        while time.monotonic() < deadline:
            rows = [r for r in self.book.claim(limit=8, study_uid=study_uid) if r["id"] not in seen]
            if not rows:
                break
            for row in rows:
                seen.add(row["id"])
                self.grade(row)
        return self.book.queued(study_uid)

    def grade(self, row: dict[str, Any]) -> QcResult | None:
        started = time.perf_counter()
        try:
            data = self._read(row)
            result = self._assess(data)
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

    def _assess(self, data: bytes) -> QcResult:
        pool = self._pool
        if pool is None:
            return self.engine.assess_bytes(data)
        try:
            return pool.submit(_assess_in_child, data).result()
        except BrokenProcessPool:  # a child died (e.g. out of memory): a new pool, this one retried
            with self._pool_lock:
                if self._pool is pool:
                    self._pool = _new_pool(self.workers, self.engine.rules)
            raise


_child_engine: QcEngine | None = None


def _init_child(rules: QcRules) -> None:
    global _child_engine
    # Ctrl-C reaches the whole process group: the node stops its pool itself, so a child must not
    # die on SIGINT mid-task (and print a KeyboardInterrupt traceback over the node's shutdown)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _child_engine = QcEngine(rules)


def _assess_in_child(data: bytes) -> QcResult:
    assert _child_engine is not None
    return _child_engine.assess_bytes(data)


def _new_pool(workers: int, rules: QcRules) -> ProcessPoolExecutor:
    # spawn, not fork: the node has threads (DIMSE, HTTP, forwarder) a fork would copy mid-flight
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_child,
        initargs=(rules,),
    )
