"""Index records (索引记录) at the national index: which province holds which study of which
insured person (REQUIREMENTS §0 "exam basic information", with the person key instead of the ID
number, R-SE-8; R-CE-7 "ask the national index for the study's location").

Centers register each study once it is archived (and again after QC, which adds the grade);
registration is idempotent by Study Instance UID. Lookup is one SQL query on the
``(person_key, exam_date)`` index: by person (pseudonym or person management code), a date window
and optionally modality, body part and exam item.

The index's copies of the report text (``description``, ``diagnosis``) are sealed columns
(``gateway/security/columns.py``, R-SE-10) when the index's ``[encryption]`` is on: AES-256-GCM
under a column key wrapped by the index's KMS, bound to the record's Study Instance UID. The API
returns them in plain text to callers holding ``index:lookup``; what lookups match on stays plain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import select, update

from gateway.archive.catalog import Catalog
from gateway.archive.schema import index_records
from gateway.identity import PERSON_CODE, PERSON_KEY, IdType, IndexRecordKey, InvalidId, normalise_uscc
from gateway.security import columns

CST = timezone(timedelta(hours=8), "CST")
SEALED_FIELDS = ("description", "diagnosis")  # the report text: sealed at rest (R-SE-10)
UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"


class IndexRecordIn(BaseModel):
    """``POST /api/v1/index-records``: a study as a center registers it."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    study_uid: str = Field(max_length=64, pattern=UID_PATTERN)
    person_key: str = Field(pattern=r"^[0-9a-f]{64}$", description="HMAC pseudonym of the ID")
    record_key: str | None = Field(default=None, description="the national index record key, if known")
    id_type: IdType
    exam_time: datetime
    modality: str = Field(min_length=1, max_length=16)
    body_part: str = Field(min_length=1, max_length=64)
    exam_item_code: str = Field(min_length=1, max_length=64)
    exam_item_name: str = Field(min_length=1, max_length=200)
    insurance_item_code: str | None = Field(default=None, max_length=64)
    device: str = Field(default="", max_length=64)
    hospital_code: str = Field(min_length=1, max_length=64)
    hospital_level: str = Field(min_length=1, max_length=16)
    storing_unit: str | None = Field(default=None, description="unified social credit code")
    description: str = Field(default="", max_length=20000)
    diagnosis: str = Field(default="", max_length=20000)
    settlement_id: str | None = Field(default=None, max_length=64)
    qc_grade: str | None = Field(default=None, max_length=16)
    province: str = Field(pattern=r"^\d{2}$")
    center: str = Field(min_length=1, max_length=256, description="the holding center's node id")

    @field_validator("exam_time")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return (value if value.tzinfo else value.replace(tzinfo=CST)).astimezone(UTC)

    @model_validator(mode="after")
    def _keys(self) -> IndexRecordIn:
        if self.storing_unit is not None:
            try:
                self.storing_unit = normalise_uscc(self.storing_unit)
            except InvalidId as exc:
                raise ValueError(f"storing_unit: {exc}") from None
        if self.record_key is not None:
            try:
                self.record_key = str(IndexRecordKey.parse(self.record_key))
            except InvalidId as exc:
                raise ValueError(f"record_key: {exc}") from None
        return self

    @property
    def person_code(self) -> str | None:
        return self.record_key.split("-", 1)[0] if self.record_key else None


