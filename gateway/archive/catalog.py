"""The catalog: patients, studies, series and instances in SQLite (embedded) or PostgreSQL.

One schema (``schema.py``), migrated by Alembic at open. Every write of an instance is one
transaction that upserts its patient, study and series and inserts (or versions) the instance, so
the catalog never holds half an instance. Reads are one statement per request (``query.py``).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    LargeBinary,
    bindparam,
    case,
    cast,
    create_engine,
    event,
    func,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from gateway.archive import query
from gateway.archive.query import Level
from gateway.archive.record import InstanceRecord, fold_name
from gateway.archive.schema import (
    cached_studies,
    forward_jobs,
    instance_versions,
    instances,
    patients,
    series,
    studies,
)

if TYPE_CHECKING:
    from gateway.security.columns import ColumnCipher

ConflictPolicy = Literal["keep-newest", "keep-first"]


# The statements run for every stored instance, built once (issue 2 "Numbers"): building one
# per call (``.values(**row)``, ``case(...)``) cost SQLAlchemy ~1 ms of CPU per instance in
# argument coercion and cache-key generation, more than SQLite's own work. Executed with a
# parameter dict, each is compiled once and then only bound.
_EXISTING = select(
    instances.c.id,
    instances.c.sha256,
    instances.c.version,
    instances.c.size,
    instances.c.blob_key,
    instances.c.received_at,
    instances.c.source_ae,
    instances.c.source_sha256,
).where(instances.c.sop_uid == bindparam("sop_uid"))
_INSERT_INSTANCE = instances.insert()
_TOUCH_STUDY = update(studies).where(studies.c.id == bindparam("pk")).values(updated_at=bindparam("now"))
_IS_CACHED_COPY = (
    select(cached_studies.c.id).where(cached_studies.c.study_uid == bindparam("study_uid")).limit(1)
)


def _queue_forward_stmt(ins: Any) -> Any:
    """Upsert of a study's forward job (see :meth:`Catalog._queue_forward`), for one dialect."""
    sending = forward_jobs.c.state == "sending"
    return ins.values(
        study_uid=bindparam("study_uid"),
        state="queued",
        attempts=0,
        next_attempt_at=bindparam("now"),
        last_error="",
        enqueued_at=bindparam("now"),
        updated_at=bindparam("now"),
    ).on_conflict_do_update(
        index_elements=[forward_jobs.c.study_uid],
        set_={
            "state": case((sending, "sending"), else_="queued"),
            "updated_at": bindparam("now"),
            "attempts": case((sending, forward_jobs.c.attempts), else_=0),
        },
    )


class AddOutcome(StrEnum):
    STORED = "stored"  # new instance
    DUPLICATE = "duplicate"  # same UID, same bytes: nothing changed
    REPLACED = "replaced"  # same UID, new bytes: the new ones are current, the old a version
    VERSION_KEPT = "version-kept"  # same UID, new bytes, policy keep-first: new kept as a version


