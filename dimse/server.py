"""The DIMSE front door: a pynetdicom SCP whose handlers each call one domain function.

Services (docs/conformance.md): Verification; Storage (every storage SOP class pydicom knows, or
any with ``accept_any_sop_class``); Study Root Query/Retrieve FIND, MOVE, GET; Storage Commitment
Push Model. Received data sets are written by pynetdicom straight to the spool (chunked receive) and
handed to :class:`gateway.ingest.Ingest` as a file: nothing is decoded in the handler.
"""

from __future__ import annotations

import logging
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import _config, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer

from dimse import audit_events, fastpath
from dimse.commitment import CommitmentReporter
from dimse.contexts import (
    ACCEPTED_TRANSFER_SYNTAXES,
    QUERY_AND_COMMITMENT,
    STORAGE_COMMITMENT_PUSH,
    VERIFICATION,
    accepted_syntaxes,
    no_delay,
    no_delay_assoc,
    retrieve_contexts,
)
from dimse.reactor_gate import AE  # C-MOVE sub-associations are this AE's
from dimse.store_receiver import Received, StoreRequest
from dimse.uid_memo import install as _remember_uid_checks
from gateway.archive.blobstore import BlobNotFound, BlobStore, FolderBlobStore
from gateway.archive.catalog import Catalog, StoredInstance
from gateway.archive.query import Level, QueryError
from gateway.audit import AuditLog
from gateway.codec.decode import decompressed, sendable_syntax
from gateway.config import DicomSection
from gateway.ingest import Accepted, Ingest, Pending
from gateway.security.envelope import KeyGone
from gateway.security.tls import client_context, server_context

log = logging.getLogger(__name__)
_remember_uid_checks()  # association set-up: each UID's check done once (dimse/uid_memo.py)

# Storage statuses (PS3.4 Table B.2-1) for the domain's refusal kinds.
STORE_STATUS = {"storage": 0xA700, "mismatch": 0xA900, "missing-attribute": 0xA900, "malformed": 0xC000}
QR_LEVELS = {"STUDY": Level.STUDY, "SERIES": Level.SERIES, "IMAGE": Level.IMAGE}
# Where pynetdicom's chunked receive writes; set once per process (it reads tempfile's default).
_spool_lock = threading.Lock()


