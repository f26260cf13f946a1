"""C-STORE requests taken straight off the wire: received to the spool, stored, answered in one pass.

**Why by hand.** pynetdicom turns every P-DATA-TF PDU into primitives and queue items, the command
set into a pydicom data set, the request into an event handled on a second thread, and the
response back through pydicom's encoder and the state machine: about 1.8-2.3 ms of CPU per
C-STORE of a 526 KB CT slice on this project's 2-core machine, measured with a handler that
answers *success* at once (``bench/ingest.py``'s series, 300 instances; dcmtk's own ``storescp``
takes ~0.7 ms per instance). That alone was most of what separated ybyx from Orthanc (issue 2
"Numbers"). No library offers a leaner receive path for Python, so this module does that one job
itself, and nothing else: association negotiation, every other DIMSE service, C-STORE in any case
it does not recognise, and all sending of PDUs stay pynetdicom's.

**What.** For an association our SCP accepted (:mod:`dimse.fastpath` hands it each P-DATA-TF PDU
read while the association is established), a :class:`StoreReceiver`

* takes a PDV that is a whole C-STORE-RQ command set (one fragment, last-fragment bit set) on an
  accepted storage context whose abstract syntax is the request's Affected SOP Class; anything
  else — other commands, a command split over fragments, a request while pynetdicom holds part of
  another message — goes to pynetdicom unchanged, as before;
* writes the data set's fragments to a spool file behind the File Meta Information pynetdicom's
  chunked receive wrote (same elements, same values), hashing the bytes as they are written
  (SHA-256 of the whole Part-10 file, what the blob store records), and starts the kernel's
  write-back of the file when the last fragment is in;
* calls the store function (:meth:`dimse.server.DicomServer.store_received`) in this thread — the
  one reading the socket, which has nothing else to do until the peer has its answer (the peer
  waits for it: one request in flight, as we negotiate) — and sends the C-STORE-RSP it returns
  as one P-DATA-TF PDU from this thread, as pynetdicom's state machine would in Sta6
  (:meth:`dimse.fastpath._EventDUL.send_now`; when something else is queued for sending first,
  it is queued behind it as a P-DATA primitive instead).

The command set's encoding (PS3.7 §6.3.1: Implicit VR Little Endian, group 0000) and the
C-STORE-RSP's fields (PS3.7 Table 9.3-2) are small and fixed; see :func:`parse_command` and
:func:`store_response`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu_primitives import P_DATA

from dimse.contexts import NON_STORAGE  # the SCP's other services
from gateway.archive.blobstore import start_writeback

log = logging.getLogger(__name__)
_write = os.write  # the spool writes (a test makes them fail)

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
NO_DATA_SET = 0x0101
PROCESSING_FAILURE = 0xC211  # pynetdicom's status for a handler that raised (Storage, PS3.4 B.2.3)
OUT_OF_RESOURCES = 0xA700

# Command elements (PS3.7 Annex E)
_GROUP_LENGTH = 0x00000000
_AFFECTED_SOP_CLASS = 0x00000002
_COMMAND_FIELD = 0x00000100
_MESSAGE_ID = 0x00000110
_RESPONDED_TO = 0x00000120
_PRIORITY = 0x00000700
_DATA_SET_TYPE = 0x00000800
_STATUS = 0x00000900
_ERROR_COMMENT = 0x00000902
_AFFECTED_SOP_INSTANCE = 0x00001000


@dataclass(frozen=True)
class StoreRequest:
    """What the store function is told of one received C-STORE-RQ."""

    context_id: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


class StoreSink(Protocol):
    """Where a :class:`StoreReceiver` puts what it receives (:class:`dimse.server.DicomServer`)."""

    spool: Path  # where data sets are written while received
    spool_writeback: bool  # start each received file's write-back on its last byte (kept on disk)

    def header_arrived(self, assoc: Any, request: StoreRequest, path: Path, prefix: int) -> Any:
        """The first ``prefix`` bytes of the file are written (more follow): start reading the
        header now if that helps; what is returned comes back as :attr:`Received.early`."""
        ...

    def store_received(self, assoc: Any, request: StoreRequest, received: Received) -> tuple[int, str]:
        """Store the complete file; the (status, error comment) of the C-STORE-RSP."""
        ...

    def drop_early(self, early: Any) -> None:
        """A data set whose header was being read early will not be stored (the association
        ended, the spool could not be written): let go of ``early``."""
        ...


@dataclass(frozen=True)
class Received:
    """The spool file holding the request's data set as a Part-10 file, with its size and SHA-256."""

    path: Path
    size: int
    sha256: str
    early: Any = None  # what StoreSink.header_arrived returned, if it was called


