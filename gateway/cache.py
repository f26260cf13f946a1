"""History caching (R-SC-3, R-CA-1..4, R-CE-6, R-CE-9, R-CE-11, R-SE-11) and the cross-province
fetch (R-CE-7).

* The HIS posts a **cache request** at registration, only with the patient's consent (R-CA-1/2);
  the front-end records it and pushes it to its center, which records it as a business record.
* The **center's job** runs on the next day (``[cache] run_at``, China time; the clock is
  injectable): index lookup of the 3-year window before the visit, WADO-RS fetch of every study
  held in another province from its center into this center's cache, task state ``pending`` →
  ``running`` → ``completed`` (已完成) / ``failed``. A failed round is retried ``retries`` (≥ 3)
  times with exponential backoff, then the request is ``failed`` and an alert is raised (audit
  anomaly + error log, R-CE-9); failed requests are tried again at the next daily run.
* The **front-end's job** pulls the patient's studies through its center (which fetches
  out-of-province ones) into its own cache, so the cache is complete one natural day before the
  visit (R-CA-3). The schedule rule (both roles, :func:`first_run`): a request runs at the next
  day's ``run_at``, unless that day is the visit day or later — a request registered less than a
  natural day before the visit runs at once (the job's next tick).
* **Retention**: a cache copy is kept at least 1 month + 1 day after the patient's latest visit at
  a center (R-CE-11: visit 2025-10-15 → until 2025-11-16) and 1 day at a front-end (R-CA-4), plus
  ``[cache] extend_days``; the cleanup deletes expired cache copies, never an archive original.
"""

from __future__ import annotations

import calendar
import logging
import shutil
import tempfile
import threading
import time as monotonic_time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import delete, func, select, update

from gateway.archive.blobstore import BlobStore
from gateway.archive.catalog import Catalog
from gateway.archive.schema import (
    cache_requests,
    cached_studies,
    exams,
    forward_jobs,
    instance_versions,
    instances,
    series,
    studies,
    upload_monitoring,
)
from gateway.federation import NO_CENTER, JsonPeer, PeerError, PeerNotConfigured, call, lookup
from gateway.identity import IdType, InvalidId, PseudonymKey, mask, normalise, person_key
from gateway.ingest import Refused

log = logging.getLogger(__name__)
CST = timezone(timedelta(hours=8), "CST")
Clock = Callable[[], datetime]
LABELS = {"pending": "待缓存", "running": "缓存中", "completed": "已完成", "failed": "失败"}


def _utc(value: datetime) -> datetime:
    return (value if value.tzinfo else value.replace(tzinfo=CST)).astimezone(UTC)


