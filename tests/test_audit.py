"""The audit trail (issue 6 §4, R-SE-4): hash chain, signed and exported checkpoints, ``ybyx audit
verify`` naming the first edited, deleted or reordered record, the records the front-end writes for
C-STORE, QIDO-RS and WADO-RS (SQLite and PostgreSQL), and the DICOM audit message export."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import stat
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydicom import dcmread
from sqlalchemy import Engine, select, text

from dimse.scu import dicom_files, send
from gateway.archive.catalog import Catalog
from gateway.archive.schema import audit_checkpoints, audit_log
from gateway.audit import (
    CHECKPOINT_MISMATCH,
    EDITED,
    GAP,
    GENESIS,
    REORDERED,
    Actor,
    AuditLog,
    AuditRecord,
    EventType,
    ExportConflict,
    FolderExport,
    Result,
    checkpoint_name,
    key_id,
    load_public_key,
    load_signing_key,
    read_records,
    record_hash,
    trusted_keys,
    verify,
)
from gateway.audit_dicom import dicom_audit_message, export_dicom
from gateway.cli import main
from gateway.frontend import Frontend
from gateway.sample import ct_series
from tests.conftest import auth

DOCTOR = Actor("dr.wang", "doctor", "H001", "10.1.2.3")
SYSTEM = Actor("ybyx-frontend:YBYX", "system", "H001", "local")


class FakeClock:
    """Deterministic time: each reading is 1 ms after the previous one; ``advance`` jumps."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            self.now += timedelta(milliseconds=1)
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += timedelta(seconds=seconds)


class Trail:
    """An audit log over a fresh catalog, with its key and export folder."""

    def __init__(self, url: str, root: Path) -> None:
        self.catalog = Catalog.open(url)
        self.key_path = root / "audit-key.pem"
        self.key = load_signing_key(self.key_path, create=True)
        self.export = FolderExport(root / "export")
        self.clock = FakeClock()
        self.log = AuditLog(
            self.catalog,
            signing_key=self.key,
            export=self.export,
            system=SYSTEM,
            clock=self.clock,
            checkpoint_every_records=5,
            checkpoint_every_seconds=60,
        )

    @property
    def engine(self) -> Engine:
        return self.catalog.engine

    def fill(self, n: int) -> None:
        for i in range(n):
            self.log.record_as(
                DOCTOR,
                EventType.RETRIEVAL,
                resource=f"study:1.2.3.{i}",
                result=Result.SUCCESS,
                detail={"study_instance_uid": f"1.2.3.{i}", "instances": i},
            )

    def verify(self, keys: dict[str, Any] | None = None) -> Any:
        return verify(self.engine, keys if keys is not None else trusted_keys(self.key_path), self.export)

    def sql(self, statement: str, **params: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(text(statement), params)


@pytest.fixture(params=["sqlite", "postgresql"])
def trail(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Trail]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'catalog.db'}"
    else:
        url = request.getfixturevalue("new_pg_db")()
    t = Trail(url, tmp_path)
    yield t
    t.catalog.close()


def sealed(t: Trail, n: int = 12) -> Trail:
    """``n`` records, checkpoints at every 5th (in the appending transaction) and at the end."""
    t.fill(n)
    t.log.seal()
    return t


# ---- the chain -------------------------------------------------------------------------------


