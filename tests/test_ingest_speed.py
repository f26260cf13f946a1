"""The C-STORE fast path (issue 2 "Numbers"): what was changed for speed still behaves the same.

* ``dimse/fastpath.py`` — event-driven association reactors (pynetdicom 3.0.x internals): the
  version gate, that our SCP's associations really use them, and that echo, store, release, abort
  and server shutdown still work on them (storage commitment on the same association, which pauses
  the reactor from another thread, is covered by ``test_commitment.py``);
* ``gateway/archive/record.py`` — the per-element memo: metadata JSON and catalog values identical
  to pydicom's own conversion, cold and warm, over pydicom's bundled test files and our samples;
* ``gateway/ingest.py`` — with the early write-back and the record built before the blob is
  placed, the stored bytes are right and no descriptor is left open.

No timings are asserted (the machine is shared); ``bench/ingest.py`` measures.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.sop_class import MRImageStorage, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler

from dimse import fastpath
from dimse.reactor_gate import AE
from gateway.archive import record
from gateway.archive.blobstore import NAMES_WITH_FILE, FolderBlobStore, file_system_type
from gateway.archive.catalog import Catalog
from gateway.archive.record import BULK_THRESHOLD, InstanceRecord
from gateway.frontend import Frontend
from gateway.ingest import Accepted, Ingest, Refused
from gateway.sample import ct_series

PYDICOM_FILES = sorted(
    p for p in (Path(pydicom.__file__).parent / "data" / "test_files").rglob("*") if p.is_file()
)


# ---------------------------------------------------------------------------------------------- fastpath


def test_fastpath_version_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fastpath._supported("3.0.0") and fastpath._supported("3.0.4")
    assert not fastpath._supported("3.1.0") and not fastpath._supported("2.0.2")
    # The installed pynetdicom is one the fast path was written against: if this fails after an
    # upgrade, re-check dimse/fastpath.py and dimse/reactor_gate.py against the new reactors before widening
    # reactor_gate.SUPPORTED.
    assert fastpath._supported(pynetdicom_version()), pynetdicom_version()
    monkeypatch.setattr(fastpath, "ENABLED", False)
    assert fastpath.request_handler() is RequestHandler
    monkeypatch.setattr(fastpath, "ENABLED", True)
    assert fastpath.request_handler() is fastpath.EventRequestHandler


def pynetdicom_version() -> str:
    import pynetdicom

    return str(pynetdicom.__version__)


def _scu(*contexts: str) -> AE:
    ae = AE(ae_title="SPEED_SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for cx in contexts:
        ae.add_requested_context(cx, ExplicitVRLittleEndian)
    return ae


def _wait(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def _active(fe: Frontend) -> list[Any]:
    server = fe.dicom._server
    assert server is not None
    return list(server.active_associations)


def test_scp_associations_use_event_reactors(frontend: Frontend, samples: Path) -> None:
    files = sorted((samples / "02_MR_brain").iterdir())[:5]
    assoc = _scu(Verification, MRImageStorage).associate("127.0.0.1", frontend.dicom_port, ae_title="YBYX")
    assert assoc.is_established
    try:
        [theirs] = _active(frontend)
        assert type(theirs) is fastpath._EventAssociation
        assert type(theirs.dul) is fastpath._EventDUL
        assert type(theirs.dul.socket) is fastpath._BulkSocket
        for _ in range(50):  # request/response ping-pong: every wake-up path of both reactors
            assert assoc.send_c_echo().Status == 0x0000
        for path in files:
            assert assoc.send_c_store(dcmread(path)).Status == 0x0000
    finally:
        started = time.monotonic()
        assoc.release()
    assert assoc.is_released and time.monotonic() - started < 2.0
    assert _wait(lambda: not _active(frontend)), "the SCP's association threads did not end"
    for path in files:
        [inst] = frontend.archive.catalog.locate({"SOPInstanceUID": str(dcmread(path).SOPInstanceUID)})
        assert inst.sha256  # catalogued


def test_associations_share_the_servers_contexts_and_still_negotiate(frontend: Frontend) -> None:
    """Each association is given the server's supported contexts without a deep copy (read-only
    in pynetdicom 3.0.x negotiation); negotiation per association is unchanged."""
    server = frontend.dicom._server
    assert server is not None and isinstance(server.contexts, fastpath.SharedContexts)
    first = _scu(Verification, MRImageStorage).associate("127.0.0.1", frontend.dicom_port, ae_title="YBYX")
    second = _scu(MRImageStorage).associate("127.0.0.1", frontend.dicom_port, ae_title="YBYX")
    try:
        assert first.is_established and second.is_established
        assert {str(cx.abstract_syntax) for cx in first.accepted_contexts} == {Verification, MRImageStorage}
        assert {str(cx.abstract_syntax) for cx in second.accepted_contexts} == {MRImageStorage}
        theirs = _active(frontend)
        assert len(theirs) == 2
        a, b = (t.acceptor.supported_contexts for t in theirs)
        assert a is not b and len(a) == len(server.contexts)
        assert all(x is y for x, y in zip(a, b, strict=True))  # the same objects, not copies
        assert first.send_c_echo().Status == 0x0000
    finally:
        first.release()
        second.release()


def test_peer_abort_ends_the_association(frontend: Frontend) -> None:
    aborted = threading.Event()
    server = frontend.dicom._server
    assert server is not None
    server.bind(evt.EVT_ABORTED, lambda _event: aborted.set())
    assoc = _scu(Verification).associate("127.0.0.1", frontend.dicom_port, ae_title="YBYX")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.abort()
    assert aborted.wait(5), "the SCP did not notice the A-ABORT"
    assert _wait(lambda: not _active(frontend))


def test_peer_vanishing_ends_the_association(frontend: Frontend) -> None:
    assoc = _scu(Verification).associate("127.0.0.1", frontend.dicom_port, ae_title="YBYX")
    assert assoc.is_established
    assert assoc.dul.socket is not None
    sock = assoc.dul.socket.socket
    assert sock is not None
    sock.shutdown(socket.SHUT_RDWR)  # the connection drops without A-RELEASE or A-ABORT
    assert _wait(lambda: not _active(frontend)), "the SCP kept a dead association"
    assoc.kill()


def test_server_stops_with_an_association_open(start_frontend: Any) -> None:
    """As with pynetdicom's own reactors: stopping the server does not wait for, or end, open
    associations; they keep working until released."""
    fe = start_frontend()
    assoc = _scu(Verification).associate("127.0.0.1", fe.dicom_port, ae_title="YBYX")
    assert assoc.is_established
    started = time.monotonic()
    fe.dicom.stop()
    assert time.monotonic() - started < 5.0
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert assoc.is_released


def test_moot_release_or_abort_after_the_end_is_dropped_once() -> None:
    """Sta13 + a local A-RELEASE response / A-ABORT (a paused sender timed out while the peer
    released): the primitive is discarded (else the reactor would see it again forever)."""
    import queue as queue_module

    from pynetdicom.pdu_primitives import A_ABORT, A_RELEASE, P_DATA

    assert fastpath._moot("Evt15", "Sta13") and fastpath._moot("Evt14", "Sta13")
    assert fastpath._moot("Evt9", "Sta13")  # a C-STORE response queued as the association ended
    assert not fastpath._moot("Evt15", "Sta6") and not fastpath._moot("Evt9", "Sta6")
    assert not fastpath._moot("Evt10", "Sta13")
    provider: queue_module.Queue[Any] = queue_module.Queue()
    fake = SimpleNamespace(to_provider_queue=provider)
    provider.put(A_ABORT())
    fastpath._EventDUL._drop_moot(fake, "Evt15")  # type: ignore[arg-type]
    assert provider.empty()
    release = A_RELEASE()
    provider.put(release)
    fastpath._EventDUL._drop_moot(fake, "Evt15")  # type: ignore[arg-type]  # not its primitive
    assert provider.queue[0] is release
    fastpath._EventDUL._drop_moot(fake, "Evt14")  # type: ignore[arg-type]
    assert provider.empty()
    response: Any = P_DATA()
    provider.put(response)
    fastpath._EventDUL._drop_moot(fake, "Evt14")  # type: ignore[arg-type]  # not its primitive
    assert provider.queue[0] is response
    fastpath._EventDUL._drop_moot(fake, "Evt9")  # type: ignore[arg-type]
    assert provider.empty()


def test_bulk_socket_reads_everything_or_what_came_before_eof() -> None:
    a, b = socket.socketpair()
    payload = os.urandom(300_000)
    fake = SimpleNamespace(socket=b)

    def send_slowly() -> None:
        for i in range(0, len(payload), 70_001):
            a.sendall(payload[i : i + 70_001])
            time.sleep(0.005)
        a.sendall(b"tail")
        a.close()

    writer = threading.Thread(target=send_slowly)
    writer.start()
    got = fastpath._BulkSocket.recv(fake, len(payload))  # type: ignore[arg-type]
    assert isinstance(got, bytearray) and bytes(got) == payload
    assert bytes(fastpath._BulkSocket.recv(fake, 100)) == b"tail"  # type: ignore[arg-type]
    writer.join()
    b.close()


def test_servers_sharing_one_listening_socket(frontend: Frontend, samples: Path) -> None:
    """Several SCPs (processes, in production) on one inherited socket: each association is served
    by whichever accepted it; one stopping does not close the port for the others."""
    from dimse.server import DicomServer

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    spool = frontend.cfg.storage.path / ".spool"
    servers = [
        DicomServer(
            frontend.cfg.dicom, frontend.ingest, frontend.archive.catalog, frontend.archive.store, spool
        )
        for _ in range(2)
    ]
    try:
        for server in servers:
            # its own descriptor of the one listening socket, as a forked process would hold
            assert server.start(listen_socket=listener.dup()) == port
        files = sorted((samples / "02_MR_brain").iterdir())[:6]
        statuses: list[int] = []

        def store(path: Path) -> None:
            assoc = _scu(MRImageStorage).associate("127.0.0.1", port, ae_title="YBYX")
            assert assoc.is_established
            statuses.append(int(assoc.send_c_store(dcmread(path)).Status))
            assoc.release()

        workers = [threading.Thread(target=store, args=(path,)) for path in files]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert statuses == [0] * len(files)
        servers[0].stop()  # its own descriptor only: the port stays open for the other
        assoc = _scu(Verification).associate("127.0.0.1", port, ae_title="YBYX")
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        for server in servers:
            server.stop()
        listener.close()


# ---------------------------------------------------------------------------------------------- record


def _reference_json(ds: Dataset, *, study: str, series: str, sop: str, has_pixels: bool) -> str:
    """The metadata JSON as it was computed before the memo: pydicom's to_json_dict, whole."""
    base = f"studies/{study}/series/{series}/instances/{sop}/bulk"
    doc = ds.to_json_dict(
        bulk_data_threshold=BULK_THRESHOLD, bulk_data_element_handler=lambda e: f"{base}/{e.tag:08X}"
    )
    if has_pixels and "7FE00010" not in doc:
        vr = "OW" if ds.get("BitsAllocated", 8) > 8 else "OB"
        doc["7FE00010"] = {"vr": vr, "BulkDataURI": f"{base}/7FE00010"}
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def _all_files(samples: Path) -> list[Path]:
    return PYDICOM_FILES + sorted(p for p in samples.rglob("*") if p.is_file())