def _aware(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


# ---- requests ---------------------------------------------------------------------------------------


class CacheRequestIn(BaseModel):
    """``POST /api/v1/cache-requests`` on a front-end, from the HIS at registration (R-CA-2)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    name: str = Field(min_length=1, max_length=200)
    id_type: IdType
    id_number: str = Field(min_length=1, max_length=32)
    department: str = Field(min_length=1, max_length=64)
    visit_time: datetime
    consent: bool = Field(description="the patient clicked to consent to caching (R-CA-1)")

    @field_validator("visit_time")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        return _utc(value)

    @model_validator(mode="after")
    def _checked(self) -> CacheRequestIn:
        if self.consent is not True:
            raise ValueError("consent: the patient's consent to caching is required (R-CA-1)")
        try:
            self.id_number = normalise(self.id_type, self.id_number)
        except InvalidId as exc:
            raise ValueError(f"id_number: {exc}") from None
        return self


class CacheRequestForwarded(BaseModel):
    """What the center receives: the pseudonym and masked forms only (R-SE-8)."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(pattern=r"^[0-9a-f\-]{36}$")
    institution: str = Field(min_length=1, max_length=64)
    person_key: str = Field(pattern=r"^[0-9a-f]{64}$")
    id_type: IdType
    id_masked: str = Field(max_length=32)
    name_masked: str = Field(max_length=64)
    department: str = Field(min_length=1, max_length=64)
    visit_time: datetime
    consent_at: datetime

    @field_validator("visit_time", "consent_at")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        return _utc(value)


def mask_name(name: str) -> str:
    """张三丰 → 张**: enough for staff to recognise a record, not to identify a person."""
    return name[:1] + "*" * max(len(name) - 1, 1)


def visit_day(at: datetime) -> date:
    return at.astimezone(CST).date()


def next_run(after: datetime, run_at: str) -> datetime:
    """The job time (China time ``HH:MM``) on the calendar day after ``after``'s day."""
    hh, mm = (int(x) for x in run_at.split(":"))
    day = after.astimezone(CST).date() + timedelta(days=1)
    return datetime.combine(day, time(hh, mm), CST).astimezone(UTC)


def first_run(now: datetime, visit_time: datetime, run_at: str) -> datetime:
    """When a new request is first due (R-CA-3, R-CE-6): the daily job of the next day — unless
    that day is already the visit day (or later), i.e. the request came less than a natural day
    before the visit: then at once, so the cache is filled as early as it still can be (a
    registration on the 19th for a visit on the 20th runs on the 19th, not on the 20th)."""
    scheduled = next_run(now, run_at)
    if scheduled.astimezone(CST).date() >= visit_day(visit_time):
        return now
    return scheduled


def add_month(day: date) -> date:
    month = day.month % 12 + 1
    year = day.year + (day.month == 12)
    return date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def keep_until(visit: date, role: str, extend_days: int = 0) -> datetime:
    """End of the retention of a cache copy (start of that day, China time)."""
    last = add_month(visit) + timedelta(days=1) if role == "center" else visit + timedelta(days=1)
    end = last + timedelta(days=extend_days + 1)  # kept through the whole last day
    return datetime.combine(end, time(0, 0), CST).astimezone(UTC)


@dataclass(frozen=True)
class RetryPolicy:
    run_at: str = "01:00"
    retries: int = 3
    backoff_initial: timedelta = timedelta(seconds=60)
    backoff_max: timedelta = timedelta(hours=1)
    extend_days: int = 0


class CacheBook:
    """Cache requests in a node's catalog (both roles)."""

    def __init__(self, catalog: Catalog, policy: RetryPolicy, clock: Clock) -> None:
        self.catalog = catalog
        self.policy = policy
        self.clock = clock

    def record(self, values: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """Insert (idempotent by request_id); (new?, row). The job runs on the next day, or at
        once for a late request (:func:`first_run`)."""
        c = cache_requests.c
        now = self.clock()
        with self.catalog.write() as conn:
            found = conn.execute(select(cache_requests).where(c.request_id == values["request_id"])).first()
            if found is None:
                conn.execute(
                    cache_requests.insert().values(
                        **values,
                        visit_date=visit_day(values["visit_time"]).strftime("%Y%m%d"),
                        state="pending",
                        attempts=0,
                        next_attempt_at=first_run(now, values["visit_time"], self.policy.run_at),
                        last_error="",
                        studies_total=0,
                        studies_done=0,
                        created_at=now,
                        updated_at=now,
                    )
                )
            row = conn.execute(select(cache_requests).where(c.request_id == values["request_id"])).one()
        return found is None, public(dict(row._mapping))

    def search(self, state: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
        c = cache_requests.c
        stmt = select(cache_requests).order_by(c.id.desc()).limit(limit)
        if state:
            stmt = stmt.where(c.state == state)
        with self.catalog.engine.connect() as conn:
            return [public(dict(r._mapping)) for r in conn.execute(stmt)]

    def get(self, request_id: str) -> dict[str, Any] | None:
        with self.catalog.engine.connect() as conn:
            row = conn.execute(
                select(cache_requests).where(cache_requests.c.request_id == request_id)
            ).first()
        return public(dict(row._mapping)) if row is not None else None

    def due(self) -> list[dict[str, Any]]:
        c = cache_requests.c
        now = self.clock()
        stmt = (
            select(cache_requests)
            .where(c.state.in_(["pending", "failed"]), c.next_attempt_at <= now)
            .order_by(c.id)
        )
        with self.catalog.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    def unsent(self) -> list[dict[str, Any]]:
        with self.catalog.engine.connect() as conn:
            return [
                dict(r._mapping)
                for r in conn.execute(select(cache_requests).where(cache_requests.c.sent_at.is_(None)))
            ]

    def set(self, request_id: str, **values: Any) -> None:
        with self.catalog.write() as conn:
            conn.execute(
                update(cache_requests)
                .where(cache_requests.c.request_id == request_id)
                .values(**values, updated_at=self.clock())
            )

    def finish_round(self, row: dict[str, Any], error: str | None, total: int, done: int) -> str:
        """Record a round's outcome; the new state. Failures back off, then fail with an alert."""
        now = self.clock()
        if error is None:
            self.set(
                row["request_id"],
                state="completed",
                completed_at=now,
                last_error="",
                studies_total=total,
                studies_done=done,
            )
            return "completed"
        attempts = row["attempts"] + 1 if row["state"] != "failed" else 1
        if attempts <= self.policy.retries:
            delay = min(self.policy.backoff_initial * (2 ** (attempts - 1)), self.policy.backoff_max)
            self.set(
                row["request_id"],
                state="pending",
                attempts=attempts,
                next_attempt_at=now + delay,
                last_error=error[:2000],
                studies_total=total,
                studies_done=done,
            )
            return "pending"
        # R-CE-9: the retries are spent; alert, and re-cache at the next daily run
        self.set(
            row["request_id"],
            state="failed",
            attempts=attempts,
            next_attempt_at=next_run(now, self.policy.run_at),
            last_error=error[:2000],
            studies_total=total,
            studies_done=done,
        )
        return "failed"


def public(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k not in ("id",)}
    for k, v in out.items():
        if isinstance(v, datetime):
            out[k] = _aware(v).isoformat()  # type: ignore[union-attr]
    out["label"] = LABELS.get(str(out.get("state")), "")
    return out


# ---- the cache area ---------------------------------------------------------------------------------


@dataclass
class CacheArea:
    """Cache copies in a node's archive, known by ``cached_studies``; the cleanup deletes expired
    copies only, and refuses a study this node holds as an original (exam record, upload
    monitoring or forward job)."""

    catalog: Catalog
    store: BlobStore
    clock: Clock
    _fetching: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # A cache copy is not this node's upload: ``Catalog.queue_forward`` never queues a study marked
    # in ``cached_studies`` (ingest of a fetched instance, or a later rewrite such as lossless
    # compression), and a fetch marks the study before its first instance arrives (fetch_into).

    def discard(self, study_uid: str) -> None:
        """Remove what a failed fetch stored of a study this node did not hold before, and its
        cache mark."""
        keys: list[str] = []
        with self.catalog.write() as conn:
            if not self.is_original(conn, study_uid):
                keys = self._delete_study(conn, study_uid)
                conn.execute(delete(cached_studies).where(cached_studies.c.study_uid == study_uid))
        for key in keys:
            self.store.delete(key)

    def busy(self, study_uid: str) -> bool:
        """Whether a fetch of the study is under way here."""
        with self._lock:
            return study_uid in self._fetching

    @contextmanager
    def fetching(self, study_uid: str) -> Iterator[None]:
        with self._lock:
            self._fetching.add(study_uid)
        try:
            yield
        finally:
            with self._lock:
                self._fetching.discard(study_uid)

    def holds(self, study_uid: str) -> bool:
        with self.catalog.engine.connect() as conn:
            return (
                conn.execute(select(studies.c.id).where(studies.c.study_uid == study_uid)).first() is not None
            )

    def remember(self, study_uid: str, person: str, source: str, until: datetime) -> None:
        c = cached_studies.c
        with self.catalog.write() as conn:
            found = conn.execute(select(c.id, c.keep_until).where(c.study_uid == study_uid)).first()
            if found is None:
                conn.execute(
                    cached_studies.insert().values(
                        study_uid=study_uid,
                        person_key=person,
                        source=source,
                        cached_at=self.clock(),
                        keep_until=until,
                    )
                )
            elif (_aware(found.keep_until) or until) < until:  # a later visit extends it (R-CE-11)
                conn.execute(update(cached_studies).where(c.id == found.id).values(keep_until=until))

    def extend_for(self, person: str, until: datetime) -> None:
        """A new visit of the person: every copy of theirs is kept at least until ``until``."""
        c = cached_studies.c
        with self.catalog.write() as conn:
            conn.execute(
                update(cached_studies)
                .where(c.person_key == person, c.keep_until < until)
                .values(keep_until=until)
            )

    def is_original(self, conn: Any, study_uid: str) -> bool:
        for table in (exams, upload_monitoring, forward_jobs):
            if conn.execute(select(table.c.id).where(table.c.study_uid == study_uid).limit(1)).first():
                return True
        return False

    def unqueue(self) -> int:
        """Drop forward jobs of cache copies queued outside ingest (a rewrite such as lossless
        compression queues the study again through ``Catalog.queue_forward``)."""
        with self.catalog.write() as conn:
            gone = conn.execute(
                delete(forward_jobs).where(forward_jobs.c.study_uid.in_(select(cached_studies.c.study_uid)))
            ).rowcount
        return int(gone or 0)

    def cleanup(self) -> list[str]:
        """Delete cache copies past their retention; the Study Instance UIDs deleted."""
        self.unqueue()
        now = self.clock()
        c = cached_studies.c
        with self.catalog.engine.connect() as conn:
            expired = list(conn.scalars(select(c.study_uid).where(c.keep_until < now)))
        deleted = []
        for study_uid in expired:
            keys: list[str] = []
            with self.catalog.write() as conn:
                if self.is_original(conn, study_uid):
                    log.warning(
                        "cache cleanup: %s is an archive original here; only the cache mark goes", study_uid
                    )
                else:
                    keys = self._delete_study(conn, study_uid)
                conn.execute(delete(cached_studies).where(c.study_uid == study_uid))
            for key in keys:
                self.store.delete(key)
            deleted.append(study_uid)
        return deleted

    @staticmethod
    def _delete_study(conn: Any, study_uid: str) -> list[str]:
        study_pk = conn.execute(select(studies.c.id).where(studies.c.study_uid == study_uid)).scalar()
        if study_pk is None:
            return []
        series_pks = list(conn.scalars(select(series.c.id).where(series.c.study_pk == study_pk)))
        rows = conn.execute(
            select(instances.c.sop_uid, instances.c.blob_key).where(instances.c.series_pk.in_(series_pks))
        ).all()
        sops = [r.sop_uid for r in rows]
        keys = {r.blob_key for r in rows}
        keys |= set(
            conn.scalars(select(instance_versions.c.blob_key).where(instance_versions.c.sop_uid.in_(sops)))
        )
        conn.execute(delete(instance_versions).where(instance_versions.c.sop_uid.in_(sops)))
        conn.execute(delete(instances).where(instances.c.series_pk.in_(series_pks)))
        conn.execute(delete(series).where(series.c.study_pk == study_pk))
        conn.execute(delete(studies).where(studies.c.id == study_pk))
        # content-addressed blobs: keep any another instance still points at
        still = set(conn.scalars(select(instances.c.blob_key).where(instances.c.blob_key.in_(keys))))
        still |= set(
            conn.scalars(select(instance_versions.c.blob_key).where(instance_versions.c.blob_key.in_(keys)))
        )
        return sorted(keys - still)


# ---- fetching a study from another node -----------------------------------------------------------


def fetch_into(
    area: CacheArea,
    ingest: Any,
    source: Any,
    study_uid: str,
    spool: Path,
    *,
    who: str,
    keep: tuple[str, str, datetime],
    first: threading.Event | None = None,
) -> int:
    """WADO-RS retrieve of a whole study from ``source`` into the local archive as a cache copy;
    the instances stored."""
    spool.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="fetch-", dir=spool))
    held_before = area.holds(study_uid)
    try:
        with area.fetching(study_uid):
            try:
                if not held_before:
                    # marked before the first instance: never forwarded, never taken for this
                    # node's own study (shown to a user only through a patient's grant, R-RT-4)
                    area.remember(study_uid, *keep)
                stored = _fetch(ingest, source, study_uid, folder, who, first)
                area.remember(study_uid, *keep)
                return stored
            except (PeerError, httpx.HTTPError):
                if not held_before:
                    area.discard(study_uid)  # no half study left behind to be taken as cached
                raise
    except httpx.HTTPError as exc:
        raise PeerError(f"WADO-RS retrieve of {study_uid} from {who}: {exc}") from exc
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _fetch(
    ingest: Any, source: Any, study_uid: str, folder: Path, who: str, first: threading.Event | None
) -> int:
    """Each instance is stored as soon as its part has arrived (the first is servable while the
    rest of the study is still on the wire); ``first`` is set then."""
    stored = 0

    def store(path: Path) -> None:
        nonlocal stored
        result = ingest.accept_file(path, source=who)
        if isinstance(result, Refused):
            raise PeerError(f"an instance of {study_uid} from {who} was refused: {result.reason}")
        path.unlink(missing_ok=True)
        stored += 1
        if first is not None:
            first.set()

    files = source.retrieve(folder, study_uid, on_part=store)
    if not files:
        raise PeerError(f"{who} returned no instances of {study_uid}")
    return stored


@dataclass
class CenterFetcher:
    """R-CE-7 at a center: a study from the archive or cache, else located through the index and
    fetched by WADO-RS from the holding center (as this center's client there), a copy kept."""

    area: CacheArea
    ingest: Any
    index: JsonPeer
    province: str
    peers: Callable[[str, str], Any]  # (province, center_url) → a client of that center
    spool: Path
    policy: RetryPolicy = field(default_factory=RetryPolicy)

    def fetch(
        self,
        study_uid: str,
        *,
        visit: date | None = None,
        person: str | None = None,
        wait: str = "all",
    ) -> dict[str, Any]:
        """Hold the study here; ``wait="first"`` answers once its first instance is stored (the
        rest keeps arriving in the background: a viewer's first image need not wait for the
        whole study, R-PF-1)."""
        if self.area.busy(study_uid):
            if wait == "first":
                return {"study_uid": study_uid, "source": "fetching", "complete": False}
            deadline = monotonic_time.monotonic() + 600  # a whole study: wait for the fetch under way
            while self.area.busy(study_uid) and monotonic_time.monotonic() < deadline:
                monotonic_time.sleep(0.05)
        if self.area.holds(study_uid):
            return {"study_uid": study_uid, "source": "local"}
        rec = call(self.index, "GET", f"/api/v1/index-records/{study_uid}")
        if not isinstance(rec, dict) or not rec.get("center_url"):
            raise PeerError(f"the index knows no holder of {study_uid}")
        if rec["province"] == self.province:
            raise PeerError(f"{study_uid} is registered in this province but not held here")
        source = self.peers(rec["province"], rec["center_url"])
        day = visit or self.area.clock().astimezone(CST).date()
        keep = (
            person or rec["person_key"],
            f"province:{rec['province']}",
            keep_until(day, "center", self.policy.extend_days),
        )
        who = f"center:{rec['province']}"
        if wait == "first":
            return self._first(source, study_uid, who, keep)
        stored = fetch_into(self.area, self.ingest, source, study_uid, self.spool, who=who, keep=keep)
        return {"study_uid": study_uid, "source": f"province:{rec['province']}", "instances": stored}

    def _first(
        self, source: Any, study_uid: str, who: str, keep: tuple[str, str, datetime]
    ) -> dict[str, Any]:
        first = threading.Event()
        failed: list[str] = []

        def run() -> None:
            try:
                fetch_into(
                    self.area, self.ingest, source, study_uid, self.spool, who=who, keep=keep, first=first
                )
            except PeerError as exc:
                log.error("background fetch of %s failed: %s", study_uid, exc)
                failed.append(str(exc))
            finally:
                first.set()

        threading.Thread(target=run, name="fetch-rest", daemon=True).start()
        first.wait()
        if failed:
            raise PeerError(failed[0])
        return {"study_uid": study_uid, "source": who.replace("center:", "province:"), "complete": False}


class CacheJob:
    """The daily job of one node (center or front-end): due requests, one round each."""

    def __init__(
        self,
        book: CacheBook,
        area: CacheArea,
        *,
        role: str,
        round_: Callable[[dict[str, Any]], tuple[int, int, str | None]],
        alert: Callable[[dict[str, Any]], None] = lambda _row: None,
    ) -> None:
        self.book = book
        self.area = area
        self.role = role
        self.round = round_
        self.alert = alert
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> dict[str, str]:
        """Run every due request once (request id → new state), then the retention cleanup."""
        out = {}
        with self._lock:
            for row in self.book.due():
                self.book.set(row["request_id"], state="running")
                try:
                    total, done, error = self.round(row)
                except Exception as exc:  # one request's failure must not stop the others
                    log.exception("cache request %s", row["request_id"])
                    total, done, error = 0, 0, f"{type(exc).__name__}: {exc}"
                state = self.book.finish_round(row, error, total, done)
                if state == "failed":
                    log.error(
                        "cache request %s failed after %d retries: %s",
                        row["request_id"],
                        self.book.policy.retries,
                        error,
                    )
                    self.alert({**row, "last_error": error})
                out[row["request_id"]] = state
            self.area.cleanup()
        return out

    def start(self, tick: float = 30.0) -> None:
        def loop() -> None:
            while not self._stop.wait(tick):
                try:
                    self.run_once()
                except Exception:
                    log.exception("cache job round failed")

        self._thread = threading.Thread(target=loop, name=f"cache-job-{self.role}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


def center_round(
    fetcher: CenterFetcher, index: JsonPeer
) -> Callable[[dict[str, Any]], tuple[int, int, str | None]]:
    """The center's round for one request: the 3-year window, out-of-province studies fetched."""
    from gateway.workstation import history_window

    def run(row: dict[str, Any]) -> tuple[int, int, str | None]:
        visit = datetime.strptime(row["visit_date"], "%Y%m%d").date()
        since, until = history_window(visit)
        fetcher.area.extend_for(row["person_key"], keep_until(visit, "center", fetcher.policy.extend_days))
        records = lookup(
            index, {"person": row["person_key"], "from": since.isoformat(), "to": until.isoformat()}
        )
        wanted = [r for r in records if r["province"] != fetcher.province]
        done, errors = 0, []
        for r in wanted:
            try:
                fetcher.fetch(r["study_uid"], visit=visit, person=row["person_key"])
                done += 1
            except PeerError as exc:
                errors.append(str(exc))
        return len(wanted), done, "; ".join(errors)[:2000] or None

    return run


def frontend_round(
    area: CacheArea, ingest: Any, center: Any, spool: Path, extend_days: int, institution: str
) -> Callable[[dict[str, Any]], tuple[int, int, str | None]]:
    """The front-end's round: the patient's studies (in and out of province, R-SC-3) through its
    center (which fetches out-of-province ones and keeps a copy) into the local cache."""
    from gateway.workstation import history_window

    def run(row: dict[str, Any]) -> tuple[int, int, str | None]:
        visit = datetime.strptime(row["visit_date"], "%Y%m%d").date()
        since, until = history_window(visit)
        until_keep = keep_until(visit, "frontend", extend_days)
        area.extend_for(row["person_key"], until_keep)
        records = lookup(
            center, {"person": row["person_key"], "from": since.isoformat(), "to": until.isoformat()}
        )
        wanted = [r for r in records if r["hospital_code"] != institution]
        done, errors = 0, []
        for r in wanted:
            uid = r["study_uid"]
            try:
                if not area.holds(uid):
                    call(
                        center,
                        "POST",
                        "/api/v1/fetches",
                        body={"study_uid": uid, "person_key": row["person_key"], "visit": visit.isoformat()},
                    )
                    keep = (row["person_key"], "center", until_keep)
                    fetch_into(area, ingest, center, uid, spool, who="center", keep=keep)
                area.remember(uid, row["person_key"], "center", until_keep)
                done += 1
            except PeerError as exc:
                errors.append(str(exc))
        return len(wanted), done, "; ".join(errors)[:2000] or None

    return run


def new_request_id() -> str:
    return str(uuid.uuid4())


def pseudonymised(req: CacheRequestIn, key: PseudonymKey, institution: str, now: datetime) -> dict[str, Any]:
    """The front-end's record of a request: no ID number, no full name (R-SE-8)."""
    return {
        "request_id": new_request_id(),
        "institution": institution,
        "person_key": person_key(req.id_type, req.id_number, key),
        "id_type": req.id_type.value,
        "id_masked": mask(req.id_number),
        "name_masked": mask_name(req.name),
        "department": req.department,
        "visit_time": req.visit_time,
        "consent_at": now,
    }


def count_cached(catalog: Catalog) -> int:
    with catalog.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(cached_studies)).scalar() or 0)


