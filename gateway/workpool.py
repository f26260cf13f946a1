"""What the compression stage and the QC worker share: spawned child processes and polling threads.

Both take rows off a durable queue in threads of the node's process and hand the CPU-heavy part
(encode + verify, pixel measures) to child processes, so that the DIMSE and HTTP threads keep the
interpreter lock (R-UP-1, R-QC-1; ``bench/codec.py``). :class:`ChildPool` is that pool of spawned
processes, replaced when a child dies; :class:`LoopThreads` runs ``step`` in a few threads until
stopped, sleeping until woken (or ``idle`` seconds) whenever a step found nothing to do.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def resolve_workers(value: int | str) -> int:
    """A ``workers`` setting as a count: ``"auto"`` is the number of CPUs this process may use."""
    if value == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return max(1, os.cpu_count() or 1)
    return max(1, int(value))


PARENT_CHECK = 1.0  # seconds between a child's looks at whether the node is still there


def _exit_with(parent: int) -> None:
    """End this child once ``parent`` (the node) is gone.

    A ``ProcessPoolExecutor`` worker waits for work on a queue whose pipe it holds both ends of,
    so a node killed with SIGKILL (or by the OOM killer) leaves its workers waiting for ever,
    ~170 MB each, one more set per crash and restart. ``PR_SET_PDEATHSIG`` would not do: it fires
    when the *thread* that started the child ends (the executor starts workers from whichever
    thread submits), not the process. So the child looks at its parent once a second.
    """
    while True:
        time.sleep(PARENT_CHECK)
        if os.getppid() != parent:
            os._exit(0)


def _child_init(parent: int, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    # Ctrl-C reaches the whole process group: the node stops its pool itself, so a child must not
    # die on SIGINT mid-task (and print a KeyboardInterrupt traceback over the node's shutdown)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent,), name="exit-with-node", daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


class ChildPool:
    """``workers`` spawned processes (never forked: the node has threads, sockets and database
    connections a fork would copy mid-flight); a child that died (out of memory?) gets the pool
    replaced, and the call that saw it raises, for its caller to retry later."""

    def __init__(
        self,
        workers: int,
        initializer: Callable[..., None] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        self.workers = workers
        self._initializer = initializer
        self._initargs = initargs
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = self._new()

    def _new(self) -> ProcessPoolExecutor:
        # spawn, unlike forkserver, needs no socket in the temp folder (which the DICOM server
        # moves to its spool)
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_child_init,
            initargs=(os.getpid(), self._initializer, self._initargs),
        )

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in a child; waits for the answer."""
        pool = self._pool
        if pool is None:
            raise RuntimeError("the process pool is shut down")
        try:
            return pool.submit(fn, *args, **kwargs).result()
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:  # the first thread to notice replaces it
                    self._pool = self._new()
                    pool.shutdown(wait=False)
            raise

    def shutdown(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class LoopThreads:
    """``count`` daemon threads calling ``step(n)`` (``n`` = the thread's number) until stopped; a
    step that returns False (nothing due) waits for :meth:`wake` or ``idle`` seconds. An exception
    (a bug, a database hiccup) is logged and must not kill the thread."""

    def __init__(self, name: str, step: Callable[[int], bool], count: int, *, idle: float) -> None:
        self.name = name
        self.step = step
        self.count = count
        self.idle = idle
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._stop.clear()
        self._threads = [t for t in self._threads if t.is_alive()]
        for n in range(self.count):
            t = threading.Thread(target=self._loop, args=(n,), name=f"{self.name}-{n}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _loop(self, n: int) -> None:
        while not self._stop.is_set():
            try:
                worked = self.step(n)
            except Exception:
                log.exception("%s pass failed", self.name)
                worked = False
            if not worked:
                self._wake.wait(self.idle)
                self._wake.clear()