def test_metadata_json_is_pydicoms_cold_and_warm(samples: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL)
    record._memo.clear()
    compared = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in _all_files(samples):
            for stop in (True, False):
                try:
                    reference = _reference_json(
                        dcmread(path, stop_before_pixels=stop),
                        study="1",
                        series="2",
                        sop="3",
                        has_pixels=stop,
                    )
                except Exception:  # files pydicom itself cannot turn into JSON
                    continue
                for _pass in ("cold", "warm"):
                    got = record.metadata_json(
                        dcmread(path, stop_before_pixels=stop),
                        study="1",
                        series="2",
                        sop="3",
                        has_pixels=stop,
                    )
                    assert got == reference, f"{path.name} stop_before_pixels={stop} ({_pass})"
                    compared += 1
    assert compared > 300 and record._memo


def _reference_record(ds: Dataset) -> dict[str, Any]:
    """The catalog values as computed before the memo (plain pydicom attribute access)."""

    def text(keyword: str, limit: int = 400) -> str:
        value = ds.get(keyword)
        if value is None:
            return ""
        if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
            return "\\".join(str(v) for v in value)[:limit]
        return str(value)[:limit]

    def integer(keyword: str) -> int | None:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            return None

    return {
        "patient_id": text("PatientID", 64),
        "issuer": text("IssuerOfPatientID", 64),
        "patient_name": text("PatientName"),
        "birth_date": text("PatientBirthDate", 8),
        "sex": text("PatientSex", 16),
        "study_date": text("StudyDate", 8),
        "study_time": text("StudyTime", 16),
        "accession_number": text("AccessionNumber", 64),
        "study_id": text("StudyID", 16),
        "referring_physician": text("ReferringPhysicianName"),
        "study_description": text("StudyDescription"),
        "institution_name": text("InstitutionName"),
        "modality": text("Modality", 16),
        "series_number": integer("SeriesNumber"),
        "series_description": text("SeriesDescription"),
        "body_part": text("BodyPartExamined", 64),
        "pps_start_date": text("PerformedProcedureStepStartDate", 8),
        "pps_start_time": text("PerformedProcedureStepStartTime", 16),
        "instance_number": integer("InstanceNumber"),
        "rows": integer("Rows"),
        "columns": integer("Columns"),
        "bits_allocated": integer("BitsAllocated"),
        "number_of_frames": integer("NumberOfFrames"),
    }


