"""Storage Commitment Push Model: a modality learns which instances it may delete (issue 2 §5)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt

from dimse.contexts import STORAGE_COMMITMENT_PUSH
from dimse.reactor_gate import AE
from dimse.scu import send
from gateway.frontend import Frontend
from tests.peers.ports import free_port

WELL_KNOWN = "1.2.840.10008.1.20.1.1"


def _request(files: list[Path], extra: list[tuple[str, str]]) -> tuple[str, Dataset]:
    info = Dataset()
    info.TransactionUID = generate_uid()
    refs = []
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        refs.append(item)
    for sop_class, uid in extra:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = uid
        refs.append(item)
    info.ReferencedSOPSequence = refs
    return str(info.TransactionUID), info


def _collector() -> tuple[list[tuple[int, Dataset]], threading.Event, Callable[[Any], tuple[int, None]]]:
    reports: list[tuple[int, Dataset]] = []
    got = threading.Event()

    def on_report(event: Any) -> tuple[int, None]:
        reports.append((int(event.request.EventTypeID), event.event_information))
        got.set()
        return 0x0000, None

    return reports, got, on_report


def test_commitment_report_on_the_same_association(frontend: Frontend, samples: Path) -> None:
    files = sorted((samples / "02_MR_brain").iterdir())
    assert send(files, "127.0.0.1", frontend.dicom_port, "YBYX").ok
    missing = ("1.2.840.10008.5.1.4.1.1.4", generate_uid())
    transaction, info = _request(files, [missing])

    reports, got, on_report = _collector()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
    assoc = ae.associate(
        "127.0.0.1", frontend.dicom_port, ae_title="YBYX", evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)]
    )
    assert assoc.is_established
    status, _ = assoc.send_n_action(info, 1, STORAGE_COMMITMENT_PUSH, WELL_KNOWN)
    assert status.Status == 0x0000
    assert got.wait(15), "no N-EVENT-REPORT arrived"
    assoc.release()

    event_type, report = reports[0]
    assert event_type == 2  # some failed: the invented instance
    assert report.TransactionUID == transaction
    committed = {str(i.ReferencedSOPInstanceUID) for i in report.ReferencedSOPSequence}
    assert committed == {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    [failed] = report.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == missing[1] and failed.FailureReason == 0x0112


def test_commitment_report_on_a_new_association_when_the_modality_hung_up(
    start_frontend: Callable[..., Frontend], samples: Path
) -> None:
    modality_port = free_port()
    reports, got, on_report = _collector()
    scp = AE(ae_title="MODALITY")
    scp.add_supported_context(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)
    server = scp.start_server(
        ("127.0.0.1", modality_port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)]
    )
    try:
        fe = start_frontend(
            allow_any_calling_ae=False,
            peers=[{"ae_title": "MODALITY", "institution": "H", "host": "127.0.0.1", "port": modality_port}],
        )
        files = sorted((samples / "01_CT_chest").iterdir())
        assert send(files, "127.0.0.1", fe.dicom_port, "YBYX", calling_ae="MODALITY").ok
        transaction, info = _request(files, [])

        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
        assoc = ae.associate("127.0.0.1", fe.dicom_port, ae_title="YBYX")
        # This modality ignores any request on the association it is about to release (as real
        # ones that hang up at once do). Left to itself, pynetdicom's requestor could answer a
        # report that arrived between the N-ACTION response and release(): its reactor, woken by
        # send_n_action, still runs while release() sends A-RELEASE-RQ (it trusts a stale
        # `_is_paused`), so the answer is a P-DATA in Sta7 — InvalidEventError (Evt9) in this
        # test's own reactor thread, not in ybyx (whose report on this association is legal).
        assoc._serve_request = lambda msg, context_id: None  # type: ignore[method-assign]
        status, _ = assoc.send_n_action(info, 1, STORAGE_COMMITMENT_PUSH, WELL_KNOWN)
        assoc.release()  # before the report can come on this association
        assert status.Status == 0x0000
        assert got.wait(15), "no N-EVENT-REPORT on a new association"
    finally:
        server.shutdown()
    event_type, report = reports[0]
    assert event_type == 1 and report.TransactionUID == transaction
    assert len(report.ReferencedSOPSequence) == len(files)
    assert "FailedSOPSequence" not in report
