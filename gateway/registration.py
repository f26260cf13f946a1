"""A center registers its studies at the national index (issue 5 §2, R-CE-7).

A study is registered once it is archived: the exam record (with the person key) has arrived and
the front-end's manifest showed every instance held (upload monitoring ``complete``, R-CE-9). Both
events call :meth:`IndexRegistrar.study_ready`; whichever comes second finds the study complete
and queues it in ``index_registrations`` (a table: a restart loses nothing). A background thread
sends queued studies, retrying with backoff while the index is unreachable.

QC (gateway/qc/, issue 4) calls :meth:`IndexRegistrar.study_ready` again once a study is graded
and sets :attr:`IndexRegistrar.qc_grade` to its lookup, so the index learns the grade (R-RT-2
"same exams whose quality qualifies"); registration is an idempotent upsert at the index.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from gateway.archive.catalog import Catalog
from gateway.archive.schema import exams, index_registrations, series, studies, upload_monitoring
from gateway.exams import open_exam
from gateway.federation import JsonPeer, PeerError, call
from gateway.identity import InvalidId, normalise_uscc

log = logging.getLogger(__name__)
Clock = Callable[[], datetime]


def _aware(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


@dataclass(frozen=True)
class RegistrationPolicy:
    retry_initial: timedelta = timedelta(seconds=10)
    retry_max: timedelta = timedelta(hours=1)


class IndexRegistrar:
    """The center's outbox of index registrations and the thread that empties it."""

    def __init__(
        self,
        catalog: Catalog,
        index: JsonPeer,
        *,
        province: str,
        center: str,
        policy: RegistrationPolicy = RegistrationPolicy(),
        clock: Clock = lambda: datetime.now(UTC),
    ) -> None:
        self.catalog = catalog
        self.index = index
        self.province = province
        self.center = center
        self.policy = policy
        self.clock = clock
        self.qc_grade: Callable[[str], str | None] = lambda _study: None  # QC plugs in here
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the hook ------------------------------------------------------------------------------

    def study_ready(self, study_uid: str) -> bool:
        """Queue the study if its exam record and images are complete; True if queued."""
        with self.catalog.engine.connect() as conn:
            has_exam = conn.execute(select(exams.c.id).where(exams.c.study_uid == study_uid)).first()
            state = conn.execute(
                select(upload_monitoring.c.state).where(upload_monitoring.c.study_uid == study_uid)
            ).scalar()
        if has_exam is None or state != "complete":
            return False
        now = self.clock()
        r = index_registrations.c
        with self.catalog.write() as conn:
            found = conn.execute(select(r.id).where(r.study_uid == study_uid)).first()
            values = {"state": "pending", "next_attempt_at": now, "updated_at": now}
            if found is None:
                conn.execute(
                    index_registrations.insert().values(
                        study_uid=study_uid, attempts=0, last_error="", **values
                    )
                )
            else:
                conn.execute(update(index_registrations).where(r.id == found.id).values(**values))
        self._wake.set()
        return True

    # ---- sending --------------------------------------------------------------------------------

    def record_of(self, study_uid: str) -> dict[str, Any] | None:
        """The index record of a study from its exam record (REQUIREMENTS §0, person key only)."""
        with self.catalog.engine.connect() as conn:
            row = conn.execute(
                select(exams).where(exams.c.study_uid == study_uid).order_by(exams.c.updated_at.desc())
            ).first()
            modality = conn.execute(
                select(series.c.modality)
                .select_from(series.join(studies, studies.c.id == series.c.study_pk))
                .where(studies.c.study_uid == study_uid)
                .limit(1)
            ).scalar()
        if row is None:
            return None
        e = open_exam(self.catalog, dict(row._mapping))  # R-SE-10: sealed fields opened
        at = _aware(e["exam_time"]) or _aware(e["report_time"])
        assert at is not None
        try:
            storing_unit: str | None = normalise_uscc(e["hospital_code"])
        except InvalidId:
            storing_unit = None  # a hospital code that is not a credit code: the index keeps it as is
        return {
            "study_uid": study_uid,
            "person_key": e["person_key"],
            "id_type": e["id_type"],
            "exam_time": at.isoformat(),
            "modality": e["modality"] or modality or "OT",
            "body_part": e["body_part"],
            "exam_item_code": e["exam_item_code"],
            "exam_item_name": e["exam_item_name"],
            "device": e["device"],
            "hospital_code": e["hospital_code"],
            "hospital_level": e["hospital_level"],
            "storing_unit": storing_unit,
            "description": e["description"],
            "diagnosis": e["diagnosis"],
            "settlement_id": e["settlement_id"],
            "qc_grade": self.qc_grade(study_uid),
            "province": self.province,
            "center": self.center,
        }

    def run_once(self) -> int:
        """Send every due registration; the number registered."""
        now = self.clock()
        r = index_registrations.c
        with self.catalog.engine.connect() as conn:
            due = conn.execute(
                select(r.study_uid, r.attempts).where(r.state == "pending", r.next_attempt_at <= now)
            ).all()
        done = 0
        for study_uid, attempts in due:
            record = self.record_of(study_uid)
            error = ""
            if record is not None:
                try:
                    call(self.index, "POST", "/api/v1/index-records", body=record)
                except PeerError as exc:
                    error = str(exc)
            values: dict[str, Any] = {"attempts": attempts + 1, "updated_at": self.clock()}
            if error:
                delay = min(self.policy.retry_initial * (2**attempts), self.policy.retry_max)
                values |= {"last_error": error[:2000], "next_attempt_at": self.clock() + delay}
                log.warning(
                    "index registration of %s failed (attempt %d): %s", study_uid, attempts + 1, error
                )
            else:
                values |= {"state": "registered", "last_error": "", "registered_at": self.clock()}
                done += 1
            with self.catalog.write() as conn:
                conn.execute(update(index_registrations).where(r.study_uid == study_uid).values(**values))
        return done

    def state(self, study_uid: str) -> dict[str, Any] | None:
        with self.catalog.engine.connect() as conn:
            row = conn.execute(
                select(index_registrations).where(index_registrations.c.study_uid == study_uid)
            ).first()
        return dict(row._mapping) if row is not None else None

    # ---- the thread ----------------------------------------------------------------------------

    def start(self, tick: float = 5.0) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.run_once()
                except Exception:  # a bad row or a database hiccup must not end the thread
                    log.exception("index registration round failed")
                self._wake.wait(tick)
                self._wake.clear()

        self._thread = threading.Thread(target=loop, name="index-registrar", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