def test_catalog_values_are_pydicoms_cold_and_warm(samples: Path) -> None:
    from datetime import UTC, datetime

    record._memo.clear()
    checked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in _all_files(samples):
            try:
                ds = dcmread(path, stop_before_pixels=True)
                InstanceRecord.identify(ds)
                _reference_json(ds, study="1", series="2", sop="3", has_pixels=False)
                expected = _reference_record(dcmread(path, stop_before_pixels=True))
            except Exception:  # not an instance the catalog took before either
                continue
            for _pass in ("cold", "warm"):
                rec = InstanceRecord.from_dataset(
                    dcmread(path, stop_before_pixels=True),
                    transfer_syntax=ExplicitVRLittleEndian,
                    has_pixels=False,
                    size=1,
                    sha256="0" * 64,
                    blob_key="k",
                    received_at=datetime.now(UTC),
                    source_ae="X",
                )
                got = {key: getattr(rec, key) for key in expected}
                assert got == expected, f"{path.name} ({_pass})"
                checked += 1
    assert checked > 50


def test_memo_is_bounded(monkeypatch: pytest.MonkeyPatch, samples: Path) -> None:
    monkeypatch.setattr(record, "_MEMO_MAX_ENTRIES", 50)
    record._memo.clear()
    for path in sorted((samples / "02_MR_brain").iterdir()):
        record.metadata_json(
            dcmread(path, stop_before_pixels=True), study="1", series="2", sop="3", has_pixels=True
        )
        assert len(record._memo) <= 50