# ---- a node's caching, assembled ---------------------------------------------------------------------


@dataclass
class CacheService:
    """The caching of one node: its requests, cache area, daily job and (center) fetcher."""

    role: str
    book: CacheBook
    area: CacheArea
    job: CacheJob
    fetcher: CenterFetcher | None = None
    center: Any = None  # a front-end's client of its center
    institution: str = ""
    ingest: Any = None
    spool: Path | None = None

    def pull_study(self, study_uid: str, person: str) -> str:
        """A front-end's study on demand (R-SC-4, R-CE-7): from its cache, else through its center
        (which fetches it from another province if needed), kept 1 day (+ extend); the source."""
        if self.area.holds(study_uid):
            return "local"
        if self.center is None or self.spool is None:
            raise PeerNotConfigured(NO_CENTER)
        call(self.center, "POST", "/api/v1/fetches", body={"study_uid": study_uid, "person_key": person})
        today = self.book.clock().astimezone(CST).date()
        keep = (person, "center", keep_until(today, "frontend", self.book.policy.extend_days))
        fetch_into(self.area, self.ingest, self.center, study_uid, self.spool, who="center", keep=keep)
        return "center"

    def push_unsent(self) -> int:
        """A front-end pushes its recorded requests to the center (R-CA-2); the number pushed."""
        if self.center is None:
            return 0
        pushed = 0
        for row in self.book.unsent():
            body = {
                k: (_aware(v).isoformat() if isinstance(v, datetime) else v)  # type: ignore[union-attr]
                for k, v in row.items()
                if k in CacheRequestForwarded.model_fields
            }
            try:
                call(self.center, "POST", "/api/v1/cache-requests", body=body)
            except PeerError as exc:
                log.warning("cache request %s not pushed yet: %s", row["request_id"], exc)
                break
            self.book.set(row["request_id"], sent_at=self.book.clock())
            pushed += 1
        return pushed

    def run_once(self) -> dict[str, str]:
        self.push_unsent()
        return self.job.run_once()

    def start(self, tick: float = 30.0) -> None:
        self.job.start(tick)

    def stop(self) -> None:
        self.job.stop()


