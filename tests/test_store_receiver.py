"""The lean C-STORE receive path (``dimse/store_receiver.py``, issue 2 "Numbers").

Its encodings against pynetdicom's and pydicom's own; over a real association: that our SCP's
C-STOREs take it (storescu and pynetdicom as SCU), store the bytes sent with the right SHA-256,
leave other messages to pynetdicom (also inside the same PDU), and drop a data set cut off by an
abort. No timings here: ``bench/ingest.py`` measures.
"""

from __future__ import annotations

import hashlib
import io
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import create_file_meta, decode, encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dimse.reactor_gate import AE
from dimse.store_receiver import StoreRequest, file_meta, p_data_tf, parse_command, store_response
from gateway.frontend import Frontend
from gateway.sample import ct_series
from tests.conftest import dcmtk

# ---------------------------------------------------------------------------------------------- encodings


@pytest.mark.parametrize("sop", ["1.2.3.4", "1.2.3.45", generate_uid()])
def test_file_meta_is_what_pynetdicoms_chunked_receive_writes(sop: str) -> None:
    for ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.80"):
        theirs = io.BytesIO()
        theirs.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(
            theirs,  # type: ignore[arg-type]
            create_file_meta(
                sop_class_uid=CTImageStorage, sop_instance_uid=UID(sop), transfer_syntax=UID(ts)
            ),
        )
        assert file_meta(str(CTImageStorage), sop, ts) == theirs.getvalue()


def _request(**overrides: Any) -> StoreRequest:
    values: dict[str, Any] = {
        "context_id": 3,
        "message_id": 77,
        "sop_class_uid": str(CTImageStorage),
        "sop_instance_uid": "1.2.826.0.1.3680043.8.498.123",
        "transfer_syntax": ExplicitVRLittleEndian,
    }
    values.update(overrides)
    return StoreRequest(**values)


@pytest.mark.parametrize(
    ("status", "comment"),
    [(0x0000, ""), (0x0000, "ignored on success"), (0xA900, "odd length!"), (0xC000, "x" * 90)],
)
def test_store_response_is_a_c_store_rsp_pynetdicom_decodes(status: int, comment: str) -> None:
    request = _request(sop_instance_uid="1.2.3.4.5")  # odd length: padded
    encoded = store_response(request, status, comment)
    command = decode(io.BytesIO(encoded), True, True)
    assert command.CommandGroupLength == len(encoded) - 12
    assert command.CommandField == 0x8001
    assert command.MessageIDBeingRespondedTo == 77
    assert command.CommandDataSetType == 0x0101
    assert command.Status == status
    assert command.AffectedSOPClassUID == CTImageStorage
    assert command.AffectedSOPInstanceUID == "1.2.3.4.5"
    if status == 0x0000 or not comment:
        assert "ErrorComment" not in command
    else:
        assert command.ErrorComment == comment[:64]
    # and pynetdicom's own message class takes it as a valid response
    msg = C_STORE_RSP()
    msg.command_set = command
    primitive: Any = msg.message_to_primitive()
    assert primitive.Status == status and primitive.is_valid_response


def _store_rq_bytes(sop: str, message_id: int = 5, **extra: Any) -> bytes:
    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = sop
    req.Priority = 2
    for key, value in extra.items():
        setattr(req, key, value)
    req.DataSet = io.BytesIO(b"\x08\x00\x18\x00UI\x04\x001.2\x00")
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    return encode(msg.command_set, True, True)  # type: ignore[return-value]


@pytest.mark.parametrize("size", [1, 200, 70_000])
def test_p_data_tf_is_what_pynetdicom_encodes(size: int) -> None:
    """The C-STORE response PDU the receiver sends itself (from the reactor thread) is byte for
    byte the PDU pynetdicom's DT-1 would send for the same primitive."""
    pdv = b"\x03" + bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[7, pdv]]  # type: ignore[list-item]
    assert p_data_tf(7, pdv) == P_DATA_TF(primitive).encode()


def test_parse_command_reads_what_pynetdicom_encodes() -> None:
    raw = _store_rq_bytes("1.2.3.4", MoveOriginatorApplicationEntityTitle="MOVER", MoveOriginatorMessageID=9)
    elements = parse_command(raw)
    assert elements is not None
    assert struct.unpack("<H", elements[0x0100])[0] == 0x0001
    assert struct.unpack("<H", elements[0x0110])[0] == 5
    assert elements[0x1000].rstrip(b"\0") == b"1.2.3.4"
    assert elements[0x1030].strip() == b"MOVER"
    assert parse_command(raw[:-3]) is None  # the last element runs past the end
    assert parse_command(b"\x08\x00\x18\x00" + raw[4:]) is None  # not group 0000