# ---------------------------------------------------------------------------------------------- ingest


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_ingest_stores_the_right_bytes_and_closes_files(tmp_path: Path) -> None:
    catalog = Catalog.open(f"sqlite:///{tmp_path / 'catalog.db'}")
    store = FolderBlobStore(tmp_path / "blobs")
    ingest = Ingest(catalog, store, quarantine=tmp_path / "quarantine")
    series = ct_series(tmp_path / "ct", slices=6)
    spool = tmp_path / "blobs" / ".spool"
    spool.mkdir()
    try:
        ingest_once = spool / "warm.dcm"
        for _ in range(2):  # lazy imports done; the catalog's write and (duplicate) read connections open
            shutil.copyfile(series[0], ingest_once)
            assert isinstance(ingest.accept_file(ingest_once, source="T"), Accepted)
        before = _fds()
        for i, src in enumerate(series):
            path = spool / f"{i}.dcm"
            shutil.copyfile(src, path)
            result = ingest.accept_file(path, source="T")
            assert isinstance(result, Accepted), result
            assert result.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
            path.unlink()
        truncated = spool / "cut.dcm"
        truncated.write_bytes(series[1].read_bytes()[:-1000])
        refused = ingest.accept_file(truncated, source="T")
        assert isinstance(refused, Refused) and refused.kind == "malformed"
        assert _fds() == before, "ingest left file descriptors open"
        for src in series:
            [inst] = catalog.locate(
                {"SOPInstanceUID": str(dcmread(src, stop_before_pixels=True).SOPInstanceUID)}
            )
            assert hashlib.sha256(b"".join(store.get(inst.blob_key))).hexdigest() == inst.sha256
    finally:
        catalog.close()