def _policy(cfg: Any) -> RetryPolicy:
    return RetryPolicy(
        run_at=cfg.run_at,
        retries=cfg.retries,
        backoff_initial=timedelta(seconds=cfg.backoff_initial_seconds),
        backoff_max=timedelta(seconds=cfg.backoff_max_seconds),
        extend_days=cfg.extend_days,
    )


def _alert(audit: Any) -> Callable[[dict[str, Any]], None]:
    def alert(row: dict[str, Any]) -> None:
        if audit is None:
            return
        from gateway.audit import EventType, Result

        audit.record_as(
            audit.system,
            EventType.ANOMALY,
            resource=f"cache-request:{row['request_id']}",
            result=Result.FAILURE,
            detail={
                "alert": "caching failed after retries (R-CE-9)",
                "error": str(row.get("last_error", ""))[:500],
            },
        )

    return alert


def open_center_cache(
    cfg: Any,
    catalog: Catalog,
    store: BlobStore,
    ingest: Any,
    index: JsonPeer,
    peers: Callable[[str, str], Any],
    spool: Path,
    audit: Any,
    clock: Clock,
) -> CacheService:
    policy = _policy(cfg.cache)
    book = CacheBook(catalog, policy, clock)
    area = CacheArea(catalog, store, clock)
    fetcher = CenterFetcher(area, ingest, index, cfg.province, peers, spool, policy)
    job = CacheJob(book, area, role="center", round_=center_round(fetcher, index), alert=_alert(audit))
    return CacheService("center", book, area, job, fetcher=fetcher)


def open_frontend_cache(
    cfg: Any,
    catalog: Catalog,
    store: BlobStore,
    ingest: Any,
    center: Any,
    spool: Path,
    audit: Any,
    clock: Clock,
) -> CacheService:
    policy = _policy(cfg.cache)
    book = CacheBook(catalog, policy, clock)
    area = CacheArea(catalog, store, clock)
    round_ = frontend_round(area, ingest, center, spool, policy.extend_days, cfg.institution)
    job = CacheJob(book, area, role="frontend", round_=round_, alert=_alert(audit))
    return CacheService(
        "frontend", book, area, job, center=center, institution=cfg.institution, ingest=ingest, spool=spool
    )
