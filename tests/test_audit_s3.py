"""Audit export to S3 with object lock (R-SE-4, issue 6 §4; ``gateway/audit_s3.py``), against the
real SeaweedFS of ``tests/conftest.py``: objects are locked with retention, the server refuses to
delete or shorten them, the export resumes after a crash, and ``ybyx audit verify`` catches a
local copy rewritten by someone holding the signing key.

Objects under COMPLIANCE retention cannot be removed, so the module shares one bucket (a SeaweedFS
collection) and each test writes below its own prefix.
"""

from __future__ import annotations

import io
import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from minio import Minio
from minio.commonconfig import COMPLIANCE, GOVERNANCE
from minio.error import S3Error
from minio.retention import Retention
from sqlalchemy import select

from gateway.archive.catalog import Catalog
from gateway.archive.schema import audit_checkpoints, audit_log
from gateway.audit import (
    CHECKPOINT_MISMATCH,
    AuditLog,
    Checkpoint,
    EventType,
    ExportAll,
    ExportConflict,
    ExportTarget,
    FolderExport,
    Result,
    VerifyReport,
    canonical_json,
    checkpoint_name,
    load_signing_key,
    read_records,
    record_hash,
    segment_name,
    system_actor,
    trusted_keys,
    verify,
)
from gateway.audit_s3 import ExportUnavailable, ObjectLockExport
from gateway.cli import main
from gateway.config import ConfigError, FrontendConfig, load_config, parse_config
from tests.peers.seaweedfs import S3Endpoint, seaweedfs  # noqa: F401  (session fixture)
from tests.test_audit import DOCTOR, SYSTEM, FakeClock


def client(ep: S3Endpoint) -> Minio:
    return Minio(ep.endpoint, access_key=ep.access_key, secret_key=ep.secret_key, secure=False)


@pytest.fixture(scope="module")
def bucket(seaweedfs: S3Endpoint) -> str:  # noqa: F811
    """One object-locked bucket for the module (made by the export's own check)."""
    name = f"audit-{uuid.uuid4().hex[:12]}"
    ObjectLockExport(seaweedfs.endpoint, seaweedfs.access_key, seaweedfs.secret_key, name).check()
    return name