class _NoDelayServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with TCP_NODELAY on every accepted socket.

    With ``listen_socket`` it serves from a socket bound and listening elsewhere — e.g. one a
    parent process opened and several SCP processes inherited, to share one DICOM port across
    CPUs (each association is served by the process whose ``accept`` won). That socket is
    non-blocking (a lost race must not stall the loop: socketserver ignores the OSError), and
    closing the server closes this process's descriptor only, never ``shutdown()`` for all.

    Every process is woken for each connection; a process already serving associations (or that
    accepted one a moment ago, before its thread counts as active) waits a little before taking
    the next, so an idle one gets it. Without this, two modalities connecting at once often both
    landed in one process (2 of 5 benchmark runs) while the other idled.
    """

    POLITE_DELAY = 0.002  # seconds per association already served, before accepting another
    RECENT = 0.05  # an accept this recent counts as an association being set up

    def __init__(self, *args: Any, listen_socket: socket.socket | None = None, **kwargs: Any) -> None:
        self._adopted = listen_socket
        self._last_accept = 0.0
        super().__init__(*args, **kwargs)

    def service_actions(self) -> None:
        """Nothing: pynetdicom's server forces a full ``gc.collect()`` every 60 turns of its loop
        (after each association and every 0.5 s idle), because "dead Association threads aren't
        being garbage collected". In a node holding pydicom, SQLAlchemy and the web app that
        collection takes ~70-100 ms with the interpreter lock held: a stall of every association
        and HTTP request once a minute idle, or every 60 associations under load (~12 % of the
        lock time of one-image associations). Python's own collector frees those cycles as
        well (``tests/test_dimse.py::test_many_short_associations_leave_nothing_behind``)."""

    def _busy(self) -> int:
        recent = time.monotonic() - self._last_accept < self.RECENT
        return len(self.active_associations) + int(recent)

    def server_bind(self) -> None:
        if self._adopted is None:
            super().server_bind()
            return
        if self.socket is not None:
            self.socket.close()  # the one socketserver made: the adopted socket is bound already
        self.socket = self._adopted
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self._adopted is None:
            super().server_activate()

    def server_close(self) -> None:
        if self._adopted is None:
            super().server_close()
        elif self.socket is not None:
            self.socket.close()

    def get_request(self) -> Any:
        if self._adopted is not None and (busy := self._busy()):
            time.sleep(min(self.POLITE_DELAY * busy, 0.02))  # let an idle process take it
        sock, addr = super().get_request()
        self._last_accept = time.monotonic()
        no_delay(sock)
        return sock, addr


def _receiving(server: ThreadedAssociationServer) -> int:
    """Established associations of ``server`` (pynetdicom lists every acceptor thread)."""
    return sum(1 for assoc in server.active_associations if assoc.is_established)


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


def _failed_sub_operation(inst: StoredInstance) -> Dataset:
    """What to yield for an instance that cannot be sent, so that pynetdicom counts one failed
    C-STORE sub-operation, lists the instance as failed and goes on with the next.

    Only its SOP Class and Instance UIDs, and no File Meta Information: pynetdicom's
    ``send_c_store`` refuses such a data set (no transfer syntax to pick a presentation context
    by) before anything is sent, which its retrieve loop counts as a failed sub-operation. Yielding
    a failure status instead would end the whole retrieve there.
    """
    ds = Dataset()
    ds.SOPClassUID = inst.sop_class_uid
    ds.SOPInstanceUID = inst.sop_uid
    return ds


class DicomServer:
    """One SCP bound to one archive."""

    def __init__(
        self,
        cfg: DicomSection,
        ingest: Ingest,
        catalog: Catalog,
        store: BlobStore,
        spool: Path,
        audit: AuditLog | None = None,
    ) -> None:
        self.cfg = cfg
        self.audit = audit  # R-SE-4: queries, retrieves, rejected associations (dimse/audit_events.py)
        self.ingest = ingest
        self.catalog = catalog
        self.store = store
        self.spool = spool
        self.commitments = CommitmentReporter(catalog, cfg)
        # the folder store links the spool file into place: its write-back can start at once
        self.spool_writeback = isinstance(store, FolderBlobStore)
        self._server: _NoDelayServer | None = None
        self._thread: threading.Thread | None = None
        # C-STORE requests handled so far by each receive path (dimse/store_receiver.py or
        # pynetdicom's own): for the operator (/healthz) and the tests
        self.stores = {"lean": 0, "pynetdicom": 0}
        self._stores_lock = threading.Lock()

    # ---- lifecycle -------------------------------------------------------------------------

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.cfg.ae_title)
        ae.maximum_associations = self.cfg.max_associations
        ae.acse_timeout = self.cfg.acse_timeout
        ae.dimse_timeout = self.cfg.dimse_timeout
        ae.network_timeout = self.cfg.network_timeout
        ae.maximum_pdu_size = self.cfg.maximum_pdu_size
        if not self.cfg.allow_any_calling_ae:
            # pynetdicom rejects others with A-ASSOCIATE-RJ: rejected-permanent, service-user,
            # "calling AE title not recognized" (PS3.8 Table 9-21).
            ae.require_calling_aet = [p.ae_title for p in self.cfg.peers]
        ae.add_supported_context(VERIFICATION)
        for cx in AllStoragePresentationContexts:
            # scu_role/scp_role: accept the role selection a C-GET requestor proposes.
            ae.add_supported_context(
                str(cx.abstract_syntax), ACCEPTED_TRANSFER_SYNTAXES, scu_role=True, scp_role=True
            )
        for sop in QUERY_AND_COMMITMENT:
            ae.add_supported_context(sop)
        return ae

    def start(self, listen_socket: socket.socket | None = None) -> int:
        """Start listening in the background; returns the bound port.

        ``listen_socket``: serve from this socket, already bound and listening, instead of binding
        ``cfg.host``/``cfg.port`` — for several front-end processes sharing one DICOM port (the
        socket is made non-blocking: processes race to accept each association).
        """
        if listen_socket is not None:
            listen_socket.setblocking(False)
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.UNRESTRICTED_STORAGE_SERVICE = self.cfg.accept_any_sop_class
        self.spool.mkdir(parents=True, exist_ok=True)
        with _spool_lock:
            # pynetdicom has no option for where chunked data sets are written; it uses tempfile's
            # default folder. Pointing it at the spool (inside the storage root) keeps the bytes on
            # the archive's disk, so the blob store links them into place instead of copying.
            tempfile.tempdir = str(self.spool)
        ae = self._make_ae()
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_C_GET, self._on_get),
            (evt.EVT_N_ACTION, self._on_n_action),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ESTABLISHED, self._on_established),
        ]
        server = cast(
            _NoDelayServer,
            ae.make_server(
                (self.cfg.host, self.cfg.port),
                evt_handlers=handlers,
                server_class=_NoDelayServer,
                # event-driven association reactors instead of 1 ms polling (dimse/fastpath.py)
                request_handler=fastpath.request_handler(),
                listen_socket=listen_socket,
                ssl_context=self._tls_server(),  # DICOM TLS, issue 6 §6 (R-SE-5)
            ),
        )
        ae._servers.append(server)  # as start_server does, so server.shutdown() can deregister it
        fastpath.share_contexts(server)  # no 15 ms copy of ~170 × 16 contexts per association
        # the lean C-STORE receive path of every association it accepts (dimse/store_receiver.py)
        server.store_sink = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="dimse-scp", daemon=True)
        self._thread.start()
        port = int(server.server_address[1])
        log.info("DICOM SCP %s listening on %s:%d", self.cfg.ae_title, self.cfg.host, port)
        return port

    def _tls_server(self) -> ssl.SSLContext | None:
        tls = self.cfg.tls
        if tls is None:
            return None
        return server_context(
            tls.cert_file, tls.key_file, ca_file=tls.ca_file, require_client_cert=tls.require_client_cert
        )

    def _tls_client(self, host: str) -> tuple[ssl.SSLContext, str]:
        """Our SCU side of DICOM TLS (C-MOVE sub-operations): the destination must chain to
        ``[dicom.tls] ca_file`` and name ``host``; we present our own certificate."""
        tls = self.cfg.tls
        assert tls is not None  # the config requires [dicom.tls] for a tls destination
        return client_context(tls.ca_file, cert_file=tls.cert_file, key_file=tls.key_file), host

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # also closes the socket
            self._server = None
        self.commitments.wait()

    # ---- handlers ----------------------------------------------------------------------------

    def _on_established(self, event: evt.Event) -> None:
        no_delay_assoc(event.assoc)

    def _on_rejected(self, event: evt.Event) -> None:
        req = event.assoc.requestor
        log.warning("association from %s (%s:%s) rejected", req.ae_title, req.address, req.port)
        audit_events.rejected(self.audit, self.cfg, event)

    def _on_store(self, event: evt.Event) -> Dataset:
        """C-STORE through pynetdicom's own receive path (the lean one off, or a request it left)."""
        status, comment = self._store(
            event.assoc,
            Path(event.dataset_path),
            str(cast(Any, event.request).AffectedSOPInstanceUID),
            None,
        )
        return _status(status, comment)

    # ---- the lean C-STORE receive path (dimse.store_receiver.StoreSink) ---------------------------

    def header_arrived(self, assoc: Any, request: StoreRequest, path: Path, prefix: int) -> Pending | None:
        return self.ingest.begin(
            path, prefix, source=assoc.requestor.ae_title, expected_sop_uid=request.sop_instance_uid
        )

    def drop_early(self, early: Any) -> None:
        cast(Pending, early).cancel()

    def store_received(self, assoc: Any, request: StoreRequest, received: Received) -> tuple[int, str]:
        """C-STORE through the lean receive path: the data set is in ``received``, hashed."""
        return self._store(
            assoc,
            received.path,
            request.sop_instance_uid,
            (received.size, received.sha256),
            cast("Pending | None", received.early),
        )

    def _store(
        self,
        assoc: Any,
        path: Path,
        sop_uid: str,
        known: tuple[int, str] | None,
        pending: Pending | None = None,
    ) -> tuple[int, str]:
        server = self._server
        with self._stores_lock:
            self.stores["pynetdicom" if known is None else "lean"] += 1
        result = self.ingest.accept_file(
            path,
            source=assoc.requestor.ae_title,
            expected_sop_uid=sop_uid,
            who=audit_events.peer_actor(self.cfg, assoc),
            # others are being received now: let ingest use its helper processes (issue 2). Only
            # established associations count: a bare TCP probe also makes one, which waits for
            # its A-ASSOCIATE-RQ until the ACSE timeout.
            offload=server is not None and _receiving(server) > 1,
            known=known,
            pending=pending,
        )
        if isinstance(result, Accepted):
            return 0x0000, ""
        return STORE_STATUS[result.kind], result.reason

    def _criteria(self, identifier: Dataset) -> tuple[Level, dict[str, str], list[str]]:
        level_name = str(identifier.get("QueryRetrieveLevel", "")).upper()
        if level_name not in QR_LEVELS:
            raise QueryError(f"QueryRetrieveLevel {level_name!r} must be STUDY, SERIES or IMAGE")
        criteria: dict[str, str] = {}
        keys: list[str] = []
        for elem in identifier:
            if elem.keyword in ("QueryRetrieveLevel", "SpecificCharacterSet", ""):
                continue
            keys.append(elem.keyword)
            if elem.VR == "SQ":
                continue
            value = elem.value
            if value is None:
                text = ""
            elif elem.VM > 1:
                text = "\\".join(str(v) for v in value)
            else:
                text = str(value)
            criteria[elem.keyword] = text
        return QR_LEVELS[level_name], criteria, keys

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        try:
            level, criteria, keys = self._criteria(event.identifier)
            rows = self.catalog.find(level, criteria)
        except QueryError as exc:
            audit_events.query(self.audit, self.cfg, event, "?", {}, None, str(exc))
            yield _status(0xA900, str(exc)), None  # type: ignore[misc]
            return
        audit_events.query(self.audit, self.cfg, event, level.value, criteria, len(rows))
        for row in rows:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            ds = Dataset()
            ds.SpecificCharacterSet = "ISO_IR 192"  # catalog values are Unicode: answer in UTF-8
            ds.QueryRetrieveLevel = level.value
            for key in keys:
                value = row.get(key)
                if isinstance(value, list):
                    value = "\\".join(value)
                setattr(ds, key, "" if value is None else value)
            for uid_key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                if uid_key in row and uid_key not in keys:
                    setattr(ds, uid_key, row[uid_key])
            yield 0xFF00, ds

    def _matched(self, identifier: Dataset) -> list[StoredInstance]:
        """Instances named by a retrieve identifier: the unique key(s) of its level, hierarchically.

        Study Root retrieve (PS3.4 C.4.2.1.4) identifies entities by their unique keys only; an
        identifier without the key of its level is refused rather than read as "everything".
        """
        level, criteria, _keys = self._criteria(identifier)
        needed = {
            Level.STUDY: "StudyInstanceUID",
            Level.SERIES: "SeriesInstanceUID",
            Level.IMAGE: "SOPInstanceUID",
        }[level]
        if not criteria.get(needed, "").strip():
            raise QueryError(f"{needed} is required to retrieve at {level.value} level")
        unique = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
        return self.catalog.locate({k: v for k, v in criteria.items() if k in unique and v.strip()})

    def _refuse_retrieve(self, reason: str) -> Iterator[Any]:
        """One announced sub-operation that fails: pynetdicom ends the retrieve with this status."""
        yield 1
        yield _status(0xA900, reason), None

    def _read(self, inst: StoredInstance) -> bytes:
        return b"".join(self.store.get(inst.blob_key))

    def _on_move(self, event: evt.Event) -> Iterator[Any]:
        dest_title = str(event.move_destination).strip()
        dest = next((d for d in self.cfg.move_destinations if d.ae_title == dest_title), None)
        if dest is None:
            log.warning(
                "C-MOVE to unknown destination %r from %s", dest_title, event.assoc.requestor.ae_title
            )
            audit_events.retrieve(
                self.audit, self.cfg, event, "C-MOVE", [], destination=dest_title, error="unknown destination"
            )
            yield None, None
            return
        try:
            matched = self._matched(event.identifier)
        except QueryError as exc:
            log.warning("C-MOVE refused: %s", exc)
            audit_events.retrieve(
                self.audit, self.cfg, event, "C-MOVE", [], destination=dest_title, error=str(exc)
            )
            yield dest.host, dest.port
            yield from self._refuse_retrieve(str(exc))
            return
        contexts = retrieve_contexts((i.sop_class_uid, i.transfer_syntax) for i in matched)
        # pynetdicom requests the sub-association (synchronously, in this thread) after our second
        # yield; its accepted contexts decide each instance's transfer syntax
        sub: list[Any] = []

        def established(sub_event: evt.Event) -> None:
            sub.append(sub_event.assoc)
            self._on_established(sub_event)  # ours as requestor: Nagle off there too

        options: dict[str, Any] = {"evt_handlers": [(evt.EVT_ESTABLISHED, established)]}
        if contexts:
            options["contexts"] = contexts
        if dest.tls:
            options["tls_args"] = self._tls_client(dest.host)
        audit_events.retrieve(self.audit, self.cfg, event, "C-MOVE", matched, destination=dest_title)
        yield dest.host, dest.port, options
        yield len(matched)
        yield from self._sub_operations(event, matched, lambda: sub[-1] if sub else None)

    def _on_get(self, event: evt.Event) -> Iterator[Any]:
        try:
            matched = self._matched(event.identifier)
        except QueryError as exc:
            log.warning("C-GET refused: %s", exc)
            audit_events.retrieve(self.audit, self.cfg, event, "C-GET", [], error=str(exc))
            yield from self._refuse_retrieve(str(exc))
            return
        audit_events.retrieve(self.audit, self.cfg, event, "C-GET", matched)
        yield len(matched)
        yield from self._sub_operations(event, matched, lambda: event.assoc)

    def _sub_operations(
        self, event: evt.Event, matched: list[StoredInstance], peer: Callable[[], Any]
    ) -> Iterator[Any]:
        """One C-STORE sub-operation per instance, in the transfer syntax :func:`sendable_syntax`
        picks from what ``peer()`` (the association the sub-operations go over) accepted: as
        stored, or decoded to Explicit / Implicit VR Little Endian (R-UP-1, conformance §4.4)."""
        for inst in matched:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            try:
                data = self._read(inst)
            except (BlobNotFound, KeyGone) as exc:
                # This instance can never be read (its blob is gone, or its key was destroyed:
                # crypto-shredding, R-SE-10); the others still go. Counted as one failed
                # sub-operation and listed in the final response's Failed SOP Instance UID List
                # (PS3.4 C.4.2.3.1 / C.4.3.3.1: status B000 when others completed).
                log.error("retrieve: %s cannot be sent: %s", inst.sop_uid, exc)
                yield 0xFF00, _failed_sub_operation(inst)
                continue
            except OSError as exc:  # the storage itself is failing: stop here
                log.error("cannot read %s for retrieve: %s", inst.sop_uid, exc)
                yield 0xA702, None  # refused: out of resources, unable to perform sub-operations
                return
            assoc = peer()
            accepted = accepted_syntaxes(assoc, inst.sop_class_uid) if assoc is not None else set()
            ts = sendable_syntax(inst.transfer_syntax, accepted)
            ds: Dataset | None = None
            if ts is not None and ts != inst.transfer_syntax:
                try:
                    ds = decompressed(data, inst.transfer_syntax, ts)
                except Exception as exc:  # decoders raise many types; the instance stays unsent
                    log.error("cannot decode %s (%s) to send: %s", inst.sop_uid, inst.transfer_syntax, exc)
                    ts = None
            if ts is None:
                log.warning(
                    "retrieve: %s is stored as %s; the peer accepted %s for %s",
                    inst.sop_uid,
                    inst.transfer_syntax,
                    sorted(accepted) or "nothing",
                    inst.sop_class_uid,
                )
            # Unsendable: yielded as stored all the same, so pynetdicom finds no accepted context,
            # sends nothing and counts one failed sub-operation (a failure status of ours would end
            # the whole retrieve instead).
            yield 0xFF00, ds if ds is not None else dcmread(BytesIO(data))

    def _on_n_action(self, event: evt.Event) -> tuple[int, Dataset | None]:
        req = cast(Any, event.request)
        if str(req.RequestedSOPClassUID) != STORAGE_COMMITMENT_PUSH or req.ActionTypeID != 1:
            return 0x0123, None  # no such action
        info = event.action_information
        try:
            transaction = str(info.TransactionUID)
            refs = [
                (str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID))
                for item in info.ReferencedSOPSequence
            ]
        except AttributeError as exc:
            log.warning("storage commitment request without %s", exc)
            return 0x0120, None  # missing attribute
        self.commitments.schedule(event.assoc, transaction, refs)
        return 0x0000, None