def test_early_writeback_is_best_effort(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import gateway.archive.blobstore as blobstore_module
    import gateway.ingest as ingest_module

    path = tmp_path / "f"
    path.write_bytes(os.urandom(200_000))
    ingest_module._start_writeback(path)  # Linux: starts write-out; elsewhere a no-op
    ingest_module._start_writeback(tmp_path / "missing")  # the real read reports it, not this
    monkeypatch.setattr(blobstore_module, "_sync_file_range", None)
    ingest_module._start_writeback(path)
    assert path.read_bytes() and len(path.read_bytes()) == 200_000


@pytest.mark.parametrize("names_with_file", [False, True], ids=["folders-fsynced", "ext4-xfs"])
def test_folder_put_file_links_then_makes_file_and_name_durable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, names_with_file: bool
) -> None:
    """The spool file is linked under its key (and the intake journal's name) first, then
    fsynced (data and new names in one journal commit), then — on file systems where that fsync
    does not carry the names — its folders; a key already there (an unacknowledged earlier try)
    is replaced by the new bytes."""

    store = FolderBlobStore(tmp_path / "blobs")
    store.names_with_file = names_with_file
    journal = tmp_path / "blobs" / ".intake"
    journal.mkdir()
    spool = tmp_path / "blobs" / ".spool"
    spool.mkdir()
    src = spool / "in.dcm"
    src.write_bytes(b"new bytes")
    calls: list[tuple[str, str]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)  # the store calls os.fsync
    final = tmp_path / "blobs" / "st" / "se" / "x.dcm"
    final.parent.mkdir(parents=True)
    final.write_bytes(b"partial from a crashed try")
    size, sha = store.put_file("st/se/x.dcm", src, also_link=journal / "j.dcm")
    assert (
        final.read_bytes() == b"new bytes" and size == 9 and sha == hashlib.sha256(b"new bytes").hexdigest()
    )
    assert os.stat(final).st_ino == os.stat(src).st_ino == os.stat(journal / "j.dcm").st_ino  # linked
    if names_with_file:
        assert calls == [("fsync", str(final))]  # one flush
    else:
        assert calls == [("fsync", str(final)), ("fsync", str(final.parent)), ("fsync", str(journal))]


def test_file_system_type_matches_stat(tmp_path: Path) -> None:
    """Which file systems get the single flush is decided by the type ``stat -f`` reports."""
    for path in (tmp_path, Path("/dev/shm"), Path("/proc/self")):
        shown = subprocess.run(
            ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True
        )
        expected = {"ext2/ext3": "ext4"}.get(shown.stdout.strip(), shown.stdout.strip())
        assert file_system_type(path) == expected, path
    assert FolderBlobStore(tmp_path / "s").names_with_file == (file_system_type(tmp_path) in NAMES_WITH_FILE)
    assert not FolderBlobStore(Path("/dev/shm") / f"ybyx-{os.getpid()}").names_with_file  # tmpfs
    shutil.rmtree(Path("/dev/shm") / f"ybyx-{os.getpid()}")


# ---------------------------------------------------------------------------------------------- helpers


def test_header_read_by_a_helper_or_from_a_prefix_is_the_whole_files(tmp_path: Path) -> None:
    """A helper's answer is the calling thread's, and so is a header read from the first bytes of
    a file still being received — or "not known yet" (None) when they do not hold all of it."""
    from datetime import UTC, datetime

    from gateway.ingest import Header, Helpers, Unfit, complete, examine, read_header

    series = ct_series(tmp_path / "ct", slices=3)
    truncated = tmp_path / "cut.dcm"
    truncated.write_bytes(series[1].read_bytes()[:-1000])
    no_pixels = tmp_path / "nopix.dcm"
    ds = dcmread(series[2])
    del ds.PixelData
    ds.save_as(no_pixels, enforce_file_format=True)
    helpers = Helpers(1)
    try:
        assert helpers.begin(str(series[0]), "T", None, datetime.now(UTC), None) is None  # not ready
        assert helpers.wait_ready(120), "helper process did not start"
        when = datetime.now(UTC)
        for path in series:
            here = examine(str(path), "MOD", None, when)
            assert isinstance(here, InstanceRecord)
            size = path.stat().st_size
            for prefix in (None, 65536, size):
                pending = helpers.begin(str(path), "MOD", None, when, prefix)
                assert pending is not None
                header = pending.result()
                assert isinstance(header, Header), prefix
                assert complete(header, str(path), None) == here
                local = read_header(str(path), "MOD", None, when, prefix)
                assert isinstance(local, Header) and complete(local, str(path), None) == here
            pixel_tag = here.pixel_offset - 12 if here.pixel_offset is not None else None
            assert pixel_tag is not None
            for short in (300, pixel_tag, pixel_tag + 8):  # the header, or the element's, cut short
                assert read_header(str(path), "MOD", None, when, short) is None, short
        assert read_header(str(no_pixels), "MOD", None, when, 65536) is None  # may go on: wait
        whole = examine(str(no_pixels), "MOD", None, when)
        assert isinstance(whole, InstanceRecord) and whole.pixel_offset is None
        pending = helpers.begin(str(series[2]), "MOD", "1.2.3.4", when, 65536)
        assert pending is not None
        wrong = pending.result()
        assert isinstance(wrong, Unfit) and wrong.kind == "mismatch"
        cut = read_header(str(truncated), "MOD", None, when, 65536)  # the header is all there
        assert isinstance(cut, Header)
        refused = complete(cut, str(truncated), None)
        assert isinstance(refused, Unfit) and refused.kind == "malformed" and "truncated" in refused.reason
        assert helpers.used == 3 * len(series) + 1
        first, second = (helpers.begin(str(p), "MOD", None, when, None) for p in series[:2])
        assert first is not None and second is None  # one helper, busy: the caller reads it itself
        first.cancel()
        assert helpers.begin(str(series[0]), "MOD", None, when, None) is not None  # idle again
    finally:
        helpers.close()