def s3_export(
    ep: S3Endpoint, bucket: str, *, mode: str = COMPLIANCE, retain_days: int = 1, legal_hold: bool = False
) -> ObjectLockExport:
    """A target below a fresh prefix of the shared bucket."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    return ObjectLockExport(
        ep.endpoint,
        ep.access_key,
        ep.secret_key,
        bucket,
        prefix=prefix,
        mode=mode,
        retain_days=retain_days,
        legal_hold=legal_hold,
    )


class Trail:
    """An audit log on SQLite exporting to a folder and to S3 (checkpoint every 5 records)."""

    def __init__(self, root: Path, s3: ObjectLockExport, *, export: ExportTarget | None = None) -> None:
        self.root = root
        self.catalog = Catalog.open(f"sqlite:///{root / 'catalog.db'}")
        self.key_path = root / "audit-key.pem"
        self.folder = FolderExport(root / "export")
        self.s3 = s3
        self.log = AuditLog(
            self.catalog,
            signing_key=load_signing_key(self.key_path, create=True),
            export=export or ExportAll([self.folder, s3]),
            system=SYSTEM,
            clock=FakeClock(),
            checkpoint_every_records=5,
            checkpoint_every_seconds=60,
        )

    def fill(self, n: int) -> None:
        for i in range(n):
            self.log.record_as(
                DOCTOR,
                EventType.RETRIEVAL,
                resource=f"study:1.2.3.{i}",
                result=Result.SUCCESS,
                detail={"i": i},
            )

    def verify(self, export: ExportTarget) -> VerifyReport:
        return verify(self.catalog.engine, trusted_keys(self.key_path), export)


@pytest.fixture
def trails(tmp_path: Path) -> Iterator[list[Trail]]:
    made: list[Trail] = []
    yield made
    for t in made:
        t.catalog.close()


# ---- what is exported, and what the server refuses -------------------------------------------


@pytest.mark.parametrize(("mode", "hold"), [(COMPLIANCE, True), (GOVERNANCE, False)])
def test_segments_and_checkpoints_are_locked_and_cannot_be_removed(
    seaweedfs: S3Endpoint,  # noqa: F811
    bucket: str,
    tmp_path: Path,
    trails: list[Trail],
    mode: str,
    hold: bool,
) -> None:
    s3 = s3_export(seaweedfs, bucket, mode=mode, retain_days=2, legal_hold=hold)
    t = Trail(tmp_path, s3)
    trails.append(t)
    t.fill(12)
    t.log.seal()  # checkpoints at 5, 10 (in the appending transaction) and 12 (seal)

    names = s3.names()
    assert names == t.folder.names()
    segments = [segment_name(1, 5), segment_name(6, 10), segment_name(11, 12)]
    checkpoints = [checkpoint_name(5), checkpoint_name(10), checkpoint_name(12)]
    assert [n for n in names if not n.startswith("public-key-")] == checkpoints + segments
    assert len([n for n in names if n.startswith("public-key-")]) == 1
    before = datetime.now(UTC)
    for name in names:
        assert s3.get(name) == t.folder.get(name)
        assert len(s3.versions(name)) == 1
        got_mode, until, legal = s3.retention(name)
        assert got_mode == mode
        assert until is not None and before + timedelta(days=2) - timedelta(minutes=10) < until
        assert until < before + timedelta(days=2, minutes=10)
        assert legal is hold
    assert t.verify(s3).ok

    c = client(seaweedfs)
    key = s3.prefix + segment_name(6, 10)
    version = s3.versions(segment_name(6, 10))[0].version_id
    locked_until = s3.retention(segment_name(6, 10))[1]
    with pytest.raises(S3Error) as refused:
        c.remove_object(bucket, key, version_id=version)
    assert refused.value.code == "AccessDenied"
    with pytest.raises(S3Error) as refused:
        c.set_object_retention(
            bucket, key, Retention(mode, datetime.now(UTC) + timedelta(hours=1)), version_id=version
        )
    assert refused.value.code == "AccessDenied"
    assert s3.retention(segment_name(6, 10)) == (mode, locked_until, hold)
    assert s3.get(segment_name(6, 10)) == t.folder.get(segment_name(6, 10))

    # what S3 does allow on a versioned bucket: a new version on top, a delete marker
    forged = b'{"seq":6}\n'
    c.put_object(bucket, key, io.BytesIO(forged), len(forged))
    c.remove_object(bucket, s3.prefix + checkpoint_name(12))
    assert s3.get(segment_name(6, 10)) == t.folder.get(segment_name(6, 10))  # still the locked version
    assert s3.get(checkpoint_name(12)) == t.folder.get(checkpoint_name(12))
    assert dict(s3.findings()) == {
        segment_name(6, 10): "was overwritten after export (2 versions with other bytes)",
        checkpoint_name(12): "was deleted after export (a delete marker hides the locked version)",
    }
    report = t.verify(s3)
    assert report.problem is not None
    assert (report.problem.seq, report.problem.kind) == (6, CHECKPOINT_MISMATCH)
    assert "overwritten after export" in report.problem.message


def test_same_bytes_are_a_no_op_other_bytes_a_conflict(
    seaweedfs: S3Endpoint,  # noqa: F811
    bucket: str,
) -> None:
    s3 = s3_export(seaweedfs, bucket, retain_days=1)
    s3.put("checkpoint-000000000001.json", b'{"a":1}\n')
    s3.put("checkpoint-000000000001.json", b'{"a":1}\n')
    assert len(s3.versions("checkpoint-000000000001.json")) == 1
    with pytest.raises(ExportConflict, match="exists with other content"):
        s3.put("checkpoint-000000000001.json", b'{"a":2}\n')
    assert s3.get("checkpoint-000000000001.json") == b'{"a":1}\n'
    assert s3.get("checkpoint-000000000002.json") is None
    with pytest.raises(ValueError, match="bad export name"):
        s3.put("../escape", b"x")


class CrashingExport:
    """The S3 target, dying at the first checkpoint: before its PUT, or after it (before the
    exporter could note its progress)."""

    def __init__(self, inner: ObjectLockExport, after_put: bool) -> None:
        self.inner = inner
        self.after_put = after_put

    def put(self, name: str, data: bytes) -> None:
        if name.startswith("checkpoint-") and not self.after_put:
            raise OSError("simulated crash before the PUT")
        self.inner.put(name, data)
        if name.startswith("checkpoint-"):
            raise OSError("simulated crash after the PUT")

    def get(self, name: str) -> bytes | None:
        return self.inner.get(name)

    def names(self) -> list[str]:
        return self.inner.names()


@pytest.mark.parametrize("after_put", [False, True], ids=["before-put", "after-put"])
def test_export_resumes_after_a_crash_without_duplicates(
    seaweedfs: S3Endpoint,  # noqa: F811
    bucket: str,
    tmp_path: Path,
    trails: list[Trail],
    after_put: bool,
) -> None:
    s3 = s3_export(seaweedfs, bucket, retain_days=1)
    folder = FolderExport(tmp_path / "export")
    t = Trail(tmp_path, s3, export=ExportAll([folder, CrashingExport(s3, after_put)]))
    trails.append(t)
    t.fill(7)  # checkpoint at 5, made in the appending transaction, exported after commit
    with pytest.raises(OSError, match="simulated crash"):
        t.log.export_pending()
    assert segment_name(1, 5) in s3.names()
    assert (checkpoint_name(5) in s3.names()) is after_put

    # the next run (a fresh log: nothing remembered) exports the same names with the same bytes
    again = Trail(tmp_path, s3)
    trails.append(again)
    again.fill(5)  # checkpoint at 10
    again.log.seal()
    for name in s3.names():
        assert len(s3.versions(name)) == 1, name
        assert s3.get(name) == folder.get(name), name
    assert {checkpoint_name(5), checkpoint_name(10), checkpoint_name(12), segment_name(11, 12)} <= set(
        s3.names()
    )
    assert again.verify(s3).ok


class Flaky:
    """The S3 target behind a switch: ``down`` makes every call fail as an outage would."""

    def __init__(self, inner: ObjectLockExport) -> None:
        self.inner = inner
        self.down = True
        self.calls = 0

    def _call(self) -> None:
        self.calls += 1
        if self.down:
            raise OSError("simulated outage")

    def put(self, name: str, data: bytes) -> None:
        self._call()
        self.inner.put(name, data)

    def get(self, name: str) -> bytes | None:
        self._call()
        return self.inner.get(name)

    def names(self) -> list[str]:
        self._call()
        return self.inner.names()


def test_an_s3_outage_does_not_stop_the_folder_export_and_is_caught_up(
    seaweedfs: S3Endpoint,  # noqa: F811
    bucket: str,
    tmp_path: Path,
    trails: list[Trail],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("gateway.audit.EXPORT_RETRY_FIRST", 0.5)
    s3 = s3_export(seaweedfs, bucket)
    flaky = Flaky(s3)
    folder = FolderExport(tmp_path / "export")
    t = Trail(tmp_path, s3, export=ExportAll([folder, flaky]))
    trails.append(t)
    t.fill(5)
    with pytest.raises(OSError, match="simulated outage"):
        t.log.export_pending()
    assert checkpoint_name(5) in folder.names()
    t.fill(5)
    calls = flaky.calls
    assert t.log.export_pending() == 1  # the folder goes on; S3 waits for its retry time
    assert flaky.calls == calls and checkpoint_name(10) in folder.names()
    assert s3.names() == []

    flaky.down = False
    time.sleep(0.6)
    t.log.export_pending()
    assert s3.names() == folder.names()
    assert all(len(s3.versions(n)) == 1 for n in s3.names())
    assert t.verify(s3).ok


def test_bucket_without_object_lock_is_refused(seaweedfs: S3Endpoint) -> None:  # noqa: F811
    c = client(seaweedfs)
    plain = f"plain-{uuid.uuid4().hex[:12]}"
    c.make_bucket(plain)
    try:
        s3 = ObjectLockExport(seaweedfs.endpoint, seaweedfs.access_key, seaweedfs.secret_key, plain)
        with pytest.raises(ExportUnavailable, match=f"bucket '{plain}' has no object lock"):
            s3.check()
    finally:
        c.remove_bucket(plain)
    wrong = ObjectLockExport(seaweedfs.endpoint, seaweedfs.access_key, "wrong-secret", plain)
    with pytest.raises(ExportUnavailable, match=rf"^audit export s3 endpoint {seaweedfs.endpoint}: "):
        wrong.check()


# ---- configuration ---------------------------------------------------------------------------


def _frontend(audit_s3: dict[str, object]) -> dict[str, object]:
    s3 = {"endpoint": "127.0.0.1:9000", "bucket": "ybyx-audit", "access_key": "a", "secret_key": "s"}
    return {
        "role": "frontend",
        "institution": "H001",
        "dicom": {"allow_any_calling_ae": True},
        "audit": {"s3": s3 | audit_s3},
    }


def test_audit_s3_config_defaults_and_refusals() -> None:
    cfg = parse_config(_frontend({}))
    assert isinstance(cfg, FrontendConfig) and cfg.audit.s3 is not None
    assert (cfg.audit.s3.mode, cfg.audit.s3.retain_days, cfg.audit.s3.legal_hold) == (
        "COMPLIANCE",
        190,
        False,
    )
    assert cfg.audit.s3.retain_days >= 183  # R-SE-4: at least six months
    cases: list[tuple[dict[str, object], str]] = [
        ({"retain_days": 30}, "audit.s3.retain_days"),
        ({"mode": "LOOSE"}, "audit.s3.mode"),
        ({"retention": 200}, "audit.s3.retention: unknown key"),
    ]
    for bad, key in cases:
        with pytest.raises(ConfigError) as err:
            parse_config(_frontend(bad), "fe.toml")
        assert any(p.startswith(f"fe.toml: {key}") for p in err.value.problems), err.value.problems


# ---- ybyx audit verify against the locked copy --------------------------------------------------


def _rewrite_history(cfg: FrontendConfig) -> None:
    """Someone with the database, the export folder *and* the signing key changes record 7's actor,
    recomputes every later hash, re-signs the checkpoints and rewrites the folder copy to match."""
    key = load_signing_key(cfg.audit.signing_key)
    catalog = Catalog.open(cfg.database.url)
    try:
        engine = catalog.engine
        records = list(read_records(engine))
        prev = records[5].hash
        with engine.begin() as conn:
            for rec in records[6:]:
                fields = rec.as_dict()
                fields["prev_hash"] = prev
                if rec.seq == 7:
                    fields["actor"] = "mallory"
                fields["hash"] = prev = record_hash(fields)
                conn.execute(audit_log.update().where(audit_log.c.seq == rec.seq).values(fields))
        new = {r.seq: r for r in read_records(engine)}
        with engine.begin() as conn:
            for row in conn.execute(select(audit_checkpoints)).all():
                cp = Checkpoint.sign(key, int(row.seq), new[int(row.seq)].hash, row.time)
                conn.execute(
                    audit_checkpoints.update().where(audit_checkpoints.c.seq == cp.seq).values(**cp.as_dict())
                )
                path = cfg.audit.export_path / checkpoint_name(cp.seq)
                os.chmod(path, 0o644)
                path.write_bytes(cp.to_json())
        for path in cfg.audit.export_path.glob("segment-*.jsonl"):
            first, last = int(path.name[8:20]), int(path.name[21:33])
            lines = [canonical_json(new[s].as_dict()) + "\n" for s in range(first, last + 1)]
            os.chmod(path, 0o644)
            path.write_text("".join(lines), encoding="utf-8")
    finally:
        catalog.close()


def test_verify_against_the_locked_copy_catches_a_rewritten_local_copy(
    seaweedfs: S3Endpoint,  # noqa: F811
    bucket: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    prefix = f"cli{uuid.uuid4().hex[:8]}"
    config = tmp_path / "frontend.toml"
    config.write_text(
        "\n".join(
            [
                'role = "frontend"',
                'institution = "H001"',
                "[dicom]",
                "allow_any_calling_ae = true",
                "[database]",
                'url = "sqlite:///catalog.db"',
                "[audit]",
                "checkpoint_every_records = 5",
                "[audit.s3]",
                f'endpoint = "{seaweedfs.endpoint}"',
                f'bucket = "{bucket}"',
                f'access_key = "{seaweedfs.access_key}"',
                f'secret_key = "{seaweedfs.secret_key}"',
                "secure = false",
                f'prefix = "{prefix}"',
                "retain_days = 183",
            ]
        ),
        encoding="utf-8",
    )
    cfg = load_config(config)
    assert isinstance(cfg, FrontendConfig)
    catalog = Catalog.open(cfg.database.url)
    try:
        log = AuditLog.open(cfg.audit, catalog, system=system_actor(cfg))  # folder + S3 from config
        for i in range(12):
            log.record_as(DOCTOR, EventType.RETRIEVAL, resource=f"study:9.{i}", result=Result.SUCCESS)
        log.seal()
    finally:
        catalog.close()
    assert cfg.audit.s3 is not None
    s3 = ObjectLockExport.from_config(cfg.audit.s3)
    assert s3.retention(checkpoint_name(12))[0] == COMPLIANCE
    assert set(s3.names()) == set(FolderExport(cfg.audit.export_path).names())
    assert main(["audit", "verify", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "12 records" in out and "against the object-locked copy s3://" in out

    _rewrite_history(cfg)
    # the database and the folder agree with each other and with the re-signed checkpoints...
    assert main(["audit", "verify", "-c", str(config), "--against-export", "folder"]) == 0
    capsys.readouterr()
    # ...but not with the copy nobody could rewrite
    assert main(["audit", "verify", "-c", str(config), "--against-export", "s3"]) == 1
    err = capsys.readouterr().err
    assert "seq 7: edited: it differs from its exported copy" in err
    assert "against the object-locked copy" in err
    assert main(["audit", "verify", "-c", str(config)]) == 1  # every configured copy: the S3 one fails
