"""The doctor workstation's domain on a front-end (issue 5 §7): the patient's history at other
institutions (R-RT-1, R-RT-3, R-SC-4), same-exam reminders (R-RT-2, CQ), report citations (R-VW-3),
each behind the patient's authorization (R-RT-4) and recorded as a retrieval for the index.

The front-end asks its center, which asks the national index (``GET /api/v1/index-records``); the
answer carries report text and QC grade. ``cached`` says whether this front-end already holds the
study's images (its catalog has the study).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from gateway.archive.blobstore import BlobStore
from gateway.archive.catalog import Catalog
from gateway.archive.schema import citations, exams, studies
from gateway.cache import CacheService, open_frontend_cache
from gateway.clock import NodeClock
from gateway.codes import CodeMap
from gateway.federation import NO_CENTER, JsonPeer, PeerNotConfigured, lookup
from gateway.grants import GrantBook, GrantDenied, GrantDesk, GrantVerifier, RetrievalGrant, check_grant
from gateway.retrievals import RetrievalLog, RetrievalRecord, RetrievalSender

if TYPE_CHECKING:
    from gateway.config import FrontendConfig
    from gateway.node import NodeCore

log = logging.getLogger(__name__)
Clock = Callable[[], datetime]


def years_before(day: date, years: int) -> date:
    """The same calendar day ``years`` earlier (29 February → 28 February)."""
    try:
        return day.replace(year=day.year - years)
    except ValueError:
        return day.replace(year=day.year - years, day=28)


def history_window(visit: date, years: int = 3) -> tuple[date, date]:
    """R-SC-4: visit 2025-11-20 → studies from 2022-11-20 to 2025-11-20, both included."""
    return years_before(visit, years), visit


def same_exam_window(order_date: date, days: int = 30) -> tuple[date, date]:
    """R-RT-2: the last ``days`` days up to the order date, both included (30 days: in; 31: out)."""
    return order_date - timedelta(days=days), order_date


def _day(record: dict[str, Any]) -> date:
    return datetime.strptime(record["exam_date"], "%Y%m%d").date()


@dataclass
class Workstation:
    """What the doctor API of one front-end uses."""

    catalog: Catalog
    institution: str
    node: str
    grants: GrantBook
    verifiers: dict[str, GrantVerifier]
    retrievals: RetrievalLog
    codes: CodeMap
    center: JsonPeer | None
    history_years: int = 3
    same_exam_days: int = 30
    reject_grades: frozenset[str] = frozenset()
    clock: Clock = field(default=lambda: datetime.now(UTC))
    on_record: Callable[[], None] = field(default=lambda: None)  # wake the retrieval sender
    sender: RetrievalSender | None = None
    cache: CacheService | None = None  # history caching (gateway/cache.py)
    documents: BlobStore | None = None  # consent documents of grants (the node's blob store)

    def start(self) -> None:
        if self.sender is not None:
            self.sender.start()
        if self.cache is not None:
            self.cache.start()

    def stop(self) -> None:
        if self.cache is not None:
            self.cache.stop()
        if self.sender is not None:
            self.sender.stop()

    # ---- authorization ---------------------------------------------------------------------------

    @property
    def desk(self) -> GrantDesk:
        """Where evidence of a patient's authorization becomes a grant of this institution."""
        return GrantDesk(self.grants, self.verifiers, self.institution, self.documents)

    def accept_grant(
        self, method: str, evidence: str, *, person: str | None = None, document: bytes | None = None
    ) -> RetrievalGrant:
        """Verify evidence of a patient authorization with its method's verifier and keep it."""
        return self.desk.accept(method, evidence, person=person, document=document)

    def authorize(
        self,
        person_key: str,
        *,
        doctor: str,
        action: str,
        study_uid: str | None = None,
        study_date: date | None = None,
    ) -> RetrievalGrant:
        """The grant for this retrieval; either way the retrieval is recorded (R-RT-4).
        Raises :class:`GrantDenied` with the reason."""
        now = self.clock()
        try:
            grant = check_grant(
                self.grants.for_person(person_key),
                person_key=person_key,
                institution=self.institution,
                doctor=doctor or None,
                now=now,
                study_uid=study_uid,
                study_date=study_date,
            )
        except GrantDenied as denied:
            self._record(person_key, doctor, action, "denied", denied.reason, study_uid, None)
            raise
        self._record(person_key, doctor, action, "allowed", "", study_uid, grant.grant_id)
        return grant

    def _record(
        self,
        person_key: str,
        doctor: str,
        action: str,
        result: str,
        reason: str,
        study_uid: str | None,
        grant_id: str | None,
    ) -> None:
        rec = RetrievalRecord.model_validate(
            {
                "at": self.clock(),
                "person_key": person_key,
                "study_uid": study_uid,
                "institution": self.institution,
                "doctor": doctor[:64],
                "action": action,
                "result": result,
                "reason": reason,
                "grant_id": grant_id,
                "node": self.node,
            }
        )
        self.retrievals.record(rec)
        self.on_record()

    # ---- history and reminders -----------------------------------------------------------------

    def _lookup(self, person_key: str, since: date, until: date) -> list[dict[str, Any]]:
        if self.center is None:
            raise PeerNotConfigured(NO_CENTER)
        return lookup(self.center, {"person": person_key, "from": since.isoformat(), "to": until.isoformat()})

    def _cached(self, uids: list[str]) -> set[str]:
        if not uids:
            return set()
        with self.catalog.engine.connect() as conn:
            return set(conn.scalars(select(studies.c.study_uid).where(studies.c.study_uid.in_(uids))))

    def history(self, person_key: str, visit: date, grant: RetrievalGrant) -> dict[str, Any]:
        """Studies at other institutions in the window before the visit, within the grant's
        scope: report, QC grade, and whether the images are already here."""
        since, until = history_window(visit, self.history_years)
        rows = [
            r
            for r in self._lookup(person_key, since, until)
            if r["hospital_code"] != self.institution and grant.covers(r["study_uid"], _day(r))
        ]
        cached = self._cached([r["study_uid"] for r in rows])
        return {
            "person_key": person_key,
            "visit": visit.isoformat(),
            "from": since.isoformat(),
            "to": until.isoformat(),
            "studies": [
                {
                    "study_uid": r["study_uid"],
                    "exam_time": r["exam_time"],
                    "exam_date": _day(r).isoformat(),
                    "modality": r["modality"],
                    "body_part": r["body_part"],
                    "exam_item_code": r["exam_item_code"],
                    "exam_item_name": r["exam_item_name"],
                    "hospital_code": r["hospital_code"],
                    "hospital_level": r["hospital_level"],
                    "province": r["province"],
                    "report": {"description": r["description"], "diagnosis": r["diagnosis"]},
                    "qc_grade": r.get("qc_grade"),
                    "cached": r["study_uid"] in cached,
                }
                for r in rows
            ],
        }

    def insurance_code(self, order: str) -> str | None:
        return self.codes.insurance(self.institution, order)

    def unmapped_codes(self) -> list[dict[str, str]]:
        """R-CE-4: codes met in orders and index results, and those of this front-end's exam
        records, that have no insurance code (the map as edited now)."""
        with self.catalog.engine.connect() as conn:
            rows = conn.execute(select(exams.c.hospital_code, exams.c.exam_item_code).distinct())
            seen = {(str(h), str(c)) for h, c in rows}
        return self.codes.unmapped(seen)

    def same_exams(
        self, person_key: str, target: str, order_date: date, grant: RetrievalGrant
    ) -> dict[str, Any]:
        """Same exams (same insurance exam-item code) in the reminder period whose QC grade is
        not a reject grade; records whose codes have no mapping are listed, not guessed."""
        since, until = same_exam_window(order_date, self.same_exam_days)
        reminders, unmapped = [], []
        for r in self._lookup(person_key, since, until):
            if not grant.covers(r["study_uid"], _day(r)):
                continue
            code = r.get("insurance_item_code") or self.codes.insurance(
                r["hospital_code"], r["exam_item_code"]
            )
            if code is None:
                unmapped.append({"hospital": r["hospital_code"], "code": r["exam_item_code"]})
                continue
            if code != target or (r.get("qc_grade") or "") in self.reject_grades:
                continue
            reminders.append(
                {
                    "study_uid": r["study_uid"],
                    "exam_date": _day(r).isoformat(),
                    "days_ago": (order_date - _day(r)).days,
                    "hospital_code": r["hospital_code"],
                    "exam_item_name": r["exam_item_name"],
                    "modality": r["modality"],
                    "body_part": r["body_part"],
                    "qc_grade": r.get("qc_grade"),
                    "diagnosis": r["diagnosis"],
                }
            )
        return {
            "insurance_item_code": target,
            "from": since.isoformat(),
            "to": until.isoformat(),
            "same_exams": reminders,
            "unmapped": unmapped,
        }

    def study_record(self, person_key: str, study_uid: str) -> dict[str, Any] | None:
        """The index record of one of the person's studies (any age, R-RT-1), or None."""
        if self.center is None:
            raise PeerNotConfigured(NO_CENTER)
        rows = lookup(self.center, {"person": person_key})
        return next((r for r in rows if r["study_uid"] == study_uid), None)

    def retrieve(self, person_key: str, study_uid: str, record: dict[str, Any]) -> dict[str, Any]:
        """Make the study's images available here (cache, else through the center); R-CE-7."""
        if self.cache is None:
            raise PeerNotConfigured("caching is not configured on this front-end")
        source = self.cache.pull_study(study_uid, person_key)
        return {"study_uid": study_uid, "source": source, "exam_date": _day(record).isoformat()}

    # ---- citations (R-VW-3) ----------------------------------------------------------------------

    def cite(self, person_key: str, study_uid: str, section: str, text: str, doctor: str) -> dict[str, Any]:
        """Record a one-click copy of a report's findings or impression; its unique citation id."""
        citation_id = str(uuid.uuid4())
        now = self.clock()
        with self.catalog.write() as conn:
            conn.execute(
                citations.insert().values(
                    citation_id=citation_id,
                    person_key=person_key,
                    study_uid=study_uid,
                    section=section,
                    text_sha256=hashlib.sha256(text.encode()).hexdigest(),
                    institution=self.institution,
                    doctor=doctor,
                    created_at=now,
                )
            )
        return {
            "citation_id": citation_id,
            "study_uid": study_uid,
            "section": section,
            "created_at": now.isoformat(),
        }


