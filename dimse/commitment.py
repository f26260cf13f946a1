"""Storage Commitment Push Model (PS3.4 Annex J): tell a modality which instances we keep.

The N-ACTION is answered at once; the N-EVENT-REPORT follows from a worker thread, on the same
association while the modality keeps it open, else on a new association to the address configured
for that peer (we propose the SCP role there, PS3.4 J.3.3).

The worker is started from inside the N-ACTION handler, where pynetdicom marks the reactor as
paused (``Association._is_paused``, so a handler may call ``send_*`` itself) although it has yet
to send the N-ACTION response. A report sent then went out interleaved with that response (its
command, the response, its data set: the modality could decode neither and lost the report, about
one run in seven of ``test_commitment``). So the worker first waits for the N-ACTION service to
return, and reports on one association are sent one at a time.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import build_role

from dimse.contexts import STORAGE_COMMITMENT_PUSH, no_delay_assoc
from dimse.reactor_gate import AE
from gateway.archive.catalog import Catalog
from gateway.config import DicomSection
from gateway.security.tls import client_context

log = logging.getLogger(__name__)

WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"
NO_SUCH_OBJECT = 0x0112
CLASS_MISMATCH = 0x0119
SAME_ASSOCIATION_WAIT = 5.0  # seconds


def commitment_report(catalog: Catalog, transaction: str, refs: list[tuple[str, str]]) -> tuple[int, Dataset]:
    """(event type, event information): 1 = all committed, 2 = some failed."""
    held = catalog.instances_by_uid([uid for _, uid in refs])
    report = Dataset()
    report.TransactionUID = transaction
    ok, failed = [], []
    for sop_class, uid in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = uid
        inst = held.get(uid)
        if inst is None:
            item.FailureReason = NO_SUCH_OBJECT
            failed.append(item)
        elif inst.sop_class_uid != sop_class:
            item.FailureReason = CLASS_MISMATCH
            failed.append(item)
        else:
            ok.append(item)
    if ok:
        report.ReferencedSOPSequence = ok
    if failed:
        report.FailedSOPSequence = failed
    return (2 if failed else 1), report


class CommitmentReporter:
    """Sends N-EVENT-REPORTs for accepted commitment requests."""

    def __init__(self, catalog: Catalog, cfg: DicomSection) -> None:
        self.catalog = catalog
        self.cfg = cfg
        self._threads: list[threading.Thread] = []
        # one sender at a time per association (pynetdicom does not serialise send_* calls)
        self._senders: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
        self._senders_lock = threading.Lock()

    def schedule(self, assoc: Any, transaction: str, refs: list[tuple[str, str]]) -> None:
        t = threading.Thread(
            target=self._report, args=(assoc, transaction, refs), name="commitment", daemon=True
        )
        self._threads = [x for x in self._threads if x.is_alive()]
        self._threads.append(t)
        t.start()

    def wait(self, timeout: float = 10) -> None:
        for t in self._threads:
            t.join(timeout)

    def _sender(self, assoc: Any) -> threading.Lock:
        with self._senders_lock:
            lock = self._senders.get(assoc)
            if lock is None:
                lock = self._senders[assoc] = threading.Lock()
            return lock

    def _report(self, assoc: Any, transaction: str, refs: list[tuple[str, str]]) -> None:
        event_type, info = commitment_report(self.catalog, transaction, refs)
        calling = assoc.requestor.ae_title
        with self._sender(assoc):
            if self._same_association(assoc, transaction, calling, event_type, info):
                return
        self._report_new_association(calling, transaction, event_type, info)

    def _same_association(
        self, assoc: Any, transaction: str, calling: str, event_type: int, info: Dataset
    ) -> bool:
        """Report on the modality's own association if it is still open; True if it answered."""
        # pynetdicom sets _is_paused while a handler's service runs (the N-ACTION's, which started
        # us) and clears it once the service, response sent, returns: wait for that first
        deadline = time.monotonic() + SAME_ASSOCIATION_WAIT
        while assoc._is_paused and assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.001)
        if assoc.is_established:
            # A modality that releases right after the N-ACTION response ignores a report that
            # crosses its release request; don't wait the full DIMSE timeout to find out.
            assoc.dimse_timeout = min(assoc.dimse_timeout or SAME_ASSOCIATION_WAIT, SAME_ASSOCIATION_WAIT)
            try:
                status, _reply = assoc.send_n_event_report(
                    info, event_type, STORAGE_COMMITMENT_PUSH, WELL_KNOWN_INSTANCE
                )
                if status and status.get("Status") == 0x0000:
                    log.info(
                        "storage commitment %s reported to %s (event %d)", transaction, calling, event_type
                    )
                    return True
            except (RuntimeError, ValueError) as exc:
                log.info("could not report on the same association: %s", exc)
        return False

    def _report_new_association(self, calling: str, transaction: str, event_type: int, info: Dataset) -> None:
        peer = next((p for p in self.cfg.peers if p.ae_title == calling), None)
        if peer is None or peer.host is None or peer.port is None:
            log.error(
                "storage commitment %s for %s: association closed and no address configured",
                transaction,
                calling,
            )
            return
        ae = AE(ae_title=self.cfg.ae_title)
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
        tls = self.cfg.tls
        assoc = ae.associate(
            peer.host,
            peer.port,
            ae_title=calling,
            ext_neg=[build_role(STORAGE_COMMITMENT_PUSH, scp_role=True, scu_role=False)],
            # DICOM TLS to a peer marked tls (issue 6 §6): it must chain to [dicom.tls] ca_file
            tls_args=(
                (client_context(tls.ca_file, cert_file=tls.cert_file, key_file=tls.key_file), peer.host)
                if peer.tls and tls is not None
                else None
            ),
        )
        if not assoc.is_established:
            log.error(
                "storage commitment %s: cannot reach %s at %s:%s", transaction, calling, peer.host, peer.port
            )
            return
        try:
            no_delay_assoc(assoc)
            assoc.send_n_event_report(info, event_type, STORAGE_COMMITMENT_PUSH, WELL_KNOWN_INSTANCE)
            log.info("storage commitment %s reported to %s on a new association", transaction, calling)
        finally:
            assoc.release()