def parse_command(data: bytes | memoryview) -> dict[int, bytes] | None:
    """The elements of an encoded command set (Implicit VR Little Endian, group 0000) by tag, or
    None when it is not one (a bad length, another group)."""
    elements: dict[int, bytes] = {}
    view = memoryview(data)
    offset, end = 0, len(view)
    while offset < end:
        if end - offset < 8:
            return None
        group, elem, length = struct.unpack_from("<HHI", view, offset)
        offset += 8
        if group != 0x0000 or offset + length > end:
            return None
        elements[elem] = bytes(view[offset : offset + length])
        offset += length
    return elements


def _us(elements: dict[int, bytes], tag: int) -> int | None:
    value = elements.get(tag)
    return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None


_UID_CHARS = frozenset(b"0123456789.")


def _uid_value(elements: dict[int, bytes], tag: int) -> str | None:
    """A UI element's value if it is a well-formed UID (digits and dots, 1-64 characters); else
    None — pynetdicom's path then handles the request, as it always did for odd values."""
    value = elements.get(tag)
    if value is None:
        return None
    raw = value.rstrip(b"\0 ")
    if not 0 < len(raw) <= 64 or not _UID_CHARS.issuperset(raw):
        return None
    return raw.decode("ascii")


def _element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def store_response(request: StoreRequest, status: int, comment: str = "") -> bytes:
    """The encoded C-STORE-RSP command set for ``request`` (PS3.7 Table 9.3-2), elements in tag
    order: Affected SOP Class, Command Field, Message ID Being Responded To, Command Data Set Type,
    Status, Error Comment (failures with a reason only), Affected SOP Instance."""
    body = [
        _element(_AFFECTED_SOP_CLASS, _uid(request.sop_class_uid)),
        _element(_COMMAND_FIELD, struct.pack("<H", C_STORE_RSP)),
        _element(_RESPONDED_TO, struct.pack("<H", request.message_id)),
        _element(_DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)),
        _element(_STATUS, struct.pack("<H", status)),
    ]
    if comment and status != 0x0000:
        text = comment[:64].encode("ascii", "replace")  # LO: 64 characters
        body.append(_element(_ERROR_COMMENT, text + b" " if len(text) % 2 else text))
    body.append(_element(_AFFECTED_SOP_INSTANCE, _uid(request.sop_instance_uid)))
    encoded = b"".join(body)
    return _element(_GROUP_LENGTH, struct.pack("<I", len(encoded))) + encoded


def p_data_tf(context_id: int, pdv: bytes) -> bytes:
    """A P-DATA-TF PDU (PS3.8 §9.3.5) holding one presentation data value item: ``pdv`` is the
    message control header and the fragment."""
    item = struct.pack(">IB", len(pdv) + 1, context_id) + pdv
    return struct.pack(">BBI", 0x04, 0, len(item)) + item


