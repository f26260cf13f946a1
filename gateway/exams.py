"""Exam records (影像检查基础信息) and settlements from the RIS/HIS, and their upload deadlines.

R-UP-5: the upload interface carries the exam basic information of REQUIREMENTS §0 with the
images. R-UP-3: images within 48 h of the report, settlement data within 24 h of settlement; the
front-end tracks both (``deadlines``). The ID number is validated and replaced by its pseudonym at
the door (gateway/identity.py); the center receives only the pseudonym and a masked form.

Times without a zone are taken as China Standard Time (UTC+8), as hospital systems send them;
everything is stored in UTC.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import and_, select, update

from gateway.archive.catalog import Catalog
from gateway.archive.schema import exams, forward_jobs
from gateway.identity import IdType, InvalidId, PseudonymKey, mask, normalise, person_key
from gateway.security import columns

CST = timezone(timedelta(hours=8), "CST")
IMAGES_WITHIN = timedelta(hours=48)
SETTLEMENT_WITHIN = timedelta(hours=24)
UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
# Personal free text never matched in SQL: sealed when [encryption] is on (R-SE-10, issue 6 §5).
# Everything lookups match on (person_key, hospital/accession, study UID, codes, times) stays plain.
SEALED_FIELDS = ("patient_name", "id_masked", "description", "diagnosis")


def exam_row_id(row: Any) -> str:
    """The row identity a sealed exam field is bound to: its unique (hospital, accession)."""
    return f"{row['hospital_code']}/{row['accession_number']}"


def seal_exam(catalog: Catalog, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with :data:`SEALED_FIELDS` sealed (unchanged when encryption is off)."""
    row = exam_row_id(values)
    return values | {
        f: columns.seal(catalog, values[f], table="exams", column=f, row=row)
        for f in SEALED_FIELDS
        if f in values
    }


def open_exam(catalog: Catalog, row: dict[str, Any]) -> dict[str, Any]:
    """A stored exam row with its sealed fields opened (:class:`columns.ColumnSealError` when a
    field cannot be: KEK destroyed, or the value was copied from another row)."""
    ident = exam_row_id(row)
    return row | {
        f: columns.open_value(catalog, row[f], table="exams", column=f, row=ident)
        for f in SEALED_FIELDS
        if f in row and row[f] is not None
    }


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=CST)).astimezone(UTC)


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class ExamFields(_In):
    """The exam basic information both ends keep (everything but the raw ID number)."""

    hospital_code: str = Field(min_length=1, max_length=64, description="unified code of the hospital")
    hospital_level: str = Field(min_length=1, max_length=16, description="医院等级, e.g. 三级甲等")
    accession_number: str = Field(min_length=1, max_length=64)
    study_uid: str = Field(max_length=64, pattern=UID_PATTERN)
    id_type: IdType
    patient_name: str = Field(min_length=1, max_length=200)
    exam_item_code: str = Field(min_length=1, max_length=64, description="exam item (检查项目) code")
    exam_item_name: str = Field(min_length=1, max_length=200)
    body_part: str = Field(min_length=1, max_length=64)
    device: str = Field(default="", max_length=64, description="imaging device code")
    modality: str = Field(default="", max_length=16)
    description: str = Field(default="", max_length=20000, description="影像描述")
    diagnosis: str = Field(default="", max_length=20000, description="诊断结果")
    exam_time: datetime | None = None
    report_time: datetime
    visit_type: Literal["outpatient", "emergency", "inpatient"]

    @field_validator("exam_time", "report_time")
    @classmethod
    def _to_utc(cls, value: datetime | None) -> datetime | None:
        return _utc(value)


class ExamIn(ExamFields):
    """``POST /api/v1/exams`` on the front-end, from the RIS/HIS."""

    id_number: str = Field(min_length=1, max_length=32)

    @model_validator(mode="after")
    def _valid_id(self) -> ExamIn:
        try:
            self.id_number = normalise(self.id_type, self.id_number)
        except InvalidId as exc:
            raise ValueError(f"id_number: {exc}") from None
        return self


class ExamForwarded(ExamFields):
    """What the center receives: the pseudonym instead of the ID number."""

    person_key: str = Field(pattern=r"^[0-9a-f]{64}$")
    id_masked: str = Field(max_length=32)
    settlement_id: str | None = Field(default=None, max_length=64)
    settled_at: datetime | None = None


