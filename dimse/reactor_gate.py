"""A pause for pynetdicom's association reactor that waits until the reactor has really stopped.

**Why.** Every ``Association.send_*`` method (and ``release()``) of pynetdicom 3.0 pauses the
association's reactor thread so that the reactor does not take the peer's response off the DIMSE
queue: it clears ``_reactor_checkpoint`` (a :class:`threading.Event`), waits until the reactor
flag ``_is_paused`` is true, sends the request and reads the response. The reactor sets
``_is_paused = True``, waits on the checkpoint, then sets ``_is_paused = False`` and looks at the
queue. When the send begins just after the checkpoint let the reactor through but before the
reactor reset the flag, the sender sees a stale ``True``, goes on, and the reactor takes the
response as it arrives: pynetdicom logs "Received unexpected C-STORE service message" and the
sender waits out the DIMSE timeout, then aborts (pynetdicom issue #875 reports the same for
C-FIND). A peer that answers fast makes it likely: with ybyx's own receive path
(:mod:`dimse.store_receiver`) answering in a few milliseconds, CI lost an association this way
while ``ybyx send`` fed the test archive (``tests/test_qido.py``'s fixture), and
``test_forwarding``'s C-MOVE flaked the same way.

**What.** :class:`ReactorGate` replaces the checkpoint with one whose ``clear()`` returns only once
the reactor is parked inside the checkpoint's ``wait()`` — one condition holds both "open" and
"parked", so the reactor cannot slip through between them — or when the caller *is* the reactor
(a service handler sending on its own association; the reactor's network-timeout release), or the
reactor is gone. Nothing else of pynetdicom changes. :func:`gate` fits it to an association (our
SCP's accepted associations get it from :func:`dimse.fastpath.upgrade`); :class:`AE` is
pynetdicom's AE whose ``associate()`` returns gated associations, for every SCU in this project.

Private pynetdicom 3.0 attributes relied on: ``Association._reactor_checkpoint`` and ``_kill``;
only applied on the versions :mod:`dimse.fastpath` accepts.
"""

from __future__ import annotations

import threading
from typing import Any

import pynetdicom
from pynetdicom.association import Association

# The pynetdicom versions whose private reactor attributes this module (and dimse.fastpath, which
# imports the gate from here) were written against.
SUPPORTED = ("3.0.",)


def supported(version: str) -> bool:
    return version.startswith(SUPPORTED)


_ENABLED = supported(pynetdicom.__version__)
_POLL = 0.05  # how often a waiting clear() looks whether the reactor is still alive


class ReactorGate(threading.Event):
    """``Association._reactor_checkpoint`` whose ``clear()`` waits for the reactor to park.

    ``bell``: an event the reactor waits on between rounds (:mod:`dimse.fastpath`'s acceptor),
    rung by ``clear()`` so that the reactor comes to the gate at once.
    """

    def __init__(self, assoc: Association, bell: threading.Event | None = None) -> None:
        super().__init__()
        self._assoc = assoc
        self._bell = bell
        self._gate = threading.Condition(threading.Lock())
        self._open = True
        self._parked = False  # the reactor is inside wait(), not let through

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        with self._gate:
            self._open = True
            self._gate.notify_all()

    def clear(self) -> None:
        with self._gate:
            self._open = False
        if self._bell is not None:
            self._bell.set()
        assoc = self._assoc
        if threading.current_thread() is assoc:
            return  # the reactor pausing itself: it is not in wait(), and won't be
        with self._gate:
            while not self._parked and not self._open and assoc.is_alive() and not assoc._kill:
                self._gate.wait(_POLL)

    def wait(self, timeout: float | None = None) -> bool:
        """The reactor's pause point (pynetdicom calls it from the reactor thread only)."""
        with self._gate:
            self._parked = True
            self._gate.notify_all()
            try:
                return self._gate.wait_for(lambda: self._open, timeout)
            finally:
                self._parked = False


def gate(assoc: Association, bell: threading.Event | None = None) -> Association:
    """Give ``assoc`` a :class:`ReactorGate` (on pynetdicom 3.0.x; else leave it as it is)."""
    if _ENABLED and not isinstance(assoc._reactor_checkpoint, ReactorGate):
        checkpoint = ReactorGate(assoc, bell)
        checkpoint._open = assoc._reactor_checkpoint.is_set()  # a pause in force stays
        assoc._reactor_checkpoint = checkpoint
    return assoc


class AE(pynetdicom.AE):
    """pynetdicom's AE, its associations gated (:func:`gate`): use it for every SCU."""

    def associate(self, *args: Any, **kwargs: Any) -> Association:
        return gate(super().associate(*args, **kwargs))