def test_received_instances_are_read_by_helpers_while_they_arrive(frontend: Frontend, tmp_path: Path) -> None:
    """Each CT slice storescu sends (several PDUs) has its header read by a helper process while
    its pixel data is still arriving, with one association or two; stored right either way."""
    import subprocess

    from dimse.server import DicomServer
    from tests.conftest import dcmtk

    ingest = Ingest(
        frontend.archive.catalog, frontend.archive.store, quarantine=tmp_path / "quarantine", helpers=2
    )
    assert ingest.helpers is not None
    ingest.helpers.start()
    assert ingest.helpers.wait_ready(120), "helper processes did not start"
    spool = frontend.cfg.storage.path / ".spool"
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = DicomServer(frontend.cfg.dicom, ingest, frontend.archive.catalog, frontend.archive.store, spool)
    series = ct_series(tmp_path / "ct", slices=16)

    def storescu(files: list[Path]) -> None:
        done = subprocess.run(
            [dcmtk("storescu"), "-aec", "YBYX", "127.0.0.1", str(port), *map(str, files)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0 and "E:" not in done.stdout + done.stderr, done.stdout + done.stderr

    try:
        assert server.start(listen_socket=listener) == port
        storescu(series[:6])  # alone
        assert ingest.helpers.used == 6
        both = [threading.Thread(target=storescu, args=(part,)) for part in (series[6:11], series[11:])]
        for t in both:
            t.start()
        for t in both:
            t.join()
        assert ingest.helpers.used == 16
        assert server.stores == {"lean": 16, "pynetdicom": 0}
        for src in series:
            sop = str(dcmread(src, stop_before_pixels=True).SOPInstanceUID)
            [inst] = frontend.archive.catalog.locate({"SOPInstanceUID": sop})
            stored = b"".join(frontend.archive.store.get(inst.blob_key))
            assert hashlib.sha256(stored).hexdigest() == inst.sha256
            # the data set as sent (the file meta is the receiver's own)
            assert dcmread(io.BytesIO(stored)).PixelData == dcmread(src).PixelData
    finally:
        server.stop()
        ingest.close()


def _server_associations(server: Any) -> list[Any]:
    live = server._server
    return [] if live is None else list(live.active_associations)


def test_healthz_says_when_the_ingest_helpers_are_ready(frontend: Frontend) -> None:
    import httpx

    url = f"http://127.0.0.1:{frontend.http_port}/healthz"
    helpers = frontend.ingest.helpers
    assert helpers is not None, '[ingest] helpers = "auto" gives one per CPU beyond the first (2 here)'
    assert httpx.get(url, timeout=10).json()["ingest_helpers"] == "none"  # not needed yet
    helpers.start()
    assert helpers.wait_ready(120)
    ready = {"status": "ok", "role": "frontend", "ingest_helpers": "ready"}
    assert httpx.get(url, timeout=10).json() == ready


def test_a_bare_tcp_probe_is_not_counted_as_an_association_being_received(frontend: Frontend) -> None:
    """A connection that never sends an A-ASSOCIATE-RQ (a port check) gets an acceptor thread that
    waits out the ACSE timeout; only established associations decide whether others are being
    received at the same time (ingest's ``offload``)."""
    from dimse.server import _receiving

    server = frontend.dicom._server
    assert server is not None
    with socket.create_connection(("127.0.0.1", frontend.dicom_port)):
        assert _wait(lambda: len(_active(frontend)) == 1)
        assert _receiving(server) == 0
        assoc = _scu(Verification).associate("127.0.0.1", frontend.dicom_port, ae_title="YBYX")
        try:
            assert assoc.is_established and len(_active(frontend)) == 2
            assert _receiving(server) == 1
        finally:
            assoc.release()
