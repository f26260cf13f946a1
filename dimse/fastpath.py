"""Event-driven reactors for the associations our SCP accepts (relies on pynetdicom 3.0.x internals).

**Why.** pynetdicom runs two threads per association, and both poll:

* the DUL reactor (``DULServiceProvider.run_reactor``) sleeps ``_run_loop_delay`` (1 ms) whenever
  it found nothing to do, so the first PDU of a request and the response the association thread
  queued for sending each wait up to ~1 ms (``time.sleep(0.001)`` is ~1.06 ms on Linux);
* the association reactor (``Association._run_reactor``) sleeps a hard-coded 1 ms before every
  look at the queue of decoded DIMSE messages, so a complete C-STORE request waits up to ~1 ms
  more before its handler runs.

With dcmtk ``storescu`` (one request in flight per association) these waits sit on every
instance's critical path. Measured with ``bench/ingest.py``'s series (300 × 526 KB CT, 2 cores,
alternating runs, median of 5): 104 → 124 instances/s with one association and 89 → 107 with two,
server CPU 7.7 → 6.8 ms per instance. Setting ``dul._run_loop_delay = 0`` from an EVT_ESTABLISHED
handler instead (a private attribute too) measured *slower* (97 instances/s, 9.6 ms CPU): it turns
the DUL sleep into a busy loop that burns a core and fights for the GIL, and cannot reach the
association reactor's hard-coded sleep.

**What.** Subclasses replace those two loops with waits that wake as soon as there is work:

* :class:`_EventDUL` — ``run_reactor`` is pynetdicom 3.0.4's loop, line for line, except that the
  idle ``time.sleep`` is ``select()`` on the association socket *and* a wake-up socket pair, with
  a timeout (:data:`IDLE_WAIT`) so the ARTIM timer and kill flag are still looked at. ``send_pdu``,
  ``kill_dul`` and ``stop_dul`` ring the wake-up socket. After every state-machine action that
  left something for the association thread (a decoded DIMSE message, an A-RELEASE/A-ABORT
  primitive) it sets the association's doorbell.
* :class:`_BulkSocket` — ``recv`` fills one buffer with ``recv_into`` instead of 4 KiB ``recv``
  calls appended to a ``bytearray`` (same contract; ~32 fewer system calls per 128 KiB PDU).
* :class:`_EventAssociation` — ``_run_reactor`` is 3.0.4's loop, except that the 1 ms sleep is a
  wait on that doorbell (an :class:`threading.Event`, with timeout :data:`IDLE_WAIT` for the
  network-idle timer). A thread that pauses the reactor to send on the association (``release()``,
  ``abort()``, N-EVENT-REPORT for storage commitment) clears ``_reactor_checkpoint``, which here
  rings the doorbell and returns once the reactor is parked at its pause point
  (:class:`dimse.reactor_gate.ReactorGate`, which also closes pynetdicom's race there): the reactor
  reaches that point at once, and is paused *only* there, as in 3.0.4. (Counting the idle wait
  as paused looked equivalent but was not: a commitment report could then take the association
  before the reactor had seen the modality's A-RELEASE-RQ that had just arrived, and the release
  response then crossed the abort that followed the report's timeout — an InvalidEventError in the
  DUL thread, 3 runs in 6 of ``test_commitment``'s hang-up test.)

One deliberate difference: in Sta13 (the association is over, awaiting the transport close) a local
P-DATA request, A-RELEASE response or A-ABORT request (Evt9, Evt14, Evt15) is dropped with a log
line instead of raising ``InvalidEventError`` and ending the DUL thread with a traceback. It happens
when a thread that paused the reactor to send on the association (storage commitment's
N-EVENT-REPORT) times out while the peer was releasing: the reactor answers the release and the
timed-out sender aborts, both for an association already closing; and when a C-STORE response the
store receiver queued (``dimse/store_receiver.py``) finds the association aborted meanwhile (by the
server stopping, say). Faster responses made the first race visible in ``test_commitment``
(modality hangs up right after its N-ACTION); 3.0.4's thread would die the same way on that timing.

**C-STORE.** While established, every P-DATA-TF PDU read goes first to the association's
:class:`dimse.store_receiver.StoreReceiver` (when the server has a ``store_sink``), which takes the
C-STORE requests it recognises and leaves the rest to pynetdicom's decoding, as before.

Nothing else changes: PDU decoding (of what the receiver leaves), the state machine, events and
statuses are pynetdicom's own. Only associations accepted by :class:`dimse.server.DicomServer` get
these classes (its request handler upgrades each new ``Association`` before its threads start);
the library's classes are not patched; our SCU associations get only the reactor gate
(:class:`dimse.reactor_gate.AE`).

**Private pynetdicom attributes relied on** (read against 3.0.4, the version this was written and
measured with; the gate below trusts 3.0.x patch releases to keep them — re-read on upgrade):
``Association._kill``,
``_is_paused``, ``_reactor_checkpoint``, ``_dul_ready``, ``_serve_request``, ``dimse.msg_queue``;
``DULServiceProvider._kill_thread``, ``_run_loop_delay``, ``_idle_timer``, ``event_queue``,
``to_provider_queue``, ``to_user_queue``, ``_process_recv_primitive``, ``_is_transport_event``,
``state_machine``; and ``threading.Thread._target`` (re-pointed at the subclass's reactor).

**Version check.** :data:`ENABLED` is true only for pynetdicom 3.0.x (and unless the environment
sets ``YBYX_DIMSE_FASTPATH=0``); otherwise :func:`request_handler` returns pynetdicom's own
``RequestHandler`` and a warning is logged once: the SCP works as before, only slower. Covered by
``tests/test_ingest_speed.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import struct
import threading
import time
from typing import Any, cast

import pynetdicom
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import InvalidEventError
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT, A_RELEASE, P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler
from pynetdicom.utils import make_target

from dimse.reactor_gate import gate
from dimse.reactor_gate import supported as _supported
from dimse.store_receiver import StoreReceiver, StoreSink

log = logging.getLogger(__name__)
# The reactors log what pynetdicom's own would, under its logger.
_pnd_log = logging.getLogger("pynetdicom")

# Longest idle wait of either reactor: bounds how late an expired ARTIM or network-idle timer, or
# a kill from another thread that did not ring, is noticed. Work wakes the reactors at once.
IDLE_WAIT = 0.05


ENABLED = _supported(pynetdicom.__version__) and os.environ.get("YBYX_DIMSE_FASTPATH", "1") != "0"
# The lean C-STORE receive path (dimse/store_receiver.py) on top; YBYX_LEAN_STORE=0 leaves C-STORE
# to pynetdicom's own path (for comparison in bench/ingest.py and the tests of both).
LEAN_STORE = os.environ.get("YBYX_LEAN_STORE", "1") != "0"


def _moot(event: str, state: str) -> bool:
    """A local P-DATA request (a C-STORE response the receiver queued, dimse/store_receiver.py),
    release response or abort request for an association already awaiting close."""
    return state == "Sta13" and event in ("Evt9", "Evt14", "Evt15")


class _EventDUL(DULServiceProvider):
    """A DUL reactor that sleeps in ``select()`` on its socket and a wake-up socket pair."""

    _wake_r: socket.socket | None
    _wake_w: socket.socket | None
    _wake_lock: threading.Lock
    _bell: threading.Event
    _store: tuple[StoreSink, threading.Lock] | None
    _receiver: StoreReceiver | None

    def _fast_init(
        self, bell: threading.Event, store: tuple[StoreSink, threading.Lock] | None = None
    ) -> None:
        self._bell = bell
        self._store = store
        self._receiver = None
        # Guards the wake-up sockets against being written while the reactor closes them (a
        # closed descriptor number can be reused by another thread's file at once).
        self._wake_lock = threading.Lock()
        try:
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
        except OSError:  # out of descriptors: fall back to the timed sleep
            self._wake_r = self._wake_w = None
        # Thread.__init__ bound the thread's target to DULServiceProvider.run_reactor.
        self._target = make_target(self.run_reactor)

    # ---- waking ------------------------------------------------------------------------------

    def _wake(self) -> None:
        with self._wake_lock:
            w = self._wake_w
            if w is not None:
                with contextlib.suppress(OSError):  # full: rung already
                    w.send(b"\0")

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._wake()
        return super().stop_dul()

    def send_now(self, pdu: bytes) -> bool:
        """Send an encoded P-DATA-TF PDU at once, as the state machine's DT-1 action would (Sta6,
        Evt9: send it, stay in Sta6), from this reactor's own thread and only when nothing is
        queued ahead of it; False: not now (queue a primitive instead). Used for the C-STORE
        responses of :class:`StoreReceiver`, which runs in this thread: the primitive, its queue,
        the state machine and pynetdicom's PDU encoder cost ~0.2 ms of CPU per instance."""
        if (
            threading.current_thread() is not self
            or self.state_machine.current_state != "Sta6"
            or self.to_provider_queue.queue
            or self.socket is None
        ):
            return False
        self.socket.send(pdu)
        return True

    def _idle_wait(self) -> None:
        """Wait until the peer sent something, a primitive is queued, or :data:`IDLE_WAIT`."""
        r = self._wake_r
        sock = getattr(self.socket, "socket", None)
        if r is None or sock is None:
            time.sleep(self._run_loop_delay)
            return
        if self.to_provider_queue.queue or (hasattr(sock, "pending") and sock.pending()):
            return  # work queued already / TLS has buffered bytes select() cannot see
        try:
            ready, _, _ = select.select([sock, r], [], [], IDLE_WAIT)
        except (OSError, ValueError):  # socket closed under us: the loop finds out; pace it as 3.0.4
            time.sleep(self._run_loop_delay)
            return
        if r in ready:
            try:
                while r.recv(4096):
                    pass
            except OSError:
                pass

    def _drop_moot(self, event: str) -> None:
        """Discard the queued primitive behind a moot Evt9/Evt14/Evt15 (its FSM action would have)."""
        kinds: tuple[type, ...] = {"Evt9": (P_DATA,), "Evt14": (A_RELEASE,)}.get(event, (A_ABORT, A_P_ABORT))
        try:
            head = self.to_provider_queue.queue[0]
        except IndexError:
            return
        if isinstance(head, kinds):
            with contextlib.suppress(queue.Empty):
                self.to_provider_queue.get(block=False)
        _pnd_log.info("%s after the association ended (Sta13): nothing left to do", event)

    def _ring_assoc(self) -> None:
        assoc = self.assoc
        if assoc.dimse.msg_queue.queue or self.to_user_queue.queue or assoc._kill:
            self._bell.set()

    # ---- reading PDUs: pynetdicom 3.0.4 _read_pdu_data, C-STORE data taken by the receiver --------

    def _store_receiver(self) -> StoreReceiver | None:
        if self._receiver is None and self._store is not None:
            sink, send_lock = self._store
            self._receiver = StoreReceiver(self.assoc, sink, send_lock)
        return self._receiver

    def _read_pdu_data(self) -> None:
        """3.0.4's ``_read_pdu_data`` (same events for the same failures), except that while the
        association is established a P-DATA-TF PDU goes to the :class:`StoreReceiver` first; what
        it leaves (other DIMSE messages) is decoded by pynetdicom as before."""
        sock = cast(AssociationSocket, self.socket)
        try:
            header = sock.recv(6)
        except (OSError, TimeoutError) as exc:
            _pnd_log.error("Connection closed before the entire PDU was received")
            _pnd_log.exception(exc)
            self.event_queue.put("Evt17")
            return
        try:
            pdu_type, _, pdu_length = struct.unpack(">BBL", header)
        except struct.error:
            self.event_queue.put("Evt17")
            return
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            _pnd_log.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
            self.event_queue.put("Evt19")
            return
        try:
            body = sock.recv(pdu_length)
        except (OSError, TimeoutError) as exc:
            _pnd_log.error("Connection closed before the entire PDU was received")
            _pnd_log.exception(exc)
            self.event_queue.put("Evt17")
            return
        if len(body) != pdu_length:
            _pnd_log.error(
                f"The received PDU is shorter than expected ({len(body) + 6} of "
                f"{6 + pdu_length} bytes received)"
            )
            self.event_queue.put("Evt17")
            return

        bytestream: bytes | bytearray | None = None  # the PDU for pynetdicom, made only if needed
        receiver = self._store_receiver() if pdu_type == 0x04 else None
        if receiver is not None and self.state_machine.current_state == "Sta6":
            try:
                with memoryview(body) as view:
                    rest = receiver.take(view, pynetdicom_busy=self.assoc.dimse.message is not None)
            except ValueError:
                rest = None  # malformed items: pynetdicom decodes and reports the PDU as before
            if rest is not None:
                if not rest:
                    return  # all of it was C-STORE data for the receiver
                items = b"".join(struct.pack(">IB", len(pdv) + 1, cid) + pdv for cid, pdv in rest)
                bytestream = struct.pack(">BBL", 0x04, 0, len(items)) + items

        if bytestream is None:
            bytestream = header + body  # (a copy of the PDU: not made for C-STORE data taken above)
        try:
            pdu, event = self._decode_pdu(bytearray(bytestream))
            self.event_queue.put(event)
        except Exception as exc:
            _pnd_log.error("Unable to decode the received PDU data")
            _pnd_log.exception(exc)
            self.event_queue.put("Evt19")
            return
        self._recv_pdu.put(pdu)

    # ---- the reactor: pynetdicom 3.0.4 DULServiceProvider.run_reactor, waits replaced -----------

    def run_reactor(self) -> None:
        try:
            self._run_event_reactor()
        finally:
            if self._receiver is not None:
                self._receiver.close()
            self._bell.set()  # the association thread checks dul.is_alive()
            with self._wake_lock:
                for sock in (self._wake_r, self._wake_w):
                    if sock is not None:
                        sock.close()
                self._wake_r = self._wake_w = None

    def _run_event_reactor(self) -> None:
        self._idle_timer.start()
        self.socket = cast(Any, self.socket)
        sleep = False

        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True

            if sleep:
                self._idle_wait()

            if self._kill_thread:
                break

            if self.artim_timer.expired:
                self.event_queue.put("Evt18")

            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                _pnd_log.error("Exception in DUL.run(), aborting association")
                _pnd_log.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return

            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue

            try:
                self.state_machine.do_action(event)
            except InvalidEventError:
                if not _moot(event, self.state_machine.current_state):
                    raise
                self._drop_moot(event)
            self._ring_assoc()
            sleep = False