class SettlementIn(_In):
    """``POST /api/v1/settlements``: the settlement ID (结算ID) for an accession."""

    hospital_code: str = Field(min_length=1, max_length=64)
    accession_number: str = Field(min_length=1, max_length=64)
    settlement_id: str = Field(min_length=1, max_length=64)
    settled_at: datetime

    @field_validator("settled_at")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        out = _utc(value)
        assert out is not None
        return out


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands datetimes back without their zone; they were stored in UTC."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class ExamBook:
    """Exam records in the catalog database (front-end and center alike)."""

    def __init__(
        self, catalog: Catalog, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self.catalog = catalog
        self.clock = clock

    def record(self, exam: ExamIn | ExamForwarded, *, key: PseudonymKey | None = None) -> dict[str, Any]:
        """Upsert by (hospital, accession); a changed record is forwarded again."""
        now = self.clock()
        values = exam.model_dump(
            exclude={"id_number", "person_key", "id_masked", "settlement_id", "settled_at"}
        )
        if isinstance(exam, ExamIn):
            if key is None:
                raise RuntimeError("no pseudonym key configured")
            values |= {
                "person_key": person_key(exam.id_type, exam.id_number, key),
                "id_masked": mask(exam.id_number),
            }
        else:
            values |= {"person_key": exam.person_key, "id_masked": exam.id_masked}
            if exam.settlement_id:
                values |= {"settlement_id": exam.settlement_id, "settled_at": exam.settled_at}
        values["id_type"] = exam.id_type.value
        values = seal_exam(self.catalog, values)
        where = and_(
            exams.c.hospital_code == exam.hospital_code, exams.c.accession_number == exam.accession_number
        )
        with self.catalog.write() as conn:
            found = conn.execute(select(exams.c.id).where(where)).first()
            if found is None:
                conn.execute(exams.insert().values(**values, received_at=now, updated_at=now))
            else:
                conn.execute(
                    update(exams)
                    .where(exams.c.id == found.id)
                    .values(**values, updated_at=now, forwarded_at=None)
                )
            row = conn.execute(select(exams).where(where)).one()
        return open_exam(self.catalog, dict(row._mapping))

    def settle(self, s: SettlementIn) -> bool:
        """Attach a settlement to its exam; False if the accession is unknown."""
        with self.catalog.write() as conn:
            done = conn.execute(
                update(exams)
                .where(
                    exams.c.hospital_code == s.hospital_code, exams.c.accession_number == s.accession_number
                )
                .values(
                    settlement_id=s.settlement_id,
                    settled_at=s.settled_at,
                    updated_at=self.clock(),
                    settlement_forwarded_at=None,
                )
            ).rowcount
        return bool(done)

    # ---- forwarding the records themselves -----------------------------------------------

    def unforwarded(self, limit: int = 100) -> list[dict[str, Any]]:
        """Records (or settlements) the center has not taken yet."""
        stmt = (
            select(exams)
            .where(
                (exams.c.forwarded_at.is_(None))
                | (exams.c.settlement_id.is_not(None) & exams.c.settlement_forwarded_at.is_(None))
            )
            .order_by(exams.c.id)
            .limit(limit)
        )
        with self.catalog.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(stmt)]
        return [open_exam(self.catalog, r) for r in rows]

    def forwarded(self, exam_id: int, updated_at: datetime, *, at: datetime) -> None:
        """Mark a record forwarded, unless it changed since it was read."""
        with self.catalog.write() as conn:
            row = conn.execute(
                select(exams.c.updated_at, exams.c.settlement_id).where(exams.c.id == exam_id)
            ).one()
            if _aware(row.updated_at) != _aware(updated_at):
                return
            values: dict[str, Any] = {"forwarded_at": at}
            if row.settlement_id is not None:
                values["settlement_forwarded_at"] = at
            conn.execute(update(exams).where(exams.c.id == exam_id).values(**values))

    @staticmethod
    def as_forwarded(row: dict[str, Any]) -> dict[str, Any]:
        """The JSON body sent to the center for a stored record."""
        keys = set(ExamForwarded.model_fields)
        out = {k: v for k, v in row.items() if k in keys}
        for k, v in out.items():
            if isinstance(v, datetime):
                out[k] = _aware(v).isoformat()  # type: ignore[union-attr]
        return out

    # ---- deadlines (R-UP-3) ------------------------------------------------------------------

    def deadlines(self, *, state: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
        """Per exam: images due 48 h after the report, settlement due 24 h after settlement.

        Images count as uploaded when the center confirmed the study (forward job confirmed);
        a settlement when the center took it. Each deadline is ``met``, ``pending`` or
        ``overdue``; ``state`` filters exams having at least one deadline in that state.
        """
        now = self.clock()
        stmt = (
            select(exams, forward_jobs.c.confirmed_at)
            .select_from(exams.outerjoin(forward_jobs, forward_jobs.c.study_uid == exams.c.study_uid))
            .order_by(exams.c.report_time)
        )
        out = []
        with self.catalog.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(stmt)]
        for r in rows:
            report = _aware(r["report_time"])
            assert report is not None
            images = _deadline(report + IMAGES_WITHIN, _aware(r["confirmed_at"]), now)
            item = {
                "hospital_code": r["hospital_code"],
                "accession_number": r["accession_number"],
                "study_uid": r["study_uid"],
                "images": images,
                "settlement": None,
            }
            settled = _aware(r["settled_at"])
            if settled is not None:
                item["settlement"] = _deadline(
                    settled + SETTLEMENT_WITHIN, _aware(r["settlement_forwarded_at"]), now
                )
            states = {images["state"]} | ({item["settlement"]["state"]} if item["settlement"] else set())
            if state is None or state in states:
                out.append(item)
        return out[:limit]


def _deadline(due: datetime, done: datetime | None, now: datetime) -> dict[str, Any]:
    if done is not None:
        state = "met" if done <= due else "late"
        return {"due": due.isoformat(), "done": done.isoformat(), "state": state}
    return {"due": due.isoformat(), "done": None, "state": "overdue" if now > due else "pending"}
