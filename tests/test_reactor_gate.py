"""The reactor pause that waits for the reactor to park (``dimse/reactor_gate.py``).

pynetdicom's pause race made CI lose an association: a sender saw the reactor's stale "paused"
flag, went on, and the reactor took the C-STORE response (pynetdicom issue #875). Here the race's
window is widened on purpose: a reactor thread with pynetdicom 3.0's pause point that, once let
through, takes 3 ms (as a thread starved of the interpreter lock can) before it resets its flag.
With a plain ``threading.Event`` the sender then catches it running; with the gate, never. Then a
real association: our SCU against our SCP, many requests in a row, each answered to the sender.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dimse.reactor_gate import AE, ReactorGate
from dimse.scu import send
from gateway.frontend import Frontend
from gateway.sample import ct_series


class _Reactor(threading.Thread):
    """pynetdicom 3.0's ``_run_reactor`` pause point, the time after ``wait()`` returns widened."""

    def __init__(self, gated: bool) -> None:
        super().__init__(daemon=True)
        self._kill = False
        self._is_paused = False
        self.sender_active = False  # set by the "sender" while it believes the reactor paused
        self.caught = 0  # rounds in which the reactor ran while the sender held the pause
        self._reactor_checkpoint: threading.Event = ReactorGate(self) if gated else threading.Event()  # type: ignore[arg-type]
        self._reactor_checkpoint.set()

    def run(self) -> None:
        while not self._kill:
            time.sleep(0.0005)
            self._is_paused = True
            self._reactor_checkpoint.wait()
            time.sleep(0.003)  # the window: let through, flag not yet reset
            self._is_paused = False
            if self.sender_active:
                self.caught += 1  # here pynetdicom's reactor would take the sender's response


def _pause_rounds(reactor: _Reactor, rounds: int) -> int:
    """``rounds`` pauses the way every ``Association.send_*`` takes them; how often the reactor ran
    inside one."""
    reactor.start()
    try:
        for _ in range(rounds):
            checkpoint = reactor._reactor_checkpoint
            checkpoint.clear()
            while not reactor._is_paused:
                time.sleep(0.0001)
            reactor.sender_active = True
            time.sleep(0.004)  # the request goes out, the response comes back
            reactor.sender_active = False
            checkpoint.set()
            time.sleep(0.001)
    finally:
        reactor._kill = True
        reactor._reactor_checkpoint.set()
        reactor.join(5)
    return reactor.caught


def test_a_plain_event_lets_the_reactor_run_inside_a_pause() -> None:
    """The control: the harness sees pynetdicom's race (else the next test could not fail)."""
    assert _pause_rounds(_Reactor(gated=False), 60) > 0


def test_the_gate_keeps_the_reactor_out_of_every_pause() -> None:
    assert _pause_rounds(_Reactor(gated=True), 60) == 0


def test_a_clear_from_the_reactor_itself_or_after_it_ended_does_not_wait() -> None:
    reactor = _Reactor(gated=True)
    gate = reactor._reactor_checkpoint
    started = time.monotonic()
    gate.clear()  # thread never started: nothing to wait for
    assert time.monotonic() - started < 0.5 and not gate.is_set()
    gate.set()

    done = threading.Event()

    class _SelfPausing(_Reactor):
        def run(self) -> None:  # a service handler sending on its own association
            self._reactor_checkpoint.clear()
            done.set()

    own = _SelfPausing(gated=True)
    own.start()
    assert done.wait(2)
    own.join(2)


def test_many_requests_on_one_association_each_get_their_answer(frontend: Frontend, tmp_path: Path) -> None:
    """Our SCU (gated) to our SCP (lean receive path, gated): every C-ECHO and C-STORE answered
    to its sender, none taken by a reactor (which would time the sender out)."""
    ae = AE(ae_title="GATE_SCU")
    ae.add_requested_context(Verification)
    ae.dimse_timeout = 10
    assoc = ae.associate("127.0.0.1", frontend.dicom_port, ae_title="YBYX")
    assert assoc.is_established
    assert isinstance(assoc._reactor_checkpoint, ReactorGate)
    try:
        for _ in range(300):
            status = assoc.send_c_echo()
            assert status is not None and status.Status == 0x0000
    finally:
        assoc.release()

    files = ct_series(tmp_path / "ct", slices=40)
    report = send(files, "127.0.0.1", frontend.dicom_port, "YBYX")
    assert report.ok, report.failed
    assert len(report.sent) == 40