def test_chain_verifies_and_hashes_are_the_documented_formula(trail: Trail) -> None:
    sealed(trail, 12)
    report = trail.verify()
    assert report.ok, report.summary()
    assert (report.records, report.last_seq) == (12, 12)
    assert (report.checkpoints, report.exported_checkpoints) == (3, 3)  # seq 5, 10 and the tail 12

    records = list(read_records(trail.engine))
    assert [r.seq for r in records] == list(range(1, 13))
    assert records[0].prev_hash == GENESIS
    for before, rec in itertools.pairwise(records):
        assert rec.prev_hash == before.hash
    # hash = SHA-256 of the canonical JSON (sorted keys, no spaces, UTF-8) of the fields + prev_hash
    first = records[0]
    body = {k: v for k, v in first.as_dict().items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert first.hash == hashlib.sha256(canonical.encode()).hexdigest() == record_hash(first.as_dict())
    assert first.time == "2026-11-23T08:00:00.001000Z"  # the injected clock
    assert (first.actor, first.role, first.institution, first.source) == (
        "dr.wang",
        "doctor",
        "H001",
        "10.1.2.3",
    )
    assert json.loads(first.detail) == {"study_instance_uid": "1.2.3.0", "instances": 0}


def test_edited_record_is_named(trail: Trail) -> None:
    sealed(trail)
    trail.sql("UPDATE audit_log SET actor = 'mallory' WHERE seq = 7")
    report = trail.verify()
    assert report.problem is not None
    assert (report.problem.seq, report.problem.kind) == (7, EDITED)


def test_deleted_record_is_a_gap(trail: Trail) -> None:
    sealed(trail)
    trail.sql("DELETE FROM audit_log WHERE seq = 4")
    report = trail.verify()
    assert report.problem is not None
    assert (report.problem.seq, report.problem.kind) == (4, GAP)
    assert "4-4 are missing" in report.problem.message


def test_deleted_tail_falls_short_of_the_checkpoint(trail: Trail) -> None:
    sealed(trail)
    trail.sql("DELETE FROM audit_log WHERE seq > 10")
    trail.sql("DELETE FROM audit_checkpoints WHERE seq > 10")  # the exported copy still says 12
    report = trail.verify()
    assert report.problem is not None
    assert (report.problem.seq, report.problem.kind) == (11, GAP)


def test_swapped_records_are_reordered(trail: Trail) -> None:
    sealed(trail)
    cols = [c.name for c in audit_log.columns if c.name != "seq"]
    with trail.engine.begin() as conn:
        a, b = (conn.execute(select(audit_log).where(audit_log.c.seq == s)).one()._mapping for s in (3, 4))
        for seq, row in ((3, b), (4, a)):
            conn.execute(audit_log.update().where(audit_log.c.seq == seq).values({c: row[c] for c in cols}))
    report = trail.verify()
    assert report.problem is not None
    assert (report.problem.seq, report.problem.kind) == (3, REORDERED)
    assert "stored at seq 4" in report.problem.message


def test_rewritten_chain_does_not_match_the_signed_checkpoint(trail: Trail) -> None:
    """Someone edits a record and recomputes every later hash (but holds no signing key)."""
    sealed(trail)
    records = list(read_records(trail.engine))
    prev = records[5].hash  # seq 6
    with trail.engine.begin() as conn:
        for rec in records[6:]:  # seq 7 … 12
            fields = rec.as_dict()
            fields["prev_hash"] = prev
            if rec.seq == 7:
                fields["actor"] = "mallory"
            fields["hash"] = prev = record_hash(fields)
            conn.execute(audit_log.update().where(audit_log.c.seq == rec.seq).values(fields))
    # the exported segment still holds record 7's original hash: it names the edited record
    report = trail.verify()
    assert report.problem is not None
    assert (report.problem.seq, report.problem.kind) == (7, EDITED)
    assert "exported copy" in report.problem.message
    # from the database alone, the signed checkpoint at seq 10 no longer matches
    report = verify(trail.engine, trusted_keys(trail.key_path), None)
    assert report.problem is not None
    assert (report.problem.seq, report.problem.kind) == (10, CHECKPOINT_MISMATCH)


def test_exported_checkpoint_is_append_only_and_tampering_is_found(trail: Trail) -> None:
    sealed(trail)
    path = trail.export.path / checkpoint_name(10)
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    with pytest.raises(ExportConflict):
        trail.export.put(checkpoint_name(10), b"{}")
    trail.export.put(checkpoint_name(10), path.read_bytes())  # the same content again: a no-op
    assert not [p for p in trail.export.path.iterdir() if p.name.startswith(".")]  # no temp files left

    doc = json.loads(path.read_bytes())
    doc["hash"] = "f" * 64
    os.chmod(path, 0o644)
    path.write_text(json.dumps(doc))
    report = trail.verify()
    assert report.problem is not None
    assert (report.problem.seq, report.problem.kind) == (10, CHECKPOINT_MISMATCH)


def test_checkpoint_signatures_are_checked_with_the_public_key(trail: Trail) -> None:
    sealed(trail)
    pub_file = trail.key_path.with_name(trail.key_path.name + ".pub")
    public = load_public_key(pub_file)
    assert b"PRIVATE" not in pub_file.read_bytes()
    assert trail.verify({key_id(public): public}).ok  # the public key alone suffices

    other = Ed25519PrivateKey.generate().public_key()
    report = trail.verify({key_id(other): other})
    assert report.problem is not None and report.problem.kind == CHECKPOINT_MISMATCH
    assert "not trusted" in report.problem.message

    with trail.engine.begin() as conn:
        row = conn.execute(select(audit_checkpoints).where(audit_checkpoints.c.seq == 5)).one()
        forged = ("00" if row.signature[:2] != "00" else "11") + row.signature[2:]
        conn.execute(audit_checkpoints.update().where(audit_checkpoints.c.seq == 5).values(signature=forged))
    report = trail.verify()
    assert report.problem is not None
    assert (report.problem.seq, report.problem.kind) == (5, CHECKPOINT_MISMATCH)
    assert "does not verify" in report.problem.message


def test_time_based_checkpoint(trail: Trail) -> None:
    trail.fill(3)
    assert trail.log.checkpoint() is not None  # no checkpoint yet: the first is due at once
    trail.fill(1)
    assert trail.log.checkpoint() is None  # 60 s have not passed
    trail.clock.advance(61)
    cp = trail.log.checkpoint()
    assert cp is not None and cp.seq == 4
    assert trail.log.checkpoint() is None  # nothing new since
    assert trail.log.export_pending() == 2
    assert sorted(p.name for p in trail.export.path.glob("checkpoint-*")) == [
        checkpoint_name(3),
        checkpoint_name(4),
    ]
    assert (trail.export.path / "segment-000000000004-000000000004.jsonl").exists()
    assert trail.verify().ok


def test_concurrent_writers_are_serialised(trail: Trail) -> None:
    def write() -> None:
        for _ in range(25):
            trail.log.record_as(DOCTOR, EventType.QUERY, resource="/dicom-web/studies", result=Result.SUCCESS)

    def queue() -> None:
        for _ in range(25):
            trail.log.submit(DOCTOR, EventType.QUERY, resource="/dicom-web/series", result=Result.SUCCESS)

    trail.log.start()
    try:
        threads = [threading.Thread(target=write) for _ in range(6)] + [
            threading.Thread(target=queue) for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        trail.log.stop()  # flushes the queue and seals
    assert trail.log.lost == 0
    report = trail.verify()
    assert report.ok, report.summary()
    assert report.records == 200
    assert report.exported_checkpoints == report.checkpoints >= 40


def test_unusable_values_are_cleaned_not_failed(trail: Trail) -> None:
    seq = trail.log.record(
        EventType.ANOMALY,
        actor="x\x00" * 500,
        role="r",
        institution="i",
        resource="r" * 10_000,
        result="failure",
        source="s",
        detail={"blob": "y" * 20_000},
    )
    assert seq == 1
    [rec] = read_records(trail.engine)
    assert "\x00" not in rec.actor and len(rec.actor) == 256 and len(rec.resource) == 2048
    assert trail.verify().ok


# ---- the command -------------------------------------------------------------------------------


def test_ybyx_audit_verify_exit_codes(
    start_frontend: Callable[..., Frontend], samples: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fe = start_frontend()
    report = send(dicom_files([samples])[:3], "127.0.0.1", fe.dicom_port, "YBYX", calling_ae="MODALITY1")
    assert report.ok
    assert fe.audit is not None
    fe.audit.seal()  # checkpoint and export the tail
    config = fe.cfg.storage.path.parent / "frontend.toml"
    config.write_text(
        "\n".join(
            [
                'role = "frontend"',
                'institution = "TEST_HOSPITAL"',
                "[dicom]",
                "allow_any_calling_ae = true",
                "[database]",
                f'url = "{fe.cfg.database.url}"',
                "[storage]",
                f'path = "{fe.cfg.storage.path}"',
            ]
        ),
        encoding="utf-8",
    )
    assert main(["audit", "verify", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "audit chain ok: 4 records" in out  # start, 3 uploads

    pub = fe.cfg.audit.signing_key.with_name(fe.cfg.audit.signing_key.name + ".pub")
    assert main(["audit", "verify", "-c", str(config), "--public-key", str(pub)]) == 0

    with fe.archive.catalog.engine.begin() as conn:
        conn.execute(text("UPDATE audit_log SET result = 'failure' WHERE seq = 3"))
    capsys.readouterr()
    assert main(["audit", "verify", "-c", str(config)]) == 1
    assert "seq 3: edited" in capsys.readouterr().err

    out_dir = fe.cfg.storage.path.parent / "atna"
    assert main(["audit", "export", "-c", str(config), "--format", "dicom", "--out", str(out_dir)]) == 0
    assert len(list(out_dir.glob("audit-*.xml"))) == 4


# ---- what the front-end records (SQLite and PostgreSQL) ----------------------------------------


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_records_after_c_store_qido_and_wado(
    db: str, start_frontend: Callable[..., Frontend], samples: Path, request: pytest.FixtureRequest
) -> None:
    db_url = request.getfixturevalue("new_pg_db")() if db == "postgresql" else None
    fe = start_frontend(db_url=db_url)
    assert fe.audit is not None
    files = dicom_files([samples])[:2]
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert send(files, "127.0.0.1", fe.dicom_port, "YBYX", calling_ae="MODALITY1").ok
    url = f"http://127.0.0.1:{fe.http_port}/dicom-web"
    headers = auth(fe)
    assert (
        httpx.get(
            f"{url}/studies", params={"StudyInstanceUID": study}, headers=headers, timeout=30
        ).status_code
        == 200
    )
    assert httpx.get(f"{url}/studies/{study}", headers=headers, timeout=60).status_code == 200
    assert httpx.get(f"{url}/studies", timeout=30).status_code == 401  # no token
    # a token without the scope: the 403 is recorded with who asked
    assert httpx.get(f"{url}/studies", headers=auth(fe, "wado"), timeout=30).status_code == 403
    # the hook records after the response is sent: wait for the last of them
    by_type: dict[str, list[AuditRecord]] = {}
    deadline = time.monotonic() + 10
    while len(by_type.get("access-denied", [])) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        fe.audit.flush()
        by_type = {}
        for r in read_records(fe.archive.catalog.engine):
            by_type.setdefault(r.event_type, []).append(r)
    assert by_type["application-start"][0].seq == 1

    uploads = by_type["upload"]
    assert len(uploads) == 2
    assert {r.actor for r in uploads} == {"MODALITY1"}
    assert {r.resource for r in uploads} >= {f"study:{study}"}
    assert uploads[0].source == "127.0.0.1"
    assert json.loads(uploads[0].detail)["outcome"] == "stored"

    [qido] = by_type["query"]
    assert qido.resource == f"/dicom-web/studies?StudyInstanceUID={study}"
    assert qido.result == "success" and qido.source == "127.0.0.1"
    assert qido.actor not in ("", "anonymous") and qido.role == "client"  # the token's principal

    [wado] = by_type["retrieval"]
    assert wado.resource == f"/dicom-web/studies/{study}"
    assert json.loads(wado.detail)["study_instance_uid"] == study

    denied, forbidden = by_type["access-denied"]
    assert (denied.actor, denied.result, json.loads(denied.detail)["status"]) == ("anonymous", "failure", 401)
    assert forbidden.actor not in ("", "anonymous") and json.loads(forbidden.detail)["status"] == 403

    fe.audit.seal()
    keys = trusted_keys(fe.cfg.audit.signing_key)
    report = verify(fe.archive.catalog.engine, keys, FolderExport(fe.cfg.audit.export_path))
    assert report.ok, report.summary()


def test_a_series_read_frame_by_frame_is_one_grouped_record(
    start_frontend: Callable[..., Frontend], samples: Path
) -> None:
    """A viewer's burst of frame and thumbnail reads is one record per kind, counting every request
    and listing every instance (R-SE-4), while a failed read keeps a record of its own."""
    fe = start_frontend()
    assert fe.audit is not None
    fe.audit.group_seconds = 0.5
    files = [f for f in dicom_files([samples]) if dcmread(f, stop_before_pixels=True).Modality == "CT"][:4]
    headers = dcmread(files[0], stop_before_pixels=True)
    study, series = str(headers.StudyInstanceUID), str(headers.SeriesInstanceUID)
    assert send(files, "127.0.0.1", fe.dicom_port, "YBYX", calling_ae="MODALITY1").ok
    sops = [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    base = f"http://127.0.0.1:{fe.http_port}/dicom-web/studies/{study}/series/{series}/instances"
    accept = {"Accept": 'multipart/related; type="application/octet-stream"'}
    with httpx.Client(headers=auth(fe), timeout=30) as client:
        for sop in [*sops, *sops]:  # every frame read twice
            assert client.get(f"{base}/{sop}/frames/1", headers=accept).status_code == 200
        assert client.get(f"{base}/{sops[0]}/thumbnail").status_code == 200
        assert client.get(f"{base}/1.2.3.404/frames/1", headers=accept).status_code == 404
    deadline = time.monotonic() + 10
    retrievals: list[AuditRecord] = []
    while len(retrievals) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
        fe.audit.flush()
        retrievals = [r for r in read_records(fe.archive.catalog.engine) if r.event_type == "retrieval"]
    by_resource = {r.resource: r for r in retrievals}
    assert len(retrievals) == 3, [r.resource for r in retrievals]
    frames = by_resource[f"/dicom-web/studies/{study}/series/{series}/instances/*/frames"]
    detail = json.loads(frames.detail)
    assert frames.result == "success" and detail["requests"] == 8
    assert detail["items"] == [f"{sop}/frames/1" for sop in sops]
    assert detail["first"] <= detail["last"] and detail["series_instance_uid"] == series
    series_path = f"/dicom-web/studies/{study}/series/{series}/instances"
    thumb = json.loads(by_resource[f"{series_path}/*/thumbnail"].detail)
    assert (thumb["requests"], thumb["items"]) == (1, [sops[0]])
    missing = by_resource[f"/dicom-web/studies/{study}/series/{series}/instances/1.2.3.404/frames/1"]
    assert missing.result == "failure" and json.loads(missing.detail)["status"] == 404
    fe.audit.seal()
    keys = trusted_keys(fe.cfg.audit.signing_key)
    report = verify(fe.archive.catalog.engine, keys, FolderExport(fe.cfg.audit.export_path))
    assert report.ok, report.summary()


def test_refused_c_store_is_recorded(start_frontend: Callable[..., Frontend], tmp_path: Path) -> None:
    fe = start_frontend()
    assert fe.audit is not None
    bad = tmp_path / "bad.dcm"
    [good] = ct_series(tmp_path / "ct", slices=1)
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) - 1000])  # truncated pixel data: refused
    report = send([bad], "127.0.0.1", fe.dicom_port, "YBYX", calling_ae="MODALITY1")
    assert not report.ok
    [rec] = [r for r in read_records(fe.archive.catalog.engine) if r.event_type == "upload"]
    assert (rec.actor, rec.result) == ("MODALITY1", "failure")
    assert json.loads(rec.detail)["refused"] == "malformed"


# ---- DICOM audit messages (PS3.15 A.5) -----------------------------------------------------------


def _event_id(xml: bytes) -> tuple[str, str, str]:
    root = ET.fromstring(xml)
    assert root.tag == "AuditMessage"
    ev = root.find("EventIdentification")
    assert ev is not None
    code = ev.find("EventID")
    assert code is not None and code.get("codeSystemName") == "DCM"
    return code.get("csd-code", ""), ev.get("EventActionCode", ""), ev.get("EventOutcomeIndicator", "")


def test_dicom_audit_messages(trail: Trail) -> None:
    log = trail.log
    study = "1.2.840.99.1"
    log.record_as(
        Actor("MODALITY1", "dicom-peer", "H001", "10.0.0.7"),
        EventType.UPLOAD,
        resource=f"study:{study}",
        result=Result.SUCCESS,
        detail={
            "study_instance_uid": study,
            "sop_instance_uid": "1.2.3.4",
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        },
    )
    log.record_as(DOCTOR, EventType.QUERY, resource="/dicom-web/studies?PatientID=P1", result=Result.SUCCESS)
    log.record_as(
        DOCTOR,
        EventType.RETRIEVAL,
        resource=f"/dicom-web/studies/{study}",
        result=Result.SUCCESS,
        detail={"study_instance_uid": study},
    )
    log.record_as(
        DOCTOR, EventType.RETRIEVAL, resource=f"/dicom-web/studies/{study}/rendered", result=Result.SUCCESS
    )
    log.record_as(
        DOCTOR,
        EventType.ACCESS_DENIED,
        resource="/api/v1/exams",
        result=Result.FAILURE,
        detail={"status": 403},
    )
    log.record_as(DOCTOR, EventType.LOGIN, resource="session", result=Result.SUCCESS)
    log.record_as(
        SYSTEM,
        EventType.FORWARD,
        resource=f"study:{study}",
        result=Result.FAILURE,
        detail={"study_instance_uid": study, "center": "http://center", "error": "refused"},
    )
    log.record_as(SYSTEM, EventType.KEY_OPERATION, resource="key:abc", result=Result.SUCCESS)
    records = list(read_records(trail.engine))
    messages = [
        dicom_audit_message(r, system=SYSTEM, patient_of=lambda uid: "P1" if uid == study else None)
        for r in records
    ]
    assert [_event_id(m) for m in messages] == [
        ("110104", "C", "0"),  # DICOM Instances Transferred (received)
        ("110112", "E", "0"),  # Query
        ("110104", "R", "0"),  # DICOM Instances Transferred (sent)
        ("110103", "R", "0"),  # DICOM Instances Accessed (rendered)
        ("110113", "E", "4"),  # Security Alert, minor failure
        ("110114", "E", "0"),  # User Authentication
        ("110104", "R", "8"),  # forwarding failed: serious failure
        ("110113", "E", "0"),  # Security Alert: key operation
    ]
    for xml in messages:
        assert xml.startswith(b"<?xml version='1.0' encoding='utf-8'?>")
        root = ET.fromstring(xml)
        # schema order: EventIdentification, ActiveParticipant+, AuditSourceIdentification, objects*
        tags = [child.tag for child in root]
        assert tags[0] == "EventIdentification"
        n = tags.count("ActiveParticipant")
        assert n >= 1 and tags[1 : 1 + n] == ["ActiveParticipant"] * n
        assert tags[1 + n] == "AuditSourceIdentification"
        assert set(tags[2 + n :]) <= {"ParticipantObjectIdentification"}
        assert any(p.get("UserIsRequestor") == "true" for p in root.iter("ActiveParticipant"))
        src = root.find("AuditSourceIdentification")
        assert src is not None and src.get("AuditSourceID") == SYSTEM.actor

    upload = ET.fromstring(messages[0])
    objects = {
        o.find("ParticipantObjectIDTypeCode").get("csd-code"): o  # type: ignore[union-attr]
        for o in upload.iter("ParticipantObjectIdentification")
    }
    assert objects["110180"].get("ParticipantObjectID") == study  # Study Instance UID
    sop_class = objects["110180"].find("ParticipantObjectDescription/SOPClass")
    assert sop_class is not None and sop_class.get("UID") == "1.2.840.10008.5.1.4.1.1.2"
    assert objects["2"].get("ParticipantObjectID") == "P1"  # the patient, from the catalog
    roles = {p.get("UserID"): p.find("RoleIDCode").get("csd-code") for p in upload.iter("ActiveParticipant")}  # type: ignore[union-attr]
    assert roles == {"MODALITY1": "110153", SYSTEM.actor: "110152"}
    details = {d.get("type") for d in upload.iter("ParticipantObjectDetail")}
    assert details == {"ybyx-audit-seq", "ybyx-audit-hash"}

    query = ET.fromstring(messages[1])
    q = query.find("ParticipantObjectIdentification/ParticipantObjectQuery")
    assert q is not None and b"PatientID=P1" in base64.b64decode(q.text or "")

    out = trail.export.path.parent / "atna"
    assert export_dicom(trail.engine, out, SYSTEM) == len(records)
    for f in out.iterdir():
        ET.fromstring(f.read_bytes())  # each file a well-formed document
