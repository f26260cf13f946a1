"""Retrieval records (调阅记录): every retrieval, allowed or not, recorded where it happened and
sent up to the national index (R-RT-4, R-CE-4 "business records", R-SE-4).

The same table serves every role: a front-end records its doctors' retrievals and sends them to
its center, the center records its own and forwards both kinds to the index, and the index keeps
them all. ``record_id`` (a UUID made where the retrieval happened) makes every hop idempotent;
``sent_at`` is the per-hop outbox mark.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select, update

from gateway.archive.catalog import Catalog
from gateway.archive.schema import retrieval_records

CST = timezone(timedelta(hours=8), "CST")
UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
Action = Literal["history", "same-exams", "retrieve", "cache", "lookup"]


def _aware(value: datetime) -> datetime:
    """SQLite hands datetimes back without their zone; they were stored in UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class RetrievalRecord(BaseModel):
    """One retrieval, as recorded and as sent (``POST /api/v1/retrievals``)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    record_id: str = Field(default_factory=lambda: str(uuid.uuid4()), pattern=r"^[0-9a-f\-]{36}$")
    at: datetime
    person_key: str = Field(pattern=r"^[0-9a-f]{64}$")
    study_uid: str | None = Field(default=None, max_length=64, pattern=UID_PATTERN)
    institution: str = Field(min_length=1, max_length=64)
    doctor: str = Field(default="", max_length=64)
    action: Action
    result: Literal["allowed", "denied"]
    reason: str = Field(default="", max_length=2000)
    grant_id: str | None = Field(default=None, max_length=36)
    node: str = Field(min_length=1, max_length=256, description="the node where it happened")

    @field_validator("at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return (value if value.tzinfo else value.replace(tzinfo=CST)).astimezone(UTC)


class RetrievalLog:
    """The retrieval records of one node's catalog."""

    def __init__(
        self, catalog: Catalog, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self.catalog = catalog
        self.clock = clock

    def record(self, rec: RetrievalRecord) -> bool:
        """Store a record once (by ``record_id``); False if it was already here."""
        with self.catalog.write() as conn:
            found = conn.execute(
                select(retrieval_records.c.id).where(retrieval_records.c.record_id == rec.record_id)
            ).first()
            if found is not None:
                return False
            conn.execute(retrieval_records.insert().values(**rec.model_dump(), sent_at=None))
        return True

    def search(
        self,
        *,
        person_key: str | None = None,
        institution: str | None = None,
        result: str | None = None,
        since: date | None = None,
        until: date | None = None,
        limit: int = 500,
    ) -> list[dict[str, Any]]:
        """Records, newest first, filtered (dates are China-time days, inclusive)."""
        c = retrieval_records.c
        stmt = select(retrieval_records).order_by(c.at.desc(), c.id.desc()).limit(limit)
        if person_key:
            stmt = stmt.where(c.person_key == person_key)
        if institution:
            stmt = stmt.where(c.institution == institution)
        if result:
            stmt = stmt.where(c.result == result)
        if since:
            stmt = stmt.where(c.at >= datetime(since.year, since.month, since.day, tzinfo=CST))
        if until:
            end = until + timedelta(days=1)
            stmt = stmt.where(c.at < datetime(end.year, end.month, end.day, tzinfo=CST))
        with self.catalog.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(stmt)]
        return [_public(r) for r in rows]

    def unsent(self, limit: int = 200) -> list[RetrievalRecord]:
        c = retrieval_records.c
        stmt = select(retrieval_records).where(c.sent_at.is_(None)).order_by(c.id).limit(limit)
        with self.catalog.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(stmt)]
        out = []
        for r in rows:
            r.pop("id")
            r.pop("sent_at")
            r["at"] = _aware(r["at"])
            out.append(RetrievalRecord.model_validate(r))
        return out

    def mark_sent(self, record_ids: list[str]) -> None:
        if not record_ids:
            return
        with self.catalog.write() as conn:
            conn.execute(
                update(retrieval_records)
                .where(retrieval_records.c.record_id.in_(record_ids))
                .values(sent_at=self.clock())
            )


def _public(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    row.pop("id", None)
    for k in ("at", "sent_at"):
        if isinstance(row.get(k), datetime):
            row[k] = _aware(row[k]).isoformat()
    return row


def send_unsent(log: RetrievalLog, peer: Any) -> int:
    """Send this node's unsent retrieval records up one hop (front-end → center → index);
    the number sent. A peer that cannot take them now keeps them for the next round."""
    from gateway.federation import PeerError, call

    sent = []
    for rec in log.unsent():
        try:
            call(peer, "POST", "/api/v1/retrievals", body=rec.model_dump(mode="json"))
        except PeerError:
            break
        sent.append(rec.record_id)
    log.mark_sent(sent)
    return len(sent)


class RetrievalSender:
    """A thread sending this node's retrieval records up one hop, on a kick or every ``tick``."""

    def __init__(self, log: RetrievalLog, peer: Any, *, tick: float = 10.0) -> None:
        import threading

        self.log = log
        self.peer = peer
        self.tick = tick
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retrieval-sender", daemon=True)

    def kick(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        import logging

        while not self._stop.is_set():
            try:
                send_unsent(self.log, self.peer)
            except Exception:  # keep sending later; the records stay unsent in the table
                logging.getLogger(__name__).exception("sending retrieval records failed")
            self._wake.wait(self.tick)
            self._wake.clear()