@dataclass(frozen=True)
class StoredInstance:
    """Where an instance's bytes are and what they must hash to."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    size: int
    sha256: str
    blob_key: str


@dataclass(frozen=True)
class PixelRow:
    """One instance with what WADO-RS frames need to cut a frame without reading the header.

    ``pixel_offset`` is None when ingest did not record it (see ``schema.instances``); the other
    attributes are then unused.
    """

    instance: StoredInstance
    pixel_offset: int | None
    pixel_length: int | None  # None with an offset: undefined length (encapsulated)
    rows: int | None
    columns: int | None
    samples_per_pixel: int | None
    bits_allocated: int | None
    number_of_frames: int | None


_I = instances.c
_PIXEL_ROW = (
    select(
        _I.sop_class_uid,
        _I.transfer_syntax,
        _I.size,
        _I.sha256,
        _I.blob_key,
        _I.pixel_offset,
        _I.pixel_length,
        _I.rows,
        _I.columns,
        _I.samples_per_pixel,
        _I.bits_allocated,
        _I.number_of_frames,
    )
    .select_from(
        instances.join(series, series.c.id == _I.series_pk).join(studies, studies.c.id == series.c.study_pk)
    )
    .where(
        _I.sop_uid == bindparam("sop"),
        series.c.series_uid == bindparam("series"),
        studies.c.study_uid == bindparam("study"),
    )
)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (see _begin)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk when it returns — C-STORE success depends on it.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    # Writers take the lock up front; a deferred transaction that upgrades to a write lock gets
    # SQLITE_BUSY without waiting, which under parallel associations would fail stores.
    immediate = conn.get_execution_options().get("immediate", False)
    # Straight to the driver: through SQLAlchemy's statement execution this one line cost ~0.1 ms
    # of CPU (interpreter lock held) per transaction, one per stored instance.
    driver = conn.connection.driver_connection
    assert driver is not None
    driver.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_engine(url: str) -> Engine:
    """An engine for a catalog URL (``sqlite:///path`` or ``postgresql://…``)."""
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # A pooled connection stays open: closing SQLite's last connection checkpoints and deletes
        # the WAL on every write, costing several extra fsyncs per stored instance.
        engine = create_engine(url, pool_size=8, max_overflow=8, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        # SQLite: a batch migration rebuilds a table (copy, drop, rename); with foreign keys on,
        # dropping a table others reference fails ("FOREIGN KEY constraint failed"), so an
        # existing database could not be upgraded. The pragma only takes effect outside a
        # transaction (set on the DBAPI connection, before SQLAlchemy begins one); the whole
        # upgrade is then checked with foreign_key_check before it commits.
        if sqlite:
            conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
        try:
            with conn.begin():
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
                if sqlite:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"migration left rows with broken foreign keys: {broken[:5]}")
        finally:
            if sqlite:
                conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON")  # type: ignore[union-attr]


@dataclass(frozen=True)
class _KnownSeries:
    series_pk: int
    study_pk: int
    fingerprint: tuple[str, ...]
    touched: datetime


def _fingerprint(rec: InstanceRecord) -> tuple[str, ...]:
    """The patient/study/series values an instance would write; a change means: upsert again."""
    return (rec.study_uid, rec.patient_id, rec.issuer, rec.patient_name, rec.birth_date, rec.sex)


class _SeriesCache:
    """Primary keys of recently written series (rows are never re-keyed; thread-safe LRU)."""

    def __init__(self, size: int = 2048) -> None:
        self._items: OrderedDict[str, _KnownSeries] = OrderedDict()
        self._lock = threading.Lock()
        self._size = size

    def get(self, series_uid: str) -> _KnownSeries | None:
        with self._lock:
            return self._items.get(series_uid)

    def remember(self, series_uid: str, known: _KnownSeries) -> None:
        with self._lock:
            self._items[series_uid] = known
            self._items.move_to_end(series_uid)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


class Catalog:
    """The archive's index of what it holds."""

    def __init__(self, engine: Engine, *, outbox: bool = False) -> None:
        """``outbox``: also queue every changed study for forwarding, in the same transaction."""
        self.engine = engine
        self._is_sqlite = engine.dialect.name == "sqlite"
        # SQLite has one writer; serialising writers in-process avoids busy waits between threads.
        self._write_lock = threading.Lock() if self._is_sqlite else None
        self._writer: Connection | None = None  # SQLite: the one write connection (see write)
        self._writer_deferred = False  # its synchronous setting: NORMAL (deferred) or FULL
        database = engine.url.database if self._is_sqlite else None
        # the SQLite file's write-ahead log (absolute: the working folder may change)
        self._wal = f"{os.path.abspath(database)}-wal" if database and database != ":memory:" else None
        self._known_series = _SeriesCache()
        self.outbox = outbox
        self._pixel_sql: tuple[str, list[str] | None] | None = None  # see pixel_row
        # Run in the transaction of every instance stored with new bytes (e.g. the codec queue,
        # gateway/codec/stage.py): what must happen to a stored instance is recorded with it.
        self.write_hooks: list[Callable[[Connection, InstanceRecord, AddOutcome], None]] = []
        # Seals the sensitive columns (gateway/security/columns.py) when [encryption] is on.
        self.columns: ColumnCipher | None = None
        self._queue_stmt = _queue_forward_stmt(self._insert(forward_jobs))

    @classmethod
    def open(cls, url: str, *, migrate_schema: bool = True, outbox: bool = False) -> Catalog:
        engine = make_engine(url)
        if migrate_schema:
            migrate(engine)
        return cls(engine, outbox=outbox)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.engine.dispose()

    @property
    def can_defer(self) -> bool:
        """Whether :meth:`write` can commit without waiting for the disk (``deferred``): a SQLite
        file, whose commits :meth:`sync` then makes durable."""
        return self._wal is not None

    @contextmanager
    def write(self, *, deferred: bool = False) -> Iterator[Connection]:
        """A write transaction (SQLite: one writer at a time, lock taken up front).

        ``deferred`` (SQLite only, see :attr:`can_defer`): the commit is atomic and survives the
        process being killed, but reaches the disk only with the next :meth:`sync` or the next
        commit that is not deferred (SQLite's ``synchronous=NORMAL`` for this one transaction).
        The caller must keep its own durable record of what it committed until then (ingest's
        intake journal, :mod:`gateway.intake`). Elsewhere ignored: every commit is durable.
        """
        if self._write_lock is None:
            with self.engine.begin() as conn:
                yield conn
            return
        with self._write_lock:
            # One connection serves every SQLite write (they are serialised by the lock anyway):
            # checking one out of the pool per stored instance cost ~0.2 ms of CPU.
            writer = self._writer
            if writer is None or writer.closed or writer.invalidated:
                writer = self._writer = self.engine.connect().execution_options(immediate=True)
                self._writer_deferred = False
            if deferred != self._writer_deferred:
                # only outside a transaction ("Safety level may not be changed inside a
                # transaction"): on the DBAPI connection, before SQLAlchemy's BEGIN
                dbapi = writer.connection.dbapi_connection
                assert dbapi is not None
                dbapi.execute("PRAGMA synchronous=" + ("NORMAL" if deferred else "FULL"))
                self._writer_deferred = deferred
            try:
                with writer.begin():
                    yield writer
            except BaseException:
                self._writer = None  # rolled back; a fresh connection for the next writer
                writer.close()
                raise

    def sync(self) -> None:
        """Make every commit so far durable (the deferred ones of :meth:`write`).

        SQLite in WAL mode appends each commit to the ``-wal`` file; with ``synchronous=NORMAL``
        it is flushed only before a checkpoint. Flushing that file is what a ``FULL`` commit does
        itself. No ``-wal`` file: its frames were checkpointed into the database (flushed then)
        when the last connection closed. Nothing to do for PostgreSQL.
        """
        if self._wal is None:
            return
        try:
            fd = os.open(self._wal, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def _insert(self, table: Any) -> Any:
        dialect = sqlite if self._is_sqlite else postgresql
        return dialect.insert(table)

    def _upsert_pk(
        self,
        conn: Connection,
        table: Any,
        key: Mapping[str, Any],
        values: Mapping[str, Any],
        refresh: Mapping[str, Any],
    ) -> int:
        """Primary key of the row with ``key``, inserting it with ``values`` if absent.

        ``refresh`` holds attributes a newer instance may correct (e.g. a patient's name); they are
        updated when they differ and are not empty.
        """
        where = [table.c[k] == v for k, v in key.items()]
        row = conn.execute(select(table.c.id, *[table.c[k] for k in refresh]).where(*where)).first()
        if row is None:
            ins = self._insert(table).values(**key, **values).on_conflict_do_nothing()
            conn.execute(ins)
            row = conn.execute(select(table.c.id, *[table.c[k] for k in refresh]).where(*where)).one()
        changed = {k: v for k, v in refresh.items() if v and getattr(row, k) != v}
        if changed:
            conn.execute(update(table).where(table.c.id == row.id).values(**changed))
        return int(row.id)

    def add_instance(
        self,
        rec: InstanceRecord,
        policy: ConflictPolicy = "keep-newest",
        *,
        also: Callable[[Connection, AddOutcome], None] | None = None,
        deferred: bool = False,
    ) -> AddOutcome:
        """Catalogue an instance whose bytes are already durable in the blob store.

        ``also`` runs in the same transaction once the outcome is known (ingest's audit record,
        R-SE-4: the instance and its record commit together, for no extra commit). ``deferred``:
        see :meth:`write`.
        """
        for attempt in range(3):
            try:
                with self.write(deferred=deferred) as conn:
                    outcome, known = self._add(conn, rec, policy)
                    if also is not None:
                        also(conn, outcome)
                if known is not None:  # only after the commit: the rows surely exist now
                    self._known_series.remember(rec.series_uid, known)
                return outcome
            except IntegrityError:
                # Another association inserted the same patient/study/series/instance between our
                # read and write (PostgreSQL); the retry sees it.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _add(
        self, conn: Connection, rec: InstanceRecord, policy: ConflictPolicy
    ) -> tuple[AddOutcome, _KnownSeries | None]:
        now = datetime.now(UTC)
        existing = conn.execute(_EXISTING, {"sop_uid": rec.sop_uid}).first()
        # the received bytes of an instance stored compressed (gateway/codec) are a duplicate too
        if existing is not None and rec.sha256 in (existing.sha256, existing.source_sha256):
            return AddOutcome.DUPLICATE, None
        if existing is not None and policy == "keep-first":
            n = conn.execute(
                select(instance_versions.c.id).where(
                    instance_versions.c.sop_uid == rec.sop_uid, instance_versions.c.sha256 == rec.sha256
                )
            ).first()
            if n is None:
                conn.execute(
                    instance_versions.insert().values(
                        sop_uid=rec.sop_uid,
                        version=0,
                        size=rec.size,
                        sha256=rec.sha256,
                        blob_key=rec.blob_key,
                        received_at=rec.received_at,
                        source_ae=rec.source_ae,
                        superseded_at=now,
                    )
                )
            return AddOutcome.VERSION_KEPT, None

        known = self._known_series.get(rec.series_uid)
        if known is not None and known.fingerprint == _fingerprint(rec):
            # The second and later instances of a series: its patient, study and series rows are
            # there already and unchanged, so skip the three upserts (most of the SQL per instance).
            series_pk = known.series_pk
            if (now - known.touched).total_seconds() > 1:
                conn.execute(_TOUCH_STUDY, {"pk": known.study_pk, "now": now})
                known = _KnownSeries(series_pk, known.study_pk, known.fingerprint, now)
            return self._put_instance(conn, rec, existing, series_pk, now), known

        patient_pk = self._upsert_pk(
            conn,
            patients,
            {"patient_id": rec.patient_id, "issuer": rec.issuer},
            {
                "patient_name": rec.patient_name,
                "patient_name_folded": fold_name(rec.patient_name),
                "patient_name_fuzzy": query.fuzzy_name(rec.patient_name),
                "birth_date": rec.birth_date,
                "sex": rec.sex,
            },
            {
                "patient_name": rec.patient_name,
                "patient_name_folded": fold_name(rec.patient_name),
                "patient_name_fuzzy": query.fuzzy_name(rec.patient_name),
                "birth_date": rec.birth_date,
                "sex": rec.sex,
            },
        )
        study_vals = {
            "patient_pk": patient_pk,
            "study_date": rec.study_date,
            "study_time": rec.study_time,
            "accession_number": rec.accession_number,
            "study_id": rec.study_id,
            "referring_physician": rec.referring_physician,
            "referring_physician_fuzzy": query.fuzzy_name(rec.referring_physician),
            "study_description": rec.study_description,
            "institution_name": rec.institution_name,
        }
        study_pk = self._upsert_pk(
            conn,
            studies,
            {"study_uid": rec.study_uid},
            {**study_vals, "created_at": now, "updated_at": now},
            {},
        )
        conn.execute(update(studies).where(studies.c.id == study_pk).values(updated_at=now))
        series_pk = self._upsert_pk(
            conn,
            series,
            {"series_uid": rec.series_uid},
            {
                "study_pk": study_pk,
                "modality": rec.modality,
                "series_number": rec.series_number,
                "series_description": rec.series_description,
                "body_part": rec.body_part,
                "pps_start_date": rec.pps_start_date,
                "pps_start_time": rec.pps_start_time,
                "created_at": now,
            },
            {},
        )
        return self._put_instance(conn, rec, existing, series_pk, now), _KnownSeries(
            series_pk, study_pk, _fingerprint(rec), now
        )

    def _put_instance(
        self, conn: Connection, rec: InstanceRecord, existing: Any, series_pk: int, now: datetime
    ) -> AddOutcome:
        inst_vals = {
            "series_pk": series_pk,
            "sop_class_uid": rec.sop_class_uid,
            "instance_number": rec.instance_number,
            "transfer_syntax": rec.transfer_syntax,
            "rows": rec.rows,
            "columns": rec.columns,
            "bits_allocated": rec.bits_allocated,
            "number_of_frames": rec.number_of_frames,
            "size": rec.size,
            "sha256": rec.sha256,
            "blob_key": rec.blob_key,
            "received_at": rec.received_at,
            "source_ae": rec.source_ae,
            "metadata_json": rec.metadata_json,
            "pixel_offset": rec.pixel_offset,
            "pixel_length": rec.pixel_length,
            "samples_per_pixel": rec.samples_per_pixel,
            "source_sha256": None,
        }
        if existing is None:
            conn.execute(_INSERT_INSTANCE, {"sop_uid": rec.sop_uid, "version": 1, **inst_vals})
            self._queue_forward(conn, rec.study_uid, now)
            for hook in self.write_hooks:
                hook(conn, rec, AddOutcome.STORED)
            return AddOutcome.STORED
        conn.execute(
            instance_versions.insert().values(
                sop_uid=rec.sop_uid,
                version=existing.version,
                size=existing.size,
                sha256=existing.sha256,
                blob_key=existing.blob_key,
                received_at=existing.received_at,
                source_ae=existing.source_ae,
                superseded_at=now,
            )
        )
        conn.execute(
            update(instances)
            .where(instances.c.id == existing.id)
            .values(version=existing.version + 1, **inst_vals)
        )
        self._queue_forward(conn, rec.study_uid, now)
        for hook in self.write_hooks:
            hook(conn, rec, AddOutcome.REPLACED)
        return AddOutcome.REPLACED

    def queue_forward(self, conn: Connection, study_uid: str, now: datetime) -> None:
        """Queue ``study_uid`` for forwarding in ``conn``'s transaction (its stored bytes changed)."""
        self._queue_forward(conn, study_uid, now)

    def _queue_forward(self, conn: Connection, study_uid: str, now: datetime) -> None:
        """Queue the study for forwarding in the instance's own transaction (nothing slips through).

        A job being sent is left alone: the forwarder looks for unsent instances when it finishes.
        Finished jobs go back to ``queued``; ``next_attempt_at`` is pushed to now, and the
        forwarder waits for the study to settle (``forward.settle_seconds`` since the last change).

        A cache copy (``cached_studies``: another institution's study fetched here, R-CE-7) is
        never queued, whoever asks — ingest of a fetched instance, a rewrite such as lossless
        compression: a front-end must never send another province's study up as its own. The one
        place of that rule; a fetch marks the study before its first instance is stored.
        """
        if not self.outbox:
            return
        copy = conn.execute(_IS_CACHED_COPY, {"study_uid": study_uid}).first()
        if copy is not None:
            return
        conn.execute(self._queue_stmt, {"study_uid": study_uid, "now": now})

    # ---- reads -------------------------------------------------------------------------------

    def find(
        self,
        level: Level,
        criteria: Mapping[str, str],
        *,
        limit: int | None = None,
        offset: int = 0,
        fuzzy: bool = False,
        metadata: bool = False,
        parent_counts: bool = False,
        restrict: ColumnElement[bool] | None = None,
    ) -> list[dict[str, Any]]:
        """Rows matching ``criteria`` at ``level``, keyed by DICOM keyword (one SQL statement).

        ``fuzzy``: fuzzy person-name matching; ``metadata``: add ``_metadata_json`` (the DICOM JSON
        header of the instance, or of the first instance of the study or series);
        ``parent_counts``: add the enclosing levels' computed attributes; ``restrict``: only studies
        meeting this condition (who may see what, issue 6 §3); see :func:`query.build`.
        """
        stmt = query.build(
            level,
            criteria,
            limit=limit,
            offset=offset,
            fuzzy=fuzzy,
            metadata=metadata,
            parent_counts=parent_counts,
            restrict=restrict,
        )
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(stmt)]
        for row in rows:
            if "ModalitiesInStudy" in row:
                mods = (row["ModalitiesInStudy"] or "").split("\\")
                row["ModalitiesInStudy"] = sorted({m for m in mods if m})
        return rows

    def locate(self, criteria: Mapping[str, str]) -> list[StoredInstance]:
        """Every instance under the entities matching ``criteria`` (for C-MOVE, C-GET, WADO-RS)."""
        return [
            StoredInstance(
                r["StudyInstanceUID"],
                r["SeriesInstanceUID"],
                r["SOPInstanceUID"],
                r["SOPClassUID"],
                r["_transfer_syntax"],
                r["_size"],
                r["_sha256"],
                r["_blob_key"],
            )
            for r in self.find(Level.IMAGE, criteria)
        ]

    def pixel_row(self, study_uid: str, series_uid: str, sop_uid: str) -> PixelRow | None:
        """The instance named by its three UIDs with its pixel data location (one narrow query).

        WADO-RS frames run this per request, so it skips SQLAlchemy's per-statement work: the
        statement is compiled once for the dialect and run on a pooled DBAPI connection (about
        15 µs instead of 250 µs on SQLite). Read-only; one statement is its own snapshot.
        """
        if self._pixel_sql is None:
            compiled = _PIXEL_ROW.compile(dialect=self.engine.dialect)
            self._pixel_sql = (str(compiled), compiled.positiontup)
        sql, positions = self._pixel_sql
        values = {"study": study_uid, "series": series_uid, "sop": sop_uid}
        params: Any = tuple(values[name] for name in positions) if positions else values
        conn = self.engine.raw_connection()
        try:
            cur = conn.cursor()
            try:
                cur.execute(sql, params)
                r = cur.fetchone()
            finally:
                cur.close()
        finally:
            conn.close()
        if r is None:
            return None
        inst = StoredInstance(study_uid, series_uid, sop_uid, r[0], r[1], r[2], r[3], r[4])
        return PixelRow(inst, r[5], r[6], r[7], r[8], r[9], r[10], r[11])

    def metadata(self, criteria: Mapping[str, str]) -> list[bytes]:
        """The stored DICOM JSON of every instance matching ``criteria`` (WADO-RS ``/metadata``),
        as UTF-8 bytes.

        One statement, no file opened; ordered by series number, then instance number. Keys are
        :data:`query.ATTRIBUTES` names (typically the study/series/instance UIDs). The documents
        come back as bytes straight from the database (no decode to ``str`` and encode back):
        for a 2,000-instance series holding Chinese names that is ~4x less work than text.
        """
        conds = [cond for key, value in criteria.items() if (cond := query.match(key, value)) is not None]
        doc: Any = instances.c.metadata_json
        if self.engine.dialect.name == "postgresql":
            doc = func.convert_to(doc, literal_column("'UTF8'"), type_=LargeBinary)
        else:
            doc = cast(doc, LargeBinary)
        stmt = (
            select(doc)
            .select_from(
                studies.join(patients, patients.c.id == studies.c.patient_pk)
                .join(series, series.c.study_pk == studies.c.id)
                .join(instances, instances.c.series_pk == series.c.id)
            )
            .where(*conds)
            .order_by(series.c.series_number, series.c.id, instances.c.instance_number, instances.c.id)
        )
        with self.engine.connect() as conn:
            return [bytes(d) for d in conn.execute(stmt).scalars().all()]  # one fetchall

    def instances_by_uid(self, sop_uids: Sequence[str]) -> dict[str, StoredInstance]:
        """The catalogued instances among ``sop_uids`` (storage commitment)."""
        found: dict[str, StoredInstance] = {}
        for start in range(0, len(sop_uids), 500):
            chunk = list(sop_uids[start : start + 500])
            for inst in self.locate({"SOPInstanceUID": "\\".join(chunk)}):
                found[inst.sop_uid] = inst
        return found

    def versions(self, sop_uid: str) -> list[dict[str, Any]]:
        """Earlier contents of an instance, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(instance_versions)
                .where(instance_versions.c.sop_uid == sop_uid)
                .order_by(instance_versions.c.id)
            )
            return [dict(r._mapping) for r in rows]

    def counts(self) -> dict[str, int]:
        """How many patients, studies, series and instances are catalogued."""
        with self.engine.connect() as conn:
            return {
                t.name: int(conn.execute(select(func.count()).select_from(t)).scalar_one())
                for t in (patients, studies, series, instances)
            }