class _BulkSocket(AssociationSocket):
    """``recv`` fills one buffer with as few system calls as the kernel allows.

    pynetdicom 3.0.4 reads a PDU in 4 KiB ``recv`` calls appended to a ``bytearray``: ~32 calls,
    and as many GIL hand-overs, per 128 KiB P-DATA-TF PDU. Same contract: blocks until
    ``nr_bytes`` arrived, returns fewer only when the peer closed the connection; socket errors and
    timeouts propagate unchanged.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        buf = bytearray(nr_bytes)
        with memoryview(buf) as view:
            got = 0
            while got < nr_bytes:
                n = sock.recv_into(view[got:], nr_bytes - got)
                if not n:
                    break
                got += n
        if got < nr_bytes:
            del buf[got:]
        return buf


class _EventAssociation(Association):
    """An acceptor whose reactor waits on a doorbell the DUL rings instead of polling every 1 ms."""

    _bell: threading.Event

    def kill(self) -> None:
        super().kill()
        self._bell.set()

    # ---- pynetdicom 3.0.4 Association._run_reactor, the 1 ms sleep replaced -----------------------

    def _run_reactor(self) -> None:
        bell = self._bell
        served = False
        self._is_paused = False
        while not self._kill:
            if not served:
                bell.wait(IDLE_WAIT)  # was: time.sleep(0.001)
            bell.clear()

            # 3.0.4: a thread that wants to use the association pauses the reactor here
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            served = msg is not None
            if msg:
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                _pnd_log.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                _pnd_log.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                _pnd_log.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()

                self.kill()
                return


def _locked_send(assoc: Association, lock: threading.Lock) -> None:
    """Make ``assoc.dimse.send_msg`` hold ``lock``: the receiver's C-STORE responses (sent from the
    DUL thread) then never land between the PDUs of a message another thread is sending."""
    send_msg = assoc.dimse.send_msg

    def locked(primitive: Any, context_id: int) -> None:
        with lock:
            send_msg(primitive, context_id)

    assoc.dimse.send_msg = locked  # type: ignore[method-assign]


def upgrade(assoc: Association, sink: StoreSink | None = None) -> Association:
    """Give a new acceptor (threads not yet started) the event-driven reactors, and, with a
    ``sink``, the lean C-STORE receive path (:mod:`dimse.store_receiver`)."""
    if not ENABLED or assoc.is_alive() or assoc.dul.is_alive():
        return assoc
    bell = threading.Event()
    assoc.__class__ = _EventAssociation
    assoc._bell = bell  # type: ignore[attr-defined]
    gate(assoc, bell)
    dul = assoc.dul
    dul.__class__ = _EventDUL
    if type(dul.socket) is AssociationSocket:
        dul.socket.__class__ = _BulkSocket
    receiving = None
    if sink is not None and LEAN_STORE:
        lock = threading.Lock()
        _locked_send(assoc, lock)
        receiving = (sink, lock)
    cast(_EventDUL, dul)._fast_init(bell, receiving)
    return assoc


class SharedContexts(list[Any]):
    """A server's supported presentation contexts, given to each new association as they are.

    pynetdicom's request handler hands every association ``deepcopy(server.contexts)``: with our
    ~170 storage SOP classes × 16 transfer syntaxes that is ~15 ms of CPU (with the interpreter
    lock held) per association — per image for the many modalities that open an association for
    each one. In 3.0.x the acceptor's contexts are only read (``negotiate_as_acceptor`` and
    ``negotiate_unrestricted`` build new result contexts), so one list serves all associations.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return list(self)


def share_contexts(server: Any) -> None:
    """Give ``server``'s associations its supported contexts without a copy each (see
    :class:`SharedContexts`); only with the fast path's pynetdicom version gate passed."""
    if ENABLED and not isinstance(server.contexts, SharedContexts):
        server.contexts = SharedContexts(server.contexts)


class EventRequestHandler(RequestHandler):
    """pynetdicom's request handler, with each association upgraded by :func:`upgrade` (with the
    lean C-STORE path when the server has a ``store_sink``)."""

    def _create_association(self) -> Association:
        return upgrade(super()._create_association(), getattr(self.server, "store_sink", None))


_warned = False


def request_handler() -> type[RequestHandler]:
    """The request handler our SCP should use: the event-driven one if this pynetdicom allows."""
    global _warned
    if ENABLED:
        return EventRequestHandler
    if not _warned and not _supported(pynetdicom.__version__):
        log.warning(
            "pynetdicom %s is not 3.0.x: DIMSE fast path off (stock polling reactors)",
            pynetdicom.__version__,
        )
        _warned = True
    return RequestHandler
