"""The intake journal: one disk flush per received instance, with nothing acknowledged lost.

**Why.** An instance is acknowledged (C-STORE success, STOW-RS 200) only once its bytes and its
catalog row are durable. Done one after the other that is two or three flushes of the disk per
instance — the file, its folder, the catalog's commit — where Orthanc does one (issue 2 "Numbers":
on a slow disk each flush is ~1 ms, most of what the instance costs).

**What.** For the embedded node (folder blob store + SQLite catalog) ingest gives each received
file one more hard link, in this journal's folder, *before* the file's single ``fsync``
(:meth:`gateway.archive.blobstore.FolderBlobStore.put_file`): the file's data, its name in the
store and its name here reach the disk together. The catalog row is then committed without a
flush of its own (:meth:`gateway.archive.catalog.Catalog.write` ``deferred``; SQLite's commit is
still atomic and survives the process being killed), and the instance is acknowledged. A thread
here flushes the catalog (:meth:`~gateway.archive.catalog.Catalog.sync`) every
:data:`SYNC_INTERVAL` while names wait, then removes the names whose rows it made durable — one
flush for many instances.

**After a crash** (of the machine: a killed process loses no commit) a name may still be here
whose row did not reach the disk. :meth:`gateway.ingest.Ingest.recover` runs when the node
opens, before it accepts anything: each leftover file is read, and if the catalog has no row
for it while the store still holds it under its key, it is catalogued again (audited as
recovered); then the name is removed.
A name whose file is not what its key says (the machine stopped before the ``fsync`` of an
instance that was therefore never acknowledged) is removed without cataloguing.

The file's name records the sending AE title (hex), so a recovered row has its source.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SYNC_INTERVAL = 0.25  # seconds a name waits at most (beyond the flush) before its row is flushed
SUFFIX = ".dcm"


def source_of(name: Path) -> str:
    """The sending AE title recorded in a journal file's name ("" if none or unreadable)."""
    parts = name.name.removesuffix(SUFFIX).split(".")
    try:
        return bytes.fromhex(parts[1]).decode("ascii") if len(parts) == 2 else ""
    except (ValueError, UnicodeDecodeError):
        return ""


class IntakeJournal:
    """Names of instances whose catalog rows are committed but maybe not yet on disk."""

    def __init__(self, folder: Path, sync: Callable[[], None], interval: float = SYNC_INTERVAL) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._sync = sync
        self._interval = interval
        self._waiting: list[Path] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.syncs = 0  # flushes done (a count for tests)

    def new_name(self, source: str) -> Path:
        """A fresh name for the next instance from ``source``."""
        return self.folder / f"{uuid.uuid4().hex}.{source.encode('ascii', 'replace').hex()}{SUFFIX}"

    def leftovers(self) -> list[Path]:
        """Names left by an earlier run (call before the node accepts anything)."""
        return sorted(p for p in self.folder.iterdir() if p.name.endswith(SUFFIX))

    def committed(self, name: Path) -> None:
        """The row of the instance linked at ``name`` is committed (not flushed yet)."""
        with self._cond:
            if self._closed:
                # stopping: nothing flushes later; make it durable now
                self._sync()
                name.unlink(missing_ok=True)
                return
            self._waiting.append(name)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="intake-sync", daemon=True)
                self._thread.start()
            self._cond.notify()

    def discard(self, name: Path) -> None:
        """The instance was not catalogued by this commit (refused, a duplicate): drop its name."""
        name.unlink(missing_ok=True)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if not self._waiting and self._closed:
                    return
                # let more commits join this flush, unless stopping
                deadline = time.monotonic() + self._interval
                while not self._closed and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                batch, self._waiting = self._waiting, []
            self._flush(batch)

    def _flush(self, batch: list[Path]) -> None:
        try:
            self._sync()
        except OSError as exc:
            # keep the names: they are the record that these rows may not be durable yet
            log.error(
                "flushing the catalog failed (%s): %d instances kept in %s", exc, len(batch), self.folder
            )
            with self._cond:
                self._waiting[:0] = batch
            return
        self.syncs += 1
        for name in batch:
            name.unlink(missing_ok=True)

    def close(self) -> None:
        """Flush what waits and stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._cond:
            batch, self._waiting = self._waiting, []
        if batch:
            self._flush(batch)


def owns(path: Path, stored: Path) -> bool:
    """Whether the journal file ``path`` is the very file stored at ``stored``."""
    try:
        return os.path.samefile(path, stored)
    except OSError:
        return False