def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return head + b"\0\0" + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information (PS3.10 §7.1, Explicit VR Little Endian):
    the elements and values pynetdicom's chunked receive writes (``create_file_meta``)."""
    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    group = b"".join(
        [
            _explicit(0x00020001, b"OB", b"\x00\x01"),
            _explicit(0x00020002, b"UI", _uid(sop_class_uid)),
            _explicit(0x00020003, b"UI", _uid(sop_instance_uid)),
            _explicit(0x00020010, b"UI", _uid(transfer_syntax)),
            _explicit(0x00020012, b"UI", _uid(PYNETDICOM_IMPLEMENTATION_UID)),
            _explicit(0x00020013, b"SH", version + b" " if len(version) % 2 else version),
        ]
    )
    return b"\0" * 128 + b"DICM" + _explicit(0x00020000, b"UL", struct.pack("<I", len(group))) + group


class _Spool:
    """One data set being received: the file, its running hash and size."""

    def __init__(self, folder: Path, request: StoreRequest) -> None:
        self.request = request
        meta = file_meta(request.sop_class_uid, request.sop_instance_uid, request.transfer_syntax)
        fd, name = tempfile.mkstemp(suffix=".dcm", dir=folder)
        self.fd: int | None = fd
        self.path = Path(name)
        self.hash = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None
        self.early: Any = None  # StoreSink.header_arrived's answer
        self.early_asked = False
        self.write(meta)

    def write(self, data: bytes | memoryview) -> None:
        if self.error is not None or self.fd is None:
            return  # a failed write: the rest is read off the wire and dropped, then refused
        try:
            view = memoryview(data)
            while view:
                view = view[_write(self.fd, view) :]
            self.hash.update(data)  # hashlib lets go of the interpreter lock for large buffers
            self.size += len(data)
        except OSError as exc:
            self.error = exc

    def finish(self, writeback: bool) -> None:
        """Close the file; with ``writeback``, after asking the kernel to start writing it to disk
        (the disk works while the header is read and the record built)."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            if writeback and self.error is None:
                start_writeback(fd)
        finally:
            os.close(fd)

    def discard(self) -> None:
        self.finish(False)
        self.path.unlink(missing_ok=True)


class StoreReceiver:
    """The C-STORE requests of one accepted association (see the module docstring)."""

    def __init__(self, assoc: Any, sink: StoreSink, send_lock: threading.Lock) -> None:
        self.assoc = assoc
        self.sink = sink
        self.send_lock = send_lock
        self._current: _Spool | None = None
        self._contexts: dict[int, tuple[str, str]] | None = None  # id -> (abstract, transfer syntax)

    # ---- which requests are ours --------------------------------------------------------------

    def _storage_contexts(self) -> dict[int, tuple[str, str]]:
        if self._contexts is None:
            self._contexts = {
                int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in self.assoc._accepted_cx.values()
                if cx.context_id is not None and str(cx.abstract_syntax) not in NON_STORAGE
            }
        return self._contexts

    def _request(self, context_id: int, command: memoryview) -> StoreRequest | None:
        """The C-STORE-RQ in ``command`` if this receiver should take it."""
        elements = parse_command(command)
        if elements is None or _us(elements, _COMMAND_FIELD) != C_STORE_RQ:
            return None
        message_id = _us(elements, _MESSAGE_ID)
        sop_class = _uid_value(elements, _AFFECTED_SOP_CLASS)
        sop_instance = _uid_value(elements, _AFFECTED_SOP_INSTANCE)
        data_set = _us(elements, _DATA_SET_TYPE)
        if message_id is None or not sop_class or not sop_instance or data_set in (None, NO_DATA_SET):
            return None  # pynetdicom's checks and answers apply
        if _us(elements, _PRIORITY) is None:
            return None
        context = self._storage_contexts().get(context_id)
        if context is None or context[0] != sop_class:
            return None
        return StoreRequest(
            context_id=context_id,
            message_id=message_id,
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            transfer_syntax=context[1],
        )

    # ---- receiving ----------------------------------------------------------------------------

    def take(self, body: memoryview, pynetdicom_busy: bool) -> list[tuple[int, bytes]]:
        """Consume the PDVs of one P-DATA-TF PDU body (after the 6-byte PDU header) that belong to
        C-STORE requests this receiver handles; the others are returned, in order, for pynetdicom
        (``pynetdicom_busy``: pynetdicom holds part of a message; then the next command is its).

        Raises ``ValueError`` for a PDU whose items do not add up (pynetdicom then decodes it and
        reports the error as it always did) — only before anything of it was taken.
        """
        items: list[tuple[int, memoryview]] = []
        offset, end = 0, len(body)
        while offset < end:
            if end - offset < 6:
                raise ValueError("truncated presentation data value item")
            (length,) = struct.unpack_from(">I", body, offset)
            if length < 2 or offset + 4 + length > end:
                raise ValueError("presentation data value item length out of range")
            items.append((body[offset + 4], body[offset + 5 : offset + 4 + length]))
            offset += 4 + length

        rest: list[tuple[int, bytes]] = []
        for context_id, pdv in items:
            control = pdv[0]
            current = self._current
            if rest:  # once pynetdicom has a part, the rest of the PDU is its too
                rest.append((context_id, bytes(pdv)))
            elif current is not None and not control & 1:
                if context_id != current.request.context_id:
                    rest.append((context_id, bytes(pdv)))  # not ours: pynetdicom reports it
                    continue
                current.write(pdv[1:])
                if control & 2:
                    self._current = None
                    self._complete(current)
                elif not current.early_asked and current.error is None:
                    # the header is normally all in the first fragment: have it read now, while
                    # the pixel data arrives
                    current.early_asked = True
                    current.early = self.sink.header_arrived(
                        self.assoc, current.request, current.path, current.size
                    )
            elif current is None and control == 0x03 and not pynetdicom_busy:
                request = self._request(context_id, pdv[1:])
                if request is None:
                    rest.append((context_id, bytes(pdv)))
                    continue
                try:
                    self._current = _Spool(self.sink.spool, request)
                except OSError as exc:
                    log.error("cannot open a spool file in %s: %s", self.sink.spool, exc)
                    rest.append((context_id, bytes(pdv)))  # pynetdicom's receive tries its own
            else:
                rest.append((context_id, bytes(pdv)))
        return rest

    def _complete(self, spool: _Spool) -> None:
        request = spool.request
        try:
            spool.finish(self.sink.spool_writeback)
            if spool.error is not None:
                log.error("writing the spool file %s failed: %s", spool.path, spool.error)
                status, comment = OUT_OF_RESOURCES, f"storage unavailable: {spool.error}"
                if spool.early is not None:
                    self.sink.drop_early(spool.early)
            else:
                received = Received(spool.path, spool.size, spool.hash.hexdigest(), spool.early)
                try:
                    status, comment = self.sink.store_received(self.assoc, request, received)
                except Exception:
                    log.exception("storing %s failed", request.sop_instance_uid)
                    status, comment = PROCESSING_FAILURE, ""
                    if spool.early is not None:
                        self.sink.drop_early(spool.early)  # free it, if the store had not
        finally:
            spool.path.unlink(missing_ok=True)
        self._respond(request, status, comment)

    def _respond(self, request: StoreRequest, status: int, comment: str) -> None:
        # one PDV: message control header 0x03 (command, last fragment), then the command set
        data = b"\x03" + store_response(request, status, comment)
        with self.send_lock:  # never between the fragments of a message another thread sends
            send_now = getattr(self.assoc.dul, "send_now", None)  # dimse.fastpath's reactor
            if send_now is not None and send_now(p_data_tf(request.context_id, data)):
                return
            primitive = P_DATA()
            # pynetdicom's setter wants [id, data] lists (its annotation says tuples)
            item: Any = [request.context_id, data]
            primitive.presentation_data_value_list = [item]
            self.assoc.dul.send_pdu(primitive)

    def close(self) -> None:
        """The association is over: a data set still being received is incomplete; drop it."""
        current, self._current = self._current, None
        if current is not None:
            log.warning(
                "association ended while receiving %s: the partial data set was discarded",
                current.request.sop_instance_uid,
            )
            if current.early is not None:
                self.sink.drop_early(current.early)
            current.discard()