def open_workstation(cfg: FrontendConfig, core: NodeCore, center: JsonPeer | None, node: str) -> Workstation:
    """The workstation of a front-end from its ``[doctor]`` and ``[grants]`` sections; retrieval
    records go to the center (``center``) by a :class:`RetrievalSender`, started with
    :meth:`Workstation.start`. A code map or key that cannot be read is an
    :class:`~gateway.archive.ArchiveUnavailable` naming the config key."""
    from gateway.archive import ArchiveUnavailable
    from gateway.codes import CodeMapError
    from gateway.grants import verifiers_from_config

    try:
        codes = CodeMap.load(cfg.doctor.codes_dir)
    except CodeMapError as exc:
        raise ArchiveUnavailable("doctor.codes_dir", str(exc)) from exc
    try:
        verifiers = verifiers_from_config(cfg.grants)
    except KeyError as exc:
        raise ArchiveUnavailable(*exc.args) from exc
    catalog = core.archive.catalog
    retrievals = RetrievalLog(catalog)
    sender = RetrievalSender(retrievals, center) if center is not None else None
    clock = NodeClock()
    cache = open_frontend_cache(
        cfg, catalog, core.archive.store, core.ingest, center, core.spool, core.audit, clock
    )
    return Workstation(
        catalog,
        cfg.institution,
        node,
        GrantBook(catalog, clock=clock),
        verifiers,
        retrievals,
        codes,
        center,
        history_years=cfg.doctor.history_years,
        same_exam_days=cfg.doctor.same_exam_days,
        reject_grades=frozenset(cfg.doctor.reject_grades),
        clock=clock,
        on_record=sender.kick if sender is not None else (lambda: None),
        sender=sender,
        cache=cache,
        documents=core.archive.store,
    )
