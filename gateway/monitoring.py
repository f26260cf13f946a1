"""The center's upload monitoring (R-CE-9): is each study complete, valid and on time?

A front-end that has sent a study reports its manifest (SOP Instance UID → SHA-256). The center
compares it with what it holds, keeps one record per study — ``complete`` or ``incomplete``, and
``late`` when the study became complete after its images deadline (report time + 48 h, R-UP-3,
known from the exam record) — and answers with the record, so the front-end can re-send
(R-UP-4). The same record is readable later (``GET /api/v1/upload-monitoring/{study}``).

The record also lists the study's derived series (3D post-processing: MPR, VR, …; R-UP-2,
``gateway/derived.py``) and flags, in ``derived_without_source``, those whose source series is not
held: a reconstruction uploaded without the scan it was made from.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select

from gateway.archive.catalog import Catalog
from gateway.archive.schema import exams, upload_monitoring
from gateway.derived import derived_series
from gateway.exams import IMAGES_WITHIN


def _aware(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def _iso(value: datetime | None) -> str | None:
    aware = _aware(value)
    return aware.isoformat() if aware is not None else None


def check_manifest(
    catalog: Catalog,
    study_uid: str,
    manifest: Mapping[str, str],
    *,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> dict[str, Any]:
    """Compare a front-end's manifest with the archive and record the result."""
    now = clock()
    held = {i.sop_uid: i.sha256 for i in catalog.locate({"StudyInstanceUID": study_uid})}
    missing = sorted(sop for sop, sha in manifest.items() if held.get(sop) != sha)
    state = "complete" if not missing else "incomplete"
    with catalog.write() as conn:
        previous = conn.execute(
            select(upload_monitoring).where(upload_monitoring.c.study_uid == study_uid)
        ).first()
        completed_at = _aware(previous.completed_at) if previous is not None else None
        if state == "complete" and completed_at is None:
            completed_at = now
        report = conn.execute(
            select(func.min(exams.c.report_time)).where(exams.c.study_uid == study_uid)
        ).scalar()
        report_at = _aware(report)
        due = report_at + IMAGES_WITHIN if report_at is not None else None
        late = int(due is not None and (completed_at or now) > due)
        values = {
            "expected": len(manifest),
            "held": len(manifest) - len(missing),
            "state": state,
            "late": late,
            "missing": json.dumps(missing[:100]),
            "checked_at": now,
            "completed_at": completed_at,
        }
        if previous is None:
            conn.execute(upload_monitoring.insert().values(study_uid=study_uid, **values))
        else:
            conn.execute(
                upload_monitoring.update().where(upload_monitoring.c.id == previous.id).values(**values)
            )
    return monitoring_record(catalog, study_uid) or {}


def monitoring_record(catalog: Catalog, study_uid: str) -> dict[str, Any] | None:
    with catalog.engine.connect() as conn:
        row = conn.execute(
            select(upload_monitoring).where(upload_monitoring.c.study_uid == study_uid)
        ).first()
    if row is None:
        return None
    r = dict(row._mapping)
    derived = derived_series(catalog, study_uid)  # R-UP-2
    return {
        "study_uid": r["study_uid"],
        "state": r["state"],
        "late": bool(r["late"]),
        "expected": r["expected"],
        "held": r["held"],
        "missing": json.loads(r["missing"]),
        "checked_at": _iso(r["checked_at"]),
        "completed_at": _iso(r["completed_at"]),
        "derived_series": [d.as_json() for d in derived],
        "derived_without_source": [d.series_uid for d in derived if not d.source_held],
    }
