"""Where QC results live: the queue, one result per instance, and the other node's reports.

R-QC-1, R-CE-5. Tables ``qc_queue``, ``qc_results``, ``qc_reports`` (``gateway/archive/schema``).
An instance is queued in the transaction that stores it (:meth:`QcBook.enqueue`, a catalog write
hook) and leaves the queue in the transaction that stores its result, so nothing is graded twice
by design and nothing is missed after a crash. A *reject* is an open failure until a passing
instance replaces it: a new SOP Instance UID at the same position (same series, same instance
number), or a re-sent series (another series of the study with the same modality and series
number), or new bytes for the same SOP Instance UID that pass. A slice graded by its header only
(its series is sampled, ``gateway/qc/sampling.py``) releases nothing: :meth:`QcBook.queue_samples`
queues the series' sample — which includes every position holding a reject — for the full
measures, and those results release.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, bindparam, delete, func, or_, select, update

from gateway.archive.catalog import AddOutcome, Catalog
from gateway.archive.record import InstanceRecord
from gateway.archive.schema import instances, qc_queue, qc_reports, qc_results, series, studies
from gateway.qc.dicom_json import StoredQc
from gateway.qc.result import SKIPPED, Grade, QcResult, StudyQc
from gateway.qc.sampling import SERIES_SAMPLE, sample

Clock = Callable[[], datetime]
LEASE = timedelta(minutes=5)  # a claimed row is taken again after this (a worker that died)
MAX_BACKOFF = timedelta(minutes=30)
_IDENTITY = re.compile(r'"identity":\s*"([0-9a-f]*)"')  # in the stored QcResult JSON
_SKIPPED = f'%"pixels": "{SKIPPED}"%'  # LIKE pattern: a result graded by its header only


def utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


class QcBook:
    """The QC tables of one catalog."""

    def __init__(
        self, catalog: Catalog, *, clock: Clock = utcnow, series_sample: int = SERIES_SAMPLE
    ) -> None:
        self.catalog = catalog
        self.clock = clock
        self.series_sample = series_sample  # [series_sample] of config/qc.toml

    # ---- the queue ---------------------------------------------------------------------------

    def install(self) -> None:
        """Queue every instance stored from now on (call before ingest starts)."""
        self.catalog.write_hooks.append(self.enqueue)

    def enqueue(self, conn: Connection, rec: InstanceRecord, outcome: AddOutcome) -> None:
        """Catalog write hook: queue a newly stored instance (or new bytes) in its own transaction."""
        now = self.clock()
        # statements built once: this runs in every stored instance's transaction (C-STORE path)
        conn.execute(_UNQUEUE, {"sop": rec.sop_uid})
        _queue(conn, [(rec.sop_uid, rec.study_uid)], now)

    def backfill(self) -> int:
        """Queue instances stored while QC was off (no result for their current version) and take
        back rows a dead run had claimed; returns how many were queued."""
        now = self.clock()
        ungraded = (
            select(instances.c.sop_uid, studies.c.study_uid)
            .select_from(
                instances.join(series, series.c.id == instances.c.series_pk)
                .join(studies, studies.c.id == series.c.study_pk)
                .outerjoin(qc_results, qc_results.c.sop_uid == instances.c.sop_uid)
                .outerjoin(qc_queue, qc_queue.c.sop_uid == instances.c.sop_uid)
            )
            .where(
                qc_queue.c.id.is_(None),
                or_(qc_results.c.id.is_(None), qc_results.c.version != instances.c.version),
            )
        )
        with self.catalog.write() as conn:
            conn.execute(update(qc_queue).values(next_attempt_at=now))
            rows = conn.execute(ungraded).all()
            _queue(conn, [(r.sop_uid, r.study_uid) for r in rows], now)
        return len(rows)

    def claim(self, *, limit: int = 8, study_uid: str | None = None) -> list[dict[str, Any]]:
        """Due queue rows (or all of one study's), leased to the caller: id, sop_uid, version,
        blob_key, sha256, and ``measure`` — these bytes were graded by their header only and the
        row was queued again for the series' sample (:meth:`queue_samples`); rows whose instance is
        gone are dropped."""
        now = self.clock()
        stmt = (
            select(
                qc_queue.c.id,
                qc_queue.c.sop_uid,
                qc_queue.c.next_attempt_at,
                instances.c.version,
                instances.c.blob_key,
                instances.c.sha256,
                qc_results.c.version.label("graded_version"),
                qc_results.c.result.like(_SKIPPED).label("skipped"),
            )
            .select_from(
                qc_queue.outerjoin(instances, instances.c.sop_uid == qc_queue.c.sop_uid).outerjoin(
                    qc_results, qc_results.c.sop_uid == qc_queue.c.sop_uid
                )
            )
            .order_by(qc_queue.c.next_attempt_at, qc_queue.c.id)
            .limit(limit)
        )
        stmt = (
            stmt.where(qc_queue.c.study_uid == study_uid)
            if study_uid
            else stmt.where(qc_queue.c.next_attempt_at <= now)
        )
        taken: list[dict[str, Any]] = []
        with self.catalog.write() as conn:
            for r in conn.execute(stmt).all():
                if r.version is None:
                    conn.execute(delete(qc_queue).where(qc_queue.c.id == r.id))
                    continue
                got = conn.execute(
                    update(qc_queue)
                    .where(qc_queue.c.id == r.id, qc_queue.c.next_attempt_at == r.next_attempt_at)
                    .values(next_attempt_at=now + LEASE)
                ).rowcount
                if got == 1:
                    taken.append(
                        {
                            "id": r.id,
                            "sop_uid": r.sop_uid,
                            "version": r.version,
                            "blob_key": r.blob_key,
                            "sha256": r.sha256,
                            "measure": bool(r.skipped) and r.graded_version == r.version,
                        }
                    )
        return taken

    def queue_samples(self, study_uid: str) -> int:
        """Queue for the full pixel measures the slices of the study's sampled series that were
        graded by their header only and fall in the series' sample (``gateway/qc/sampling.py``):
        the first, last and evenly spaced positions, plus every position that holds an open
        reject (its replacement must be measured to release it). Call once every header is
        graded (the whole series is known); how many rows were queued."""
        with self.catalog.engine.connect() as conn:
            rows = conn.execute(
                select(
                    qc_results.c.sop_uid,
                    qc_results.c.series_uid,
                    qc_results.c.instance_number,
                    qc_results.c.grade,
                    qc_results.c.result.like(_SKIPPED).label("skipped"),
                ).where(qc_results.c.study_uid == study_uid, qc_results.c.replaced_by.is_(None))
            ).all()
        by_series: dict[str, list[Any]] = {}
        for r in rows:
            by_series.setdefault(r.series_uid, []).append(r)
        wanted: list[str] = []
        for members in by_series.values():
            if not any(r.skipped for r in members):
                continue
            positions = [r.instance_number for r in members if r.instance_number is not None]
            picked = sample(positions, self.series_sample)
            picked |= {r.instance_number for r in members if r.grade == Grade.REJECT.code}
            wanted += [r.sop_uid for r in members if r.skipped and r.instance_number in picked]
        if not wanted:
            return 0
        now = self.clock()
        with self.catalog.write() as conn:
            queued = set(
                conn.execute(select(qc_queue.c.sop_uid).where(qc_queue.c.sop_uid.in_(wanted))).scalars()
            )
            new = [sop for sop in wanted if sop not in queued]
            _queue(conn, [(sop, study_uid) for sop in new], now)
        return len(new)

    def current(self, sop_uid: str) -> dict[str, Any] | None:
        """Where the instance's bytes are now: blob_key, sha256, version (None: gone)."""
        with self.catalog.engine.connect() as conn:
            r = conn.execute(
                select(instances.c.blob_key, instances.c.sha256, instances.c.version).where(
                    instances.c.sop_uid == sop_uid
                )
            ).first()
        return dict(r._mapping) if r is not None else None

    def failed(self, queue_id: int, error: str) -> None:
        """Grading raised: try again later (exponential backoff, capped)."""
        with self.catalog.write() as conn:
            attempts = conn.execute(select(qc_queue.c.attempts).where(qc_queue.c.id == queue_id)).scalar()
            if attempts is None:
                return
            delay = min(MAX_BACKOFF, timedelta(seconds=5 * 2**attempts))
            conn.execute(
                update(qc_queue)
                .where(qc_queue.c.id == queue_id)
                .values(attempts=attempts + 1, last_error=error[:2000], next_attempt_at=self.clock() + delay)
            )

    def queued(self, study_uid: str) -> int:
        """The study's instances still in the queue."""
        with self.catalog.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).select_from(qc_queue).where(qc_queue.c.study_uid == study_uid)
                ).scalar_one()
            )

    def open_rejects(self) -> int:
        """Instances graded 废 that nothing has replaced yet (all studies)."""
        stmt = select(func.count()).where(
            qc_results.c.grade == Grade.REJECT.code, qc_results.c.replaced_by.is_(None)
        )
        with self.catalog.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def waiting(self) -> int:
        with self.catalog.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(qc_queue)).scalar_one())

    # ---- results -----------------------------------------------------------------------------

    def store(self, result: QcResult, *, version: int, queue_id: int | None = None) -> None:
        """Record one instance's result and take it off the queue, in one transaction; a passing
        result releases the rejects it replaces."""
        now = self.clock()
        with self.catalog.write() as conn:
            conn.execute(delete(qc_results).where(qc_results.c.sop_uid == result.sop_uid))
            conn.execute(
                qc_results.insert().values(
                    sop_uid=result.sop_uid,
                    version=version,
                    study_uid=result.study_uid,
                    series_uid=result.series_uid,
                    modality=result.modality[:16],
                    series_number=result.series_number,
                    instance_number=result.instance_number,
                    grade=result.grade.code,
                    result=json.dumps(result.to_json(), ensure_ascii=False),
                    engine_version=result.engine_version[:32],
                    ai_assisted=int(result.ai_assisted),
                    graded_at=now,
                    replaced_by=None,
                )
            )
            if queue_id is not None:
                conn.execute(delete(qc_queue).where(qc_queue.c.id == queue_id))
            if result.grade.passes and result.pixels != SKIPPED:  # header-only: not proof enough
                self._release(conn, result)

    def _release(self, conn: Connection, ok: QcResult) -> None:
        same_position = and_(
            qc_results.c.series_uid == ok.series_uid,
            qc_results.c.instance_number == ok.instance_number,
        )
        resent_series = and_(
            qc_results.c.series_uid != ok.series_uid,
            qc_results.c.series_number == ok.series_number,
            qc_results.c.modality == ok.modality[:16],
        )
        conn.execute(
            update(qc_results)
            .where(
                qc_results.c.study_uid == ok.study_uid,
                qc_results.c.grade == Grade.REJECT.code,
                qc_results.c.replaced_by.is_(None),
                qc_results.c.sop_uid != ok.sop_uid,
                or_(same_position, resent_series),
            )
            .values(replaced_by=ok.sop_uid)
        )

    def results(self, study_uid: str, *, replaced: bool = False) -> list[QcResult]:
        """The study's current results (rejects that were replaced only with ``replaced``)."""
        stmt = select(qc_results.c.result).where(qc_results.c.study_uid == study_uid)
        if not replaced:
            stmt = stmt.where(qc_results.c.replaced_by.is_(None))
        with self.catalog.engine.connect() as conn:
            rows = conn.execute(stmt.order_by(qc_results.c.series_number, qc_results.c.instance_number)).all()
        return [QcResult.from_json(json.loads(r.result)) for r in rows]

    def result(self, sop_uid: str) -> QcResult | None:
        with self.catalog.engine.connect() as conn:
            raw = conn.execute(select(qc_results.c.result).where(qc_results.c.sop_uid == sop_uid)).scalar()
        return QcResult.from_json(json.loads(raw)) if raw else None

    def study(self, study_uid: str) -> StudyQc | None:
        rs = self.results(study_uid)
        return StudyQc(study_uid, rs) if rs else None

    def blocks(self, study_uid: str) -> tuple[dict[str, StoredQc], Grade] | None:
        """The study's current results as stored, and the study grade, without parsing them (the
        WADO-RS metadata private block); the grade is the study's as :class:`StudyQc` says."""
        with self.catalog.engine.connect() as conn:
            rows = conn.execute(
                select(
                    qc_results.c.sop_uid, qc_results.c.grade, qc_results.c.result, qc_results.c.engine_version
                ).where(qc_results.c.study_uid == study_uid, qc_results.c.replaced_by.is_(None))
            ).all()
        if not rows:
            return None
        found = {r.sop_uid: StoredQc(Grade.of(r.grade), r.result, r.engine_version) for r in rows}
        identities = {m.group(1) for r in rows if (m := _IDENTITY.search(r.result)) and m.group(1)}
        grade = Grade.REJECT if len(identities) > 1 else Grade.worst(q.grade for q in found.values())
        return found, grade

    def ungraded(self, study_uid: str) -> int:
        """The study's instances without a result for their current bytes (QC still to run)."""
        stmt = (
            select(func.count())
            .select_from(
                instances.join(series, series.c.id == instances.c.series_pk)
                .join(studies, studies.c.id == series.c.study_pk)
                .outerjoin(qc_results, qc_results.c.sop_uid == instances.c.sop_uid)
            )
            .where(
                studies.c.study_uid == study_uid,
                or_(qc_results.c.id.is_(None), qc_results.c.version != instances.c.version),
            )
        )
        with self.catalog.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def rejects(self, study_uid: str) -> tuple[list[str], list[str]]:
        """(open rejects, replaced rejects) of a study, by SOP Instance UID."""
        with self.catalog.engine.connect() as conn:
            rows = conn.execute(
                select(qc_results.c.sop_uid, qc_results.c.replaced_by).where(
                    qc_results.c.study_uid == study_uid, qc_results.c.grade == Grade.REJECT.code
                )
            ).all()
        return [r.sop_uid for r in rows if r.replaced_by is None], [r.sop_uid for r in rows if r.replaced_by]

    def failures(
        self, *, study_uid: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[dict[str, Any]]:
        """Open rejects, newest first, with their reasons (``GET /api/v1/qc/failures``)."""
        stmt = select(qc_results).where(
            qc_results.c.grade == Grade.REJECT.code, qc_results.c.replaced_by.is_(None)
        )
        if study_uid:
            stmt = stmt.where(qc_results.c.study_uid == study_uid)
        stmt = (
            stmt.order_by(qc_results.c.graded_at.desc(), qc_results.c.id.desc()).limit(limit).offset(offset)
        )
        with self.catalog.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        out = []
        for r in rows:
            res = QcResult.from_json(json.loads(r.result))
            out.append(
                {
                    "study_uid": r.study_uid,
                    "series_uid": r.series_uid,
                    "sop_uid": r.sop_uid,
                    "modality": r.modality,
                    "series_number": r.series_number,
                    "instance_number": r.instance_number,
                    "grade": res.grade.value,
                    "grade_code": res.grade.code,
                    "reasons": res.reasons,
                    "dimensions": [d.to_json() for d in res.dimensions if d.grade is not Grade.A],
                    "graded_at": _iso(r.graded_at),
                    "engine_version": r.engine_version,
                }
            )
        return out

    # ---- the other node's reports ------------------------------------------------------------

    def save_report(self, study_uid: str, source: str, report: dict[str, Any]) -> None:
        grade = Grade.of(str(report.get("grade", "废")))
        with self.catalog.write() as conn:
            conn.execute(
                delete(qc_reports).where(qc_reports.c.study_uid == study_uid, qc_reports.c.source == source)
            )
            conn.execute(
                qc_reports.insert().values(
                    study_uid=study_uid,
                    source=source,
                    grade=grade.code,
                    report=json.dumps(report, ensure_ascii=False),
                    received_at=self.clock(),
                )
            )

    def report(self, study_uid: str, source: str) -> dict[str, Any] | None:
        with self.catalog.engine.connect() as conn:
            row = conn.execute(
                select(qc_reports.c.report, qc_reports.c.received_at).where(
                    qc_reports.c.study_uid == study_uid, qc_reports.c.source == source
                )
            ).first()
        if row is None:
            return None
        return {**json.loads(row.report), "received_at": _iso(row.received_at)}


_UNQUEUE = delete(qc_queue).where(qc_queue.c.sop_uid == bindparam("sop"))


def _queue(conn: Connection, items: list[tuple[str, str]], now: datetime) -> None:
    """Queue (SOP Instance UID, Study Instance UID) pairs for grading, in the caller's transaction."""
    if items:
        conn.execute(
            qc_queue.insert(),
            [
                {
                    "sop_uid": sop,
                    "study_uid": study,
                    "attempts": 0,
                    "next_attempt_at": now,
                    "last_error": "",
                    "enqueued_at": now,
                }
                for sop, study in items
            ],
        )