# ---------------------------------------------------------------------------------------------- on the wire


def _spool_files(fe: Frontend) -> list[Path]:
    spool = fe.cfg.storage.path / ".spool"
    return [p for p in spool.iterdir() if p.is_file()] if spool.is_dir() else []


def test_storescu_stores_take_the_lean_path_with_the_right_bytes(frontend: Frontend, tmp_path: Path) -> None:
    series = ct_series(tmp_path / "ct", slices=6)
    done = subprocess.run(
        [dcmtk("storescu"), "-aec", "YBYX", "127.0.0.1", str(frontend.dicom_port), *map(str, series)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "E:" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert frontend.dicom.stores == {"lean": 6, "pynetdicom": 0}
    for src in series:
        sent = dcmread(src)
        [inst] = frontend.archive.catalog.locate({"SOPInstanceUID": str(sent.SOPInstanceUID)})
        stored = b"".join(frontend.archive.store.get(inst.blob_key))
        assert hashlib.sha256(stored).hexdigest() == inst.sha256 and len(stored) == inst.size
        back = dcmread(io.BytesIO(stored))
        assert back.PixelData == sent.PixelData and back.PatientName == sent.PatientName
        assert back.file_meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
        assert back.file_meta.TransferSyntaxUID == inst.transfer_syntax
    assert _spool_files(frontend) == []


def _scu() -> Any:
    ae = AE(ae_title="LEAN_SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification, ExplicitVRLittleEndian)
    return ae


def _pdu(*pdvs: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF PDU of (context id, message control header, fragment) items."""
    items = b"".join(struct.pack(">IBB", len(data) + 2, cid, control) + data for cid, control, data in pdvs)
    return struct.pack(">BBL", 0x04, 0, len(items)) + items


def _context(assoc: Any, abstract: str) -> int:
    return next(int(cx.context_id) for cx in assoc.accepted_contexts if cx.abstract_syntax == abstract)


def _dataset_bytes(path: Path) -> tuple[Any, bytes]:
    ds = dcmread(path)
    return ds, encode(ds, False, True)  # type: ignore[return-value]


def _answer(assoc: Any) -> Any:
    _cx, msg = assoc.dimse.get_msg(block=True)
    assert msg is not None, "no answer within the DIMSE timeout"
    return msg


def _store_by_hand(port: int, command: bytes, data: bytes) -> Any:
    """Send one C-STORE-RQ ``command`` and its whole data set in one PDU on a new association;
    the answer pynetdicom decodes."""
    assoc = _scu().associate("127.0.0.1", port, ae_title="YBYX")
    assert assoc.is_established
    try:
        cx = _context(assoc, CTImageStorage)
        with _Paused(assoc):
            assoc.dul.socket.socket.sendall(_pdu((cx, 0x03, command), (cx, 0x02, data)))
            return _answer(assoc)
    finally:
        assoc.release()


class _Paused:
    """Hold the SCU association's reactor (as pynetdicom's own send_c_* do), so that the answers
    to what the test sends by hand wait in the DIMSE queue for :func:`_answer`."""

    def __init__(self, assoc: Any) -> None:
        self.assoc = assoc

    def __enter__(self) -> None:
        self.assoc._reactor_checkpoint.clear()
        while not self.assoc._is_paused:
            time.sleep(0.001)

    def __exit__(self, *_exc: object) -> None:
        self.assoc._reactor_checkpoint.set()


def test_a_store_and_an_echo_in_one_pdu_are_both_answered(frontend: Frontend, tmp_path: Path) -> None:
    """The PDU ending one C-STORE's data set also holds a C-ECHO-RQ: the receiver takes its part
    and hands the echo to pynetdicom, which answers it."""
    [src] = ct_series(tmp_path / "ct", slices=1)
    ds, data = _dataset_bytes(src)
    assoc = _scu().associate("127.0.0.1", frontend.dicom_port, ae_title="YBYX")
    assert assoc.is_established
    try:
        store_cx, echo_cx = _context(assoc, CTImageStorage), _context(assoc, Verification)
        echo = C_ECHO()
        echo.MessageID = 6
        echo.AffectedSOPClassUID = Verification
        echo_msg = C_ECHO_RQ()
        echo_msg.primitive_to_message(echo)
        echo_cmd = encode(echo_msg.command_set, True, True)
        assert echo_cmd is not None
        half = len(data) // 2
        sock = assoc.dul.socket.socket
        with _Paused(assoc):
            sock.sendall(_pdu((store_cx, 0x03, _store_rq_bytes(str(ds.SOPInstanceUID), message_id=5))))
            sock.sendall(_pdu((store_cx, 0x00, data[:half])))
            sock.sendall(_pdu((store_cx, 0x02, data[half:]), (echo_cx, 0x03, echo_cmd)))
            answers = {int(m.MessageIDBeingRespondedTo): m for m in (_answer(assoc), _answer(assoc))}
        assert answers[5].Status == 0x0000 and answers[5].AffectedSOPInstanceUID == ds.SOPInstanceUID
        assert answers[6].Status == 0x0000  # the echo, answered by pynetdicom
    finally:
        assoc.release()
    [inst] = frontend.archive.catalog.locate({"SOPInstanceUID": str(ds.SOPInstanceUID)})
    stored = dcmread(io.BytesIO(b"".join(frontend.archive.store.get(inst.blob_key))))
    assert stored.PixelData == ds.PixelData
    assert frontend.dicom.stores["lean"] == 1


def test_a_refused_instance_is_answered_with_the_reason(frontend: Frontend, tmp_path: Path) -> None:
    """A data set whose SOP Instance UID is not the one announced: refused (0xA900, PS3.4 B.2.3)
    with the reason in Error Comment, nothing catalogued."""
    [src] = ct_series(tmp_path / "ct", slices=1)
    ds, data = _dataset_bytes(src)
    announced = generate_uid()
    answer = _store_by_hand(frontend.dicom_port, _store_rq_bytes(announced, message_id=9), data)
    assert answer.MessageIDBeingRespondedTo == 9 and answer.Status == 0xA900
    reason = f"SOPInstanceUID {ds.SOPInstanceUID} in the data set differs from {announced}"
    assert str(answer.ErrorComment) == reason[:64]  # LO: 64 characters
    assert frontend.archive.catalog.locate({"SOPInstanceUID": str(ds.SOPInstanceUID)}) == []
    assert frontend.archive.catalog.locate({"SOPInstanceUID": announced}) == []
    assert frontend.dicom.stores["lean"] == 1


def test_an_abort_mid_data_set_leaves_nothing(frontend: Frontend, tmp_path: Path) -> None:
    [src] = ct_series(tmp_path / "ct", slices=1)
    ds, data = _dataset_bytes(src)
    assoc = _scu().associate("127.0.0.1", frontend.dicom_port, ae_title="YBYX")
    assert assoc.is_established
    cx = _context(assoc, CTImageStorage)
    sock = assoc.dul.socket.socket
    sock.sendall(_pdu((cx, 0x03, _store_rq_bytes(str(ds.SOPInstanceUID)))))
    sock.sendall(_pdu((cx, 0x00, data[:100_000])))
    deadline = time.monotonic() + 10
    while not _spool_files(frontend) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(_spool_files(frontend)) == 1  # being received
    assoc.abort()
    deadline = time.monotonic() + 10
    while _spool_files(frontend) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _spool_files(frontend) == []
    assert frontend.archive.catalog.locate({"SOPInstanceUID": str(ds.SOPInstanceUID)}) == []
    assert frontend.dicom.stores == {"lean": 0, "pynetdicom": 0}


def test_pynetdicoms_path_still_stores_when_the_lean_one_is_off(
    monkeypatch: pytest.MonkeyPatch, start_frontend: Any, tmp_path: Path
) -> None:
    from dimse import fastpath

    monkeypatch.setattr(fastpath, "LEAN_STORE", False)
    fe = start_frontend()
    series = ct_series(tmp_path / "ct", slices=3)
    assoc = _scu().associate("127.0.0.1", fe.dicom_port, ae_title="YBYX")
    assert assoc.is_established
    try:
        for path in series:
            assert assoc.send_c_store(dcmread(path)).Status == 0x0000
    finally:
        assoc.release()
    assert fe.dicom.stores == {"lean": 0, "pynetdicom": 3}
    for path in series:
        [inst] = fe.archive.catalog.locate({"SOPInstanceUID": str(dcmread(path).SOPInstanceUID)})
        stored = b"".join(fe.archive.store.get(inst.blob_key))
        assert hashlib.sha256(stored).hexdigest() == inst.sha256


def test_spool_write_failure_is_refused_out_of_resources(
    monkeypatch: pytest.MonkeyPatch, frontend: Frontend, tmp_path: Path
) -> None:
    """A spool write that fails (disk full) is answered 0xA700 once the data set is in; the
    association stays usable and nothing is catalogued."""
    from dimse import store_receiver

    [src] = ct_series(tmp_path / "ct", slices=1)
    ds = dcmread(src)
    real_write = store_receiver._write
    calls = {"n": 0}

    def failing_write(fd: int, data: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 2:  # the file meta went in; the first data fragment does not
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(store_receiver, "_write", failing_write)
    assoc = _scu().associate("127.0.0.1", frontend.dicom_port, ae_title="YBYX")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        assert status.Status == 0xA700 and "No space left" in str(status.ErrorComment)
        monkeypatch.setattr(store_receiver, "_write", real_write)
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    assert frontend.archive.catalog.locate({"SOPInstanceUID": str(ds.SOPInstanceUID)}) == []
    assert _spool_files(frontend) == []


def test_an_abort_after_a_helper_began_the_header_frees_the_helper(
    frontend: Frontend, tmp_path: Path
) -> None:
    """The first fragment went to a helper (its header read while the rest arrives); the peer then
    aborts: the partial file is dropped and the helper is free again for the next instance."""
    helpers = frontend.ingest.helpers
    assert helpers is not None
    helpers.start()
    assert helpers.wait_ready(120), "helper processes did not start"
    used = helpers.used
    [src, other] = ct_series(tmp_path / "ct", slices=2)
    ds, data = _dataset_bytes(src)
    assoc = _scu().associate("127.0.0.1", frontend.dicom_port, ae_title="YBYX")
    assert assoc.is_established
    cx = _context(assoc, CTImageStorage)
    sock = assoc.dul.socket.socket
    sock.sendall(_pdu((cx, 0x03, _store_rq_bytes(str(ds.SOPInstanceUID)))))
    sock.sendall(_pdu((cx, 0x00, data[:100_000])))  # the header and some pixel data
    deadline = time.monotonic() + 10
    while helpers._idle.qsize() == helpers.workers and time.monotonic() < deadline:
        time.sleep(0.005)
    assert helpers._idle.qsize() == helpers.workers - 1  # one is reading the header
    assoc.abort()
    deadline = time.monotonic() + 10
    while (_spool_files(frontend) or helpers._idle.qsize() < helpers.workers) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _spool_files(frontend) == [] and helpers._idle.qsize() == helpers.workers
    assert frontend.archive.catalog.locate({"SOPInstanceUID": str(ds.SOPInstanceUID)}) == []
    assoc = _scu().associate("127.0.0.1", frontend.dicom_port, ae_title="YBYX")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(dcmread(other)).Status == 0x0000
    finally:
        assoc.release()
    # the aborted one's header was read; the next came in one PDU (no limit on ours), read at once
    assert helpers.used == used + 1
    [inst] = frontend.archive.catalog.locate({"SOPInstanceUID": str(dcmread(other).SOPInstanceUID)})
    assert inst.sha256


@pytest.mark.parametrize("odd", [b"1.2.82x4.4", b"1.2.82\xfe4.4"])
def test_a_request_with_an_odd_uid_is_left_to_pynetdicom(
    frontend: Frontend, tmp_path: Path, odd: bytes
) -> None:
    """An Affected SOP Instance UID that is not digits and dots (fuzzing found bytes above 0x7F)
    is not taken by the receiver: pynetdicom's path answers it, as before, and no spool file is
    left behind."""
    [src] = ct_series(tmp_path / "ct", slices=1)
    _ds, data = _dataset_bytes(src)
    command = _store_rq_bytes("1.2.8234.4", message_id=11).replace(b"1.2.8234.4", odd)
    answer = _store_by_hand(frontend.dicom_port, command, data)
    assert answer.MessageIDBeingRespondedTo == 11 and answer.Status == 0xA900  # not the UID sent
    assert frontend.dicom.stores == {"lean": 0, "pynetdicom": 1}
    assert _spool_files(frontend) == []
