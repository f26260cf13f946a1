"""Bad input is refused with the right status and a reason, and nothing is half-written (issue 2 §6)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dimse.reactor_gate import AE
from dimse.scu import send
from gateway.frontend import Frontend
from tests.conftest import dcmtk


def store_status(fe: Frontend, path: Path) -> tuple[int, str]:
    """Send one file as raw bytes (pynetdicom streams the file, it does not re-encode it)."""
    report = send([path], "127.0.0.1", fe.dicom_port, "YBYX", calling_ae="BADSCU")
    if not report.failed:
        return 0, ""
    reason = report.failed[path]
    assert reason.startswith("status 0x"), reason
    return int(reason[9:13], 16), reason[14:]


def assert_nothing_stored(fe: Frontend) -> None:
    assert fe.archive.catalog.counts() == {"patients": 0, "studies": 0, "series": 0, "instances": 0}
    blobs = [p for p in fe.cfg.storage.path.rglob("*") if p.is_file()]
    assert blobs == [], f"left behind: {blobs}"


def quarantined(fe: Frontend) -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted(fe.cfg.ingest.quarantine.glob("*.reason.txt"))]


@pytest.fixture
def ct_file(samples: Path) -> Path:
    return sorted((samples / "01_CT_chest").iterdir())[0]


def test_truncated_pixel_data_is_refused(frontend: Frontend, ct_file: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(ct_file.read_bytes()[:-100_000])
    status, comment = store_status(frontend, cut)
    assert status == 0xC000
    assert "truncated" in comment
    assert_nothing_stored(frontend)
    [reason] = quarantined(frontend)
    assert "pixel data is truncated" in reason and "BADSCU" in reason


def test_missing_sop_instance_uid_is_refused(frontend: Frontend, ct_file: Path, tmp_path: Path) -> None:
    ds = dcmread(ct_file)
    del ds.SOPInstanceUID  # the file meta still names one, so the request can be sent
    bad = tmp_path / "no-uid.dcm"
    ds.save_as(bad, enforce_file_format=True)
    status, comment = store_status(frontend, bad)
    assert status == 0xA900
    assert "SOPInstanceUID is missing" in comment
    assert_nothing_stored(frontend)


def test_invalid_study_uid_is_refused(frontend: Frontend, ct_file: Path, tmp_path: Path) -> None:
    ds = dcmread(ct_file)
    ds.StudyInstanceUID = "1.2.abc"
    bad = tmp_path / "bad-uid.dcm"
    ds.save_as(bad, enforce_file_format=True)
    status, comment = store_status(frontend, bad)
    assert status == 0xA900 and "StudyInstanceUID" in comment
    assert_nothing_stored(frontend)


def test_garbage_data_set_is_refused(frontend: Frontend, ct_file: Path, tmp_path: Path) -> None:
    raw = ct_file.read_bytes()
    ds = dcmread(ct_file, stop_before_pixels=True)
    meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    bad = tmp_path / "garbage.dcm"
    bad.write_bytes(raw[:meta_end] + b"\x08\x00\x18\x00UI\xff\xff" + bytes(range(256)) * 4)
    status, comment = store_status(frontend, bad)
    # pydicom reads the garbled element leniently; the UID it yields is refused either as
    # unreadable (0xC000) or as an invalid SOP Instance UID (0xA900) — never stored.
    assert status in (0xC000, 0xA900) and comment
    assert_nothing_stored(frontend)


def test_ingest_refuses_a_data_set_other_than_announced(frontend: Frontend, ct_file: Path) -> None:
    result = frontend.ingest.accept_file(ct_file, source="T", expected_sop_uid=generate_uid())
    assert getattr(result, "kind", None) == "mismatch"
    assert_nothing_stored(frontend)


def test_unknown_calling_ae_is_rejected(
    start_frontend: Callable[..., Frontend], caplog: pytest.LogCaptureFixture
) -> None:
    fe = start_frontend(allow_any_calling_ae=False, peers=[{"ae_title": "CT1", "institution": "H1"}])
    echo = subprocess.run(
        [dcmtk("echoscu"), "-aet", "INTRUDER", "-aec", "YBYX", "127.0.0.1", str(fe.dicom_port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert echo.returncode != 0
    assert "Calling AE Title Not Recognized" in echo.stderr
    # the SCP logs the rejection on its association thread, which may finish after echoscu exits
    deadline = time.monotonic() + 5
    while not any("INTRUDER" in r.getMessage() and "rejected" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "rejection not logged"
        time.sleep(0.05)
    ok = subprocess.run(
        [dcmtk("echoscu"), "-aet", "CT1", "-aec", "YBYX", "127.0.0.1", str(fe.dicom_port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stderr


def test_association_limit_rejects_the_one_too_many(start_frontend: Callable[..., Frontend]) -> None:
    fe = start_frontend(max_associations=1)
    ae = AE(ae_title="FIRST")
    ae.add_requested_context("1.2.840.10008.1.1")
    first = ae.associate("127.0.0.1", fe.dicom_port, ae_title="YBYX")
    assert first.is_established
    try:
        echo = subprocess.run(
            [dcmtk("echoscu"), "-aec", "YBYX", "127.0.0.1", str(fe.dicom_port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert echo.returncode != 0
        assert "Local Limit Exceeded" in echo.stderr
    finally:
        first.release()


def test_same_uid_new_bytes_keeps_the_previous_as_a_version(
    frontend: Frontend, ct_file: Path, tmp_path: Path
) -> None:
    assert store_status(frontend, ct_file) == (0, "")
    assert store_status(frontend, ct_file) == (0, "")  # same bytes: nothing new
    ds = dcmread(ct_file)
    ds.SeriesDescription = "corrected"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed, enforce_file_format=True)
    assert store_status(frontend, changed) == (0, "")
    uid = str(ds.SOPInstanceUID)
    [current] = frontend.archive.catalog.locate({"SOPInstanceUID": uid})
    [previous] = frontend.archive.catalog.versions(uid)
    assert current.sha256 != previous["sha256"]
    assert frontend.archive.store.exists(previous["blob_key"]), "the previous version's bytes are kept"
    assert frontend.archive.catalog.counts()["instances"] == 1