class Outcome(StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


class HeldElsewhere(Exception):
    """The study is registered by another province's center (a UID collision or a mistake)."""


@dataclass(frozen=True)
class Lookup:
    """A lookup: the person (pseudonym or person management code) and optional filters."""

    person: str
    since: date | None = None
    until: date | None = None
    modality: str | None = None
    body_part: str | None = None
    exam_item: str | None = None
    limit: int = 1000

    def __post_init__(self) -> None:
        if not (PERSON_KEY.match(self.person) or PERSON_CODE.match(self.person)):
            raise ValueError("person: a pseudonym (64 hex) or a person management code (26 digits)")
        if self.since and self.until and self.since > self.until:
            raise ValueError("from: after to")


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def exam_date(at: datetime) -> str:
    """The China-time calendar day of an exam (``YYYYMMDD``): what the 3-year window counts."""
    return at.astimezone(CST).strftime("%Y%m%d")


def sealed(catalog: Catalog, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with :data:`SEALED_FIELDS` sealed (unchanged when encryption is off)."""
    row = str(values["study_uid"])
    return values | {
        f: columns.seal(catalog, values[f], table="index_records", column=f, row=row)
        for f in SEALED_FIELDS
        if f in values
    }


def opened(catalog: Catalog, row: dict[str, Any]) -> dict[str, Any]:
    """A stored row with :data:`SEALED_FIELDS` opened (plain rows from before sealing pass)."""
    ident = str(row["study_uid"])
    return row | {
        f: columns.open_value(catalog, row[f], table="index_records", column=f, row=ident)
        for f in SEALED_FIELDS
    }


def as_json(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k != "id"}
    for k, v in out.items():
        if isinstance(v, datetime):
            out[k] = _aware(v).isoformat()
    return out


class IndexBook:
    """The index records in the index's database."""

    def __init__(
        self, catalog: Catalog, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self.catalog = catalog
        self.clock = clock

    def register(self, rec: IndexRecordIn) -> tuple[Outcome, dict[str, Any]]:
        """Insert or update by Study Instance UID; unchanged if nothing differs."""
        values = rec.model_dump()
        values["id_type"] = rec.id_type.value
        values["person_code"] = rec.person_code
        values["exam_date"] = exam_date(rec.exam_time)
        c = index_records.c
        stored = sealed(self.catalog, values)  # before the write transaction (may store the column key)
        with self.catalog.write() as conn:
            found = conn.execute(select(index_records).where(c.study_uid == rec.study_uid)).first()
            now = self.clock()
            if found is None:
                conn.execute(index_records.insert().values(**stored, registered_at=now, updated_at=now))
                outcome = Outcome.CREATED
            else:
                old = opened(self.catalog, dict(found._mapping))
                if old["province"] != rec.province:
                    raise HeldElsewhere(
                        f"study {rec.study_uid} is registered by province {old['province']}, "
                        f"not {rec.province}"
                    )
                old["exam_time"] = _aware(old["exam_time"])
                if all(old[k] == v for k, v in values.items()):
                    outcome = Outcome.UNCHANGED
                else:
                    conn.execute(
                        update(index_records).where(c.id == old["id"]).values(**stored, updated_at=now)
                    )
                    outcome = Outcome.UPDATED
            row = conn.execute(select(index_records).where(c.study_uid == rec.study_uid)).one()
        return outcome, as_json(opened(self.catalog, dict(row._mapping)))

    def lookup(self, q: Lookup) -> list[dict[str, Any]]:
        """One query: the person's records in the window (inclusive days), newest first."""
        c = index_records.c
        person = c.person_key if PERSON_KEY.match(q.person) else c.person_code
        stmt = select(index_records).where(person == q.person)
        if q.since:
            stmt = stmt.where(c.exam_date >= q.since.strftime("%Y%m%d"))
        if q.until:
            stmt = stmt.where(c.exam_date <= q.until.strftime("%Y%m%d"))
        if q.modality:
            stmt = stmt.where(c.modality == q.modality)
        if q.body_part:
            stmt = stmt.where(c.body_part == q.body_part)
        if q.exam_item:
            stmt = stmt.where((c.exam_item_code == q.exam_item) | (c.insurance_item_code == q.exam_item))
        stmt = stmt.order_by(c.exam_date.desc(), c.exam_time.desc()).limit(q.limit)
        with self.catalog.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(stmt)]
        return [as_json(opened(self.catalog, r)) for r in rows]

    def get(self, key: str) -> dict[str, Any] | None:
        """One record by Study Instance UID or by national index record key."""
        c = index_records.c
        if "-" in key or "\u2013" in key:
            try:
                where = c.record_key == str(IndexRecordKey.parse(key))
            except InvalidId as exc:
                raise ValueError(f"record key: {exc}") from None
        else:
            where = c.study_uid == key
        with self.catalog.engine.connect() as conn:
            row = conn.execute(select(index_records).where(where)).first()
        return as_json(opened(self.catalog, dict(row._mapping))) if row is not None else None
