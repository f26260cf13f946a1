"""The audit trail: one ``audit.record(...)`` for every security-relevant event (R-SE-4, issue 6 §4).

**Records.** Each record holds the time (from an injectable clock), the event type
(:class:`EventType`), who (actor, role, institution), what (resource), the result and the source
address, plus an optional JSON ``detail``. Records sit in the catalog database (table
``audit_log``, ``gateway/archive/schema.py``), numbered ``seq`` = 1, 2, 3 … without gaps.

**Hash chain.** Every record stores ``prev_hash`` (the previous record's ``hash``; 64 zeros for the
first) and ``hash = SHA-256(canonical JSON of its fields, seq and prev_hash included)``
(:func:`record_hash`). Editing a field breaks that record's hash; deleting one leaves a gap in
``seq`` and a broken link; moving one puts it where its ``prev_hash`` does not fit. Writers are
serialised: appends run inside the catalog's write transaction (:meth:`Catalog.write`: SQLite has
one writer; on PostgreSQL a transaction-scoped advisory lock is taken before the chain's head is
read), so two writers never claim the same ``seq``.

**Checkpoints.** Every ``checkpoint_every_records`` records (in the appending transaction) and
every ``checkpoint_every_seconds`` (by a background thread, if records were added) the chain's head
is signed with Ed25519: ``(seq, hash, time, key_id, signature)`` goes to ``audit_checkpoints``
and, after commit, to an append-only :class:`ExportTarget` together with the closed segment (the
records since the previous checkpoint, one JSON line each). The folder implementation
(:class:`FolderExport`) writes each file once (``O_EXCL``, ``fsync``, mode 0444, hard-linked into
place so a file is never seen half-written). A rewritten chain no longer matches a signed
checkpoint; a truncated tail falls short of one. ``[audit.s3]`` adds an S3 bucket with object lock
(``gateway/audit_s3.py``) as a second target: the copy nobody on this host can change.

**Hot path.** C-STORE/STOW ingest records inside the instance's own catalog transaction
(:meth:`AuditLog.record_in`): the instance and its record commit together, for no extra commit.
On SQLite the record is appended to the chain there and then (one writer anyway); on PostgreSQL it
is staged in ``audit_pending`` (no lock taken) and chained by the background thread within a
second, because holding the chain lock through every ingest commit serialises parallel stores
(measured: 8 writers ~3x slower). Staged rows are not yet tamper-evident: that window is under a
second, and ``verify`` reports rows still staged. HTTP reads queue their records
(:meth:`AuditLog.submit`) for the background thread, which appends them in batches. Other events
use :meth:`AuditLog.record` (own transaction, durable on return). An audit write that fails in its
own transaction is logged at ERROR with the whole record and does not fail the action audited;
inside the ingest transaction it fails the store (no unaudited instance).

:func:`verify` walks the chain and the checkpoints (``ybyx audit verify``);
``gateway/audit_dicom.py`` renders records as DICOM audit messages (PS3.15 A.5).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Connection, Engine, func, select, text
from sqlalchemy.dialects import postgresql, sqlite

from gateway.archive.schema import audit_checkpoints, audit_log, audit_pending

if TYPE_CHECKING:
    from gateway.archive.catalog import Catalog
    from gateway.config import AuditSection
    from gateway.security.kms import Kms
    from gateway.security.tokens import Signer

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
GENESIS = "0" * 64
# pg_advisory_xact_lock key serialising appends to the chain ("ybyxaudi" as a big-endian int64)
_PG_LOCK_KEY = int.from_bytes(b"ybyxaudi", "big")
_CHECKPOINT_DOMAIN = b"ybyx-audit-checkpoint-v1\n"
# Bounds on stored text (a hostile AE title or URL must not bloat or break the log).
_LIMITS = {"actor": 256, "role": 64, "institution": 64, "resource": 2048, "source": 256}
_DETAIL_LIMIT = 8192


# Built once: constructing them per record costs more than running them (C-STORE is hot).
_HEAD = select(audit_log.c.seq, audit_log.c.hash).order_by(audit_log.c.seq.desc()).limit(1)
_INSERT = audit_log.insert()
_STAGE = audit_pending.insert()
_ENTRY_FIELDS = ("event_type", "actor", "role", "institution", "resource", "result", "source", "detail")


class EventType(StrEnum):
    """What happened (issue 6 §4). The DICOM EventID each maps to is in ``audit_dicom.py``."""

    LOGIN = "login"
    LOGOUT = "logout"
    UPLOAD = "upload"  # C-STORE, STOW-RS, exam records received
    RETRIEVAL = "retrieval"  # C-MOVE, C-GET, WADO-RS/URI
    QUERY = "query"  # C-FIND, QIDO-RS
    SHARE = "share"
    CONFIG_CHANGE = "config-change"
    KEY_OPERATION = "key-operation"
    ACCESS_DENIED = "access-denied"  # association rejected, 401/403
    ANOMALY = "anomaly"
    FORWARD = "forward"  # a study confirmed at / given up on by the center
    APPLICATION_START = "application-start"  # the audit trail of a role starts (coverage gaps show)
    APPLICATION_STOP = "application-stop"


class Result(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"


@dataclass(frozen=True)
class Actor:
    """Who acts, as recorded: a user, a node (OAuth client), a DICOM AE, or this system itself."""

    actor: str
    role: str = ""
    institution: str = ""
    source: str = ""  # network address the request came from ("local" for the node itself)


def principal_actor(principal: Any, client: str) -> Actor:
    """An :class:`Actor` from the authenticated principal of a request, or ``anonymous`` when there
    is none; ``client`` is the peer address. Duck-typed on the auth layer's object
    (``gateway.security.guard.Principal``: ``id``, ``kind``, ``scopes``; users will add ``role`` and
    ``institution``)."""
    if principal is None:
        return Actor("anonymous", "", "", client)
    name = next(
        (
            str(v)
            for attr in ("subject", "sub", "client_id", "username", "user_id", "id", "name")
            if (v := getattr(principal, attr, None))
        ),
        "unknown",
    )
    role = getattr(principal, "role", None) or getattr(principal, "kind", None)
    if not role:
        roles = getattr(principal, "roles", None) or getattr(principal, "scopes", None)
        role = " ".join(sorted(str(r) for r in roles)) if roles else ""
    institution = getattr(principal, "institution", None) or ""
    return Actor(name, str(role), str(institution), client)


def system_actor(cfg: Any) -> Actor:
    """This node as an actor (forwarding, start/stop) and as the DICOM audit source: the front-end
    by its AE title and hospital, the center by its province."""
    from gateway.config import CenterConfig, FrontendConfig

    if isinstance(cfg, FrontendConfig):
        return Actor(f"ybyx-frontend:{cfg.dicom.ae_title}", "system", cfg.institution, "local")
    if isinstance(cfg, CenterConfig):
        return Actor(f"ybyx-center:{cfg.province}", "system", cfg.province, "local")
    return Actor(f"ybyx-{getattr(cfg, 'role', 'node')}", "system", "", "local")


# ---- records and their hashes --------------------------------------------------------------------


def canonical_json(value: Any) -> str:
    """The canonical JSON text hashed and signed: sorted keys, no spaces, UTF-8 kept as is."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def format_time(at: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ`` in UTC: stored as text so every database returns it byte for
    byte as hashed (and it still sorts by time)."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def utcnow() -> datetime:
    return datetime.now(UTC)


def _clean(value: str, limit: int) -> str:
    # PostgreSQL text cannot hold NUL; the hash is computed over what is stored.
    return value.replace("\x00", "\ufffd")[:limit]


HASHED_FIELDS = (
    "seq",
    "time",
    "event_type",
    "actor",
    "role",
    "institution",
    "resource",
    "result",
    "source",
    "detail",
    "prev_hash",
)


def record_hash(fields: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of a record's :data:`HASHED_FIELDS`."""
    body = {k: fields[k] for k in HASHED_FIELDS}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class AuditRecord:
    """One stored record (``detail`` is its canonical JSON text, ``{}`` when there is none)."""

    seq: int
    time: str
    event_type: str
    actor: str
    role: str
    institution: str
    resource: str
    result: str
    source: str
    detail: str
    prev_hash: str
    hash: str

    @classmethod
    def from_row(cls, row: Any) -> AuditRecord:
        m = row._mapping if hasattr(row, "_mapping") else row
        return cls(**{k: m[k] for k in (*HASHED_FIELDS, "hash")})

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (*HASHED_FIELDS, "hash")}

    def details(self) -> dict[str, Any]:
        value = json.loads(self.detail) if self.detail else {}
        return value if isinstance(value, dict) else {"value": value}

    def recomputed(self, seq: int | None = None) -> str:
        """The hash these fields should have (at ``seq``, if given, instead of the stored one)."""
        fields = self.as_dict()
        if seq is not None:
            fields["seq"] = seq
        return record_hash(fields)


@dataclass(frozen=True)
class _Entry:
    """A record waiting for its place in the chain."""

    time: str | None  # None: stamped when appended
    event_type: str
    actor: str
    role: str
    institution: str
    resource: str
    result: str
    source: str
    detail: str


def _entry(
    event_type: EventType | str,
    *,
    actor: str,
    role: str,
    institution: str,
    resource: str,
    result: Result | str,
    source: str,
    detail: Mapping[str, Any] | None,
    time: str | None = None,
) -> _Entry:
    detail_text = canonical_json(dict(detail) if detail else {})
    if len(detail_text) > _DETAIL_LIMIT:
        detail_text = canonical_json({"truncated": detail_text[: _DETAIL_LIMIT - 64]})
    return _Entry(
        time,
        str(EventType(event_type)),
        _clean(actor, _LIMITS["actor"]),
        _clean(role, _LIMITS["role"]),
        _clean(institution, _LIMITS["institution"]),
        _clean(resource, _LIMITS["resource"]),
        str(Result(result)),
        _clean(source, _LIMITS["source"]),
        detail_text.replace("\x00", "\ufffd"),
    )


# ---- signing keys ----------------------------------------------------------------------------------


def key_id(public: Ed25519PublicKey) -> str:
    """A public key's id: the first 16 hex digits of SHA-256 of its raw 32 bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_signing_key(path: Path, *, create: bool = False) -> Ed25519PrivateKey:
    """The Ed25519 checkpoint key at ``path`` (PKCS#8 PEM), created (mode 600) if absent and
    ``create``; refused if others may read it. Its public half is kept beside it as ``<path>.pub``.
    """
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it first: use theirs
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
            log.info(
                "generated the audit checkpoint signing key %s (key id %s)", path, key_id(key.public_key())
            )
    if path.stat().st_mode & 0o077:
        raise PermissionError(f"{path}: signing key is readable by others (chmod 600)")
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    pub = path.with_name(path.name + ".pub")
    if not pub.exists():
        pub.write_bytes(public_pem(loaded.public_key()))
    return loaded


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file holding the public key (or the private key)."""
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        private = serialization.load_pem_private_key(data, password=None)
        if not isinstance(private, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 key")
        return private.public_key()
    public = serialization.load_pem_public_key(data)
    if not isinstance(public, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return public


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement "the chain's record ``seq`` has hash ``hash``" made at ``time``."""

    seq: int
    hash: str
    time: str
    key_id: str
    signature: str  # hex, 64 bytes

    @staticmethod
    def message(seq: int, hash_: str, time: str, kid: str) -> bytes:
        body = canonical_json({"seq": seq, "hash": hash_, "time": time, "key_id": kid})
        return _CHECKPOINT_DOMAIN + body.encode("utf-8")

    @classmethod
    def sign(cls, key: Signer, seq: int, hash_: str, time: str) -> Checkpoint:
        kid = key_id(key.public_key())
        return cls(seq, hash_, time, kid, key.sign(cls.message(seq, hash_, time, kid)).hex())

    def check(self, keys: Mapping[str, Ed25519PublicKey]) -> str | None:
        """None if the signature is good under a trusted key, else what is wrong."""
        public = keys.get(self.key_id)
        if public is None:
            return f"signed with key {self.key_id}, which is not trusted"
        try:
            public.verify(
                bytes.fromhex(self.signature), self.message(self.seq, self.hash, self.time, self.key_id)
            )
        except (InvalidSignature, ValueError):
            return "signature does not verify"
        return None

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "hash": self.hash,
            "time": self.time,
            "key_id": self.key_id,
            "signature": self.signature,
        }

    def to_json(self) -> bytes:
        return (canonical_json(self.as_dict()) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Checkpoint:
        d = json.loads(data)
        return cls(int(d["seq"]), str(d["hash"]), str(d["time"]), str(d["key_id"]), str(d["signature"]))

    @classmethod
    def from_row(cls, row: Any) -> Checkpoint:
        return cls(int(row.seq), row.hash, row.time, row.key_id, row.signature)


# ---- export (append-only) ------------------------------------------------------------------------


class ExportConflict(Exception):
    """An export file exists already with other content: never overwritten, worth an alarm."""


class ExportTarget(Protocol):
    """An append-only store for checkpoints and closed segments (:class:`FolderExport`,
    ``gateway.audit_s3.ObjectLockExport``). ``put`` never replaces a file: same content again is a
    no-op, other content raises :class:`ExportConflict`. A target may also offer ``findings()``:
    ``(name, what)`` for names changed after export, which :func:`verify` reports."""

    def put(self, name: str, data: bytes) -> None: ...

    def get(self, name: str) -> bytes | None: ...

    def names(self) -> list[str]: ...


def checkpoint_name(seq: int) -> str:
    return f"checkpoint-{seq:012d}.json"


def segment_name(first: int, last: int) -> str:
    return f"segment-{first:012d}-{last:012d}.jsonl"


class FolderExport:
    """:class:`ExportTarget` in a local folder: each file is written to a private temporary name
    (``O_EXCL``), fsynced, made read-only (0444), then hard-linked to its name (which fails if the
    name exists: nothing is ever replaced) and the folder fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def put(self, name: str, data: bytes) -> None:
        if "/" in name or name.startswith("."):
            raise ValueError(f"bad export name {name!r}")
        final = self.path / name
        if final.exists():
            self._same(final, data)
            return
        tmp = self.path / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            try:
                os.link(tmp, final)
            except FileExistsError:
                self._same(final, data)
        finally:
            tmp.unlink(missing_ok=True)
        dfd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    @staticmethod
    def _same(final: Path, data: bytes) -> None:
        if final.read_bytes() != data:
            raise ExportConflict(f"{final} exists with other content; not replaced")

    def get(self, name: str) -> bytes | None:
        try:
            return (self.path / name).read_bytes()
        except FileNotFoundError:
            return None

    def names(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if not p.name.startswith("."))


class ExportAll:
    """Several targets as one (the folder, then S3): ``put`` writes to each in turn, ``names``
    are those every target holds, so a checkpoint one target missed (S3 down) is exported again
    on the next pass; the targets that have it already treat the same bytes as a no-op."""

    def __init__(self, targets: Sequence[ExportTarget]) -> None:
        self.targets = list(targets)

    def put(self, name: str, data: bytes) -> None:
        for target in self.targets:
            target.put(name, data)

    def get(self, name: str) -> bytes | None:
        return self.targets[0].get(name)

    def names(self) -> list[str]:
        common = set(self.targets[0].names())
        for target in self.targets[1:]:
            common &= set(target.names())
        return sorted(common)


@dataclass
class _ExportState:
    """Progress of one export target: the highest checkpoint seq known exported (read back from
    the target's names on first use, so a restart resumes), and the back-off after failures."""

    exported: int | None = None
    failures: int = 0
    retry_at: float = 0.0  # monotonic

    def failed(self) -> None:
        self.failures += 1
        self.exported = None  # read the progress back from the target when it works again
        delay = min(EXPORT_RETRY_MAX, EXPORT_RETRY_FIRST * 2 ** (self.failures - 1))
        self.retry_at = time.monotonic() + delay


#: After a failed export the target is tried again after 5 s, doubling up to 5 min.
EXPORT_RETRY_FIRST = 5.0
EXPORT_RETRY_MAX = 300.0


def export_targets(cfg: AuditSection) -> list[ExportTarget]:
    """The configured targets: the folder, and the object-locked bucket if ``[audit.s3]`` is set
    (checked: created with object lock, or refused without it)."""
    targets: list[ExportTarget] = [FolderExport(cfg.export_path)]
    if cfg.s3 is not None:
        from gateway.audit_s3 import ObjectLockExport

        s3 = ObjectLockExport.from_config(cfg.s3)
        s3.check()
        targets.append(s3)
    return targets


# ---- the log -------------------------------------------------------------------------------------


#: How many distinct items one grouped record lists (requests for others: ``items_not_listed``).
GROUP_ITEMS_MAX = 500


@dataclass
class _Group:
    """Reads being gathered into one record by :meth:`AuditLog.submit_grouped`."""

    detail: dict[str, Any]
    first: str
    started: float  # monotonic, for the window
    last: str = ""
    requests: int = 0
    items: dict[str, None] = field(default_factory=dict)  # insertion-ordered set
    not_listed: int = 0

    def add(self, item: str, now: str) -> None:
        self.requests += 1
        self.last = now
        if item in self.items:
            return
        if len(self.items) < GROUP_ITEMS_MAX:
            self.items[item] = None
        else:
            self.not_listed += 1

    def detail_out(self) -> dict[str, Any]:
        out = {**self.detail, "requests": self.requests, "items": list(self.items)}
        out.update(first=self.first, last=self.last or self.first)
        if self.not_listed:
            out["items_not_listed"] = self.not_listed
        return out


class AuditLog:
    """The audit trail of one role, in its catalog database (see the module docstring)."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        signing_key: Signer,  # an Ed25519PrivateKey, or a KMS key (gateway/security/managed.py)
        export: ExportTarget | None = None,
        system: Actor | None = None,
        clock: Clock = utcnow,
        checkpoint_every_records: int = 1000,
        checkpoint_every_seconds: float = 300.0,
        batch_max: int = 500,
        group_seconds: float = 1.0,
    ) -> None:
        self.catalog = catalog
        self.engine: Engine = catalog.engine
        self.key = signing_key
        self.key_id = key_id(signing_key.public_key())
        self.export = export
        self.system = system or Actor("ybyx", "system", "", "local")
        self.clock = clock
        self.every_records = checkpoint_every_records
        self.every_seconds = checkpoint_every_seconds
        self.batch_max = batch_max
        self._is_pg = self.engine.dialect.name == "postgresql"
        self._queue: queue.SimpleQueue[_Entry | None] = queue.SimpleQueue()  # None: wake up
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = threading.Lock()  # guards _thread against put-after-stop
        self._export_lock = threading.Lock()
        self._export_states: dict[int, _ExportState] = {}  # per target (index in ExportAll)
        self.lost = 0  # records that could not be written (each logged at ERROR)
        self._last_periodic = 0.0
        self.group_seconds = group_seconds
        self._groups: dict[tuple[Actor, str, str, str], _Group] = {}  # guarded by _running

    @classmethod
    def open(
        cls,
        cfg: AuditSection,
        catalog: Catalog,
        *,
        system: Actor,
        clock: Clock = utcnow,
        kms: Kms | None = None,
    ) -> AuditLog:
        """From the ``[audit]`` config section; the signing key is generated on first start (in the
        node's KMS with ``signing_key_source = "kms"``, R-SE-14)."""
        targets = export_targets(cfg)
        signing_key: Signer
        if cfg.signing_key_source == "kms":
            from gateway.security.managed import AUDIT_CHECKPOINT, KmsSigner, ensure_active

            if kms is None:
                raise ValueError("audit.signing_key_source = kms: this node has no KMS")
            key, _made = ensure_active(kms, AUDIT_CHECKPOINT)
            signing_key = KmsSigner(kms, AUDIT_CHECKPOINT, key)
        else:
            signing_key = load_signing_key(cfg.signing_key, create=True)
        return cls(
            catalog,
            signing_key=signing_key,
            export=targets[0] if len(targets) == 1 else ExportAll(targets),
            system=system,
            clock=clock,
            checkpoint_every_records=cfg.checkpoint_every_records,
            checkpoint_every_seconds=cfg.checkpoint_every_seconds,
        )

    # ---- writing ---------------------------------------------------------------------------

    def record(
        self,
        event_type: EventType | str,
        *,
        actor: str,
        role: str,
        institution: str,
        resource: str,
        result: Result | str,
        source: str,
        detail: Mapping[str, Any] | None = None,
    ) -> int | None:
        """Append one record in its own transaction; its ``seq`` once durable, or None if the
        database refused it (logged at ERROR with the whole record: the action is not failed)."""
        entry = _entry(
            event_type,
            actor=actor,
            role=role,
            institution=institution,
            resource=resource,
            result=result,
            source=source,
            detail=detail,
        )
        try:
            with self.catalog.write() as conn:
                return self._append(conn, [entry])[-1].seq
        except Exception:
            self._lost([entry])
            return None

    def record_as(
        self,
        who: Actor,
        event_type: EventType | str,
        *,
        resource: str,
        result: Result | str,
        detail: Mapping[str, Any] | None = None,
    ) -> int | None:
        """:meth:`record` with the actor fields from ``who``."""
        return self.record(
            event_type,
            actor=who.actor,
            role=who.role,
            institution=who.institution,
            resource=resource,
            result=result,
            source=who.source,
            detail=detail,
        )

    def record_in(
        self,
        conn: Connection,
        who: Actor,
        event_type: EventType | str,
        *,
        resource: str,
        result: Result | str,
        detail: Mapping[str, Any] | None = None,
    ) -> int | None:
        """Record inside the caller's write transaction (from :meth:`Catalog.write`): the record
        commits, or rolls back, with the caller's rows. Raises if it cannot be written.

        SQLite: appended to the chain there and then (one writer anyway: no extra commit, no
        contention); its ``seq`` is returned. PostgreSQL: staged in ``audit_pending`` (no lock) and
        chained by the audit thread within a second — holding the chain lock through every ingest
        commit would serialise parallel stores (measured ~3x slower at 8 writers); None returned.
        """
        entry = self._stamped(who, event_type, resource, result, detail)
        if self._is_pg:
            conn.execute(_STAGE, {"time": entry.time, **{k: getattr(entry, k) for k in _ENTRY_FIELDS}})
            return None
        return self._append(conn, [entry])[-1].seq

    def submit(
        self,
        who: Actor,
        event_type: EventType | str,
        *,
        resource: str,
        result: Result | str,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Queue a record (stamped now) for the background thread, which appends queued records in
        batches; written at once if the thread is not running. For hot read paths (HTTP): the
        caller does not wait (a crash may lose the records of the last fraction of a second)."""
        entry = self._stamped(who, event_type, resource, result, detail)
        with self._running:
            if self._thread is not None:
                self._queue.put(entry)
                return
        self._write_batch([entry])

    def submit_grouped(
        self,
        who: Actor,
        event_type: EventType | str,
        *,
        resource: str,
        result: Result | str,
        item: str,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Like :meth:`submit`, for bursts of one kind of read: a viewer pulls a 300-slice series as
        300 frame requests in a few seconds. Requests of one actor on one ``resource`` with one
        result within :attr:`group_seconds` of the first become ONE record, whose detail counts
        the ``requests`` and lists the distinct ``items`` (instances / frames; the first
        :data:`GROUP_ITEMS_MAX`, requests for others counted in ``items_not_listed``) with the
        ``first`` and ``last`` times, as a DICOM "DICOM Instances Transferred" message covers one
        transfer, not one packet. Every request is still accounted for; the chain grows by one row
        per transfer instead of one per frame. Written at once, ungrouped, when the background
        thread is not running."""
        now = format_time(self.clock())
        with self._running:
            if self._thread is not None:
                key = (who, str(event_type), resource, str(result))
                group = self._groups.get(key)
                if group is None:
                    group = self._groups[key] = _Group(dict(detail or {}), now, time.monotonic())
                group.add(item, now)
                return
        single = {**(detail or {}), "requests": 1, "items": [item], "first": now, "last": now}
        self._write_batch([self._stamped(who, event_type, resource, result, single)])

    def _release_groups(self, *, everything: bool = False) -> list[_Entry]:
        """The grouped records whose window has closed (or all of them), as entries to write."""
        due = time.monotonic() - self.group_seconds
        with self._running:
            keys = [k for k, g in self._groups.items() if everything or g.started <= due]
            groups = [(k, self._groups.pop(k)) for k in keys]
        return [
            self._stamped(who, event_type, resource, result, group.detail_out())
            for (who, event_type, resource, result), group in groups
        ]

    def _stamped(
        self,
        who: Actor,
        event_type: EventType | str,
        resource: str,
        result: Result | str,
        detail: Mapping[str, Any] | None,
    ) -> _Entry:
        return _entry(
            event_type,
            actor=who.actor,
            role=who.role,
            institution=who.institution,
            resource=resource,
            result=result,
            source=who.source,
            detail=detail,
            time=format_time(self.clock()),
        )

    def _lost(self, entries: Sequence[_Entry]) -> None:
        self.lost += len(entries)
        for e in entries:
            log.exception("AUDIT RECORD NOT WRITTEN: %s", canonical_json(e.__dict__))

    def _lock_chain(self, conn: Connection) -> None:
        if self._is_pg:
            # Held to the end of the transaction: the next writer reads the head only after this
            # transaction's records are committed. (SQLite: Catalog.write holds the one write lock.)
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})

    def _insert(self, table: Any) -> Any:
        return (postgresql if self._is_pg else sqlite).insert(table)

    def _append(self, conn: Connection, entries: Sequence[_Entry]) -> list[AuditRecord]:
        self._lock_chain(conn)
        head = conn.execute(_HEAD).first()
        seq, prev = (int(head.seq), str(head.hash)) if head is not None else (0, GENESIS)
        now = format_time(self.clock())
        out: list[AuditRecord] = []
        checkpoints: list[Checkpoint] = []
        for e in entries:
            seq += 1
            fields: dict[str, Any] = {
                "seq": seq,
                "time": e.time or now,
                "event_type": e.event_type,
                "actor": e.actor,
                "role": e.role,
                "institution": e.institution,
                "resource": e.resource,
                "result": e.result,
                "source": e.source,
                "detail": e.detail,
                "prev_hash": prev,
            }
            fields["hash"] = prev = record_hash(fields)
            out.append(AuditRecord(**fields))
            if seq % self.every_records == 0:
                checkpoints.append(Checkpoint.sign(self.key, seq, prev, now))
        conn.execute(_INSERT, [r.as_dict() for r in out])
        for cp in checkpoints:
            conn.execute(self._insert(audit_checkpoints).values(**cp.as_dict()).on_conflict_do_nothing())
        return out

    def _write_batch(self, entries: Sequence[_Entry]) -> None:
        try:
            with self.catalog.write() as conn:
                self._append(conn, entries)
        except Exception:
            self._lost(entries)

    def chain_pending(self) -> int:
        """Move records staged by :meth:`record_in` (PostgreSQL) into the chain, oldest first, in
        batches (one transaction each: chained and un-staged together); how many were chained."""
        if not self._is_pg:
            return 0
        n = 0
        while True:
            with self.catalog.write() as conn:
                self._lock_chain(conn)  # taken first: a concurrent chainer sees our deletes
                rows = conn.execute(
                    select(audit_pending).order_by(audit_pending.c.id).limit(self.batch_max)
                ).all()
                if not rows:
                    return n
                self._append(conn, [_Entry(r.time, *(getattr(r, k) for k in _ENTRY_FIELDS)) for r in rows])
                conn.execute(audit_pending.delete().where(audit_pending.c.id.in_([r.id for r in rows])))
            n += len(rows)

    def flush(self, first: _Entry | None = None) -> int:
        """Append everything queued by :meth:`submit` (in batches of ``batch_max``, one transaction
        each) and chain what is staged; how many were written. ``first``: taken from the queue."""
        n = 0
        while True:
            batch: list[_Entry] = [first] if first is not None else []
            first = None
            while len(batch) < self.batch_max:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    batch.append(item)
            if not batch:
                return n + self.chain_pending()
            self._write_batch(batch)
            n += len(batch)

    # ---- checkpoints and export --------------------------------------------------------------

    def checkpoint(self, *, force: bool = False) -> Checkpoint | None:
        """Sign the chain's head if records were added since the last checkpoint and it is older
        than ``checkpoint_every_seconds`` (or ``force``); the new checkpoint, or None."""
        with self.catalog.write() as conn:
            head = conn.execute(_HEAD).first()
            last = conn.execute(
                select(audit_checkpoints).order_by(audit_checkpoints.c.seq.desc()).limit(1)
            ).first()
            if head is None or (last is not None and int(last.seq) >= int(head.seq)):
                return None
            now = self.clock()
            if not force and last is not None:
                age = (now - datetime.fromisoformat(last.time.replace("Z", "+00:00"))).total_seconds()
                if age < self.every_seconds:
                    return None
            cp = Checkpoint.sign(self.key, int(head.seq), str(head.hash), format_time(now))
            conn.execute(self._insert(audit_checkpoints).values(**cp.as_dict()).on_conflict_do_nothing())
        return cp

    def export_pending(self) -> int:
        """Export checkpoints not yet exported, each after its segment, to every target (an
        :class:`ExportAll` is several); how many the first target took. A target that fails is
        skipped for a while (:class:`_ExportState` back-off) while the others go on, so an S3 outage
        neither stops the folder export nor stalls the audit thread on every pass; the first
        failure is raised once all due targets were tried."""
        if self.export is None:
            return 0
        targets = self.export.targets if isinstance(self.export, ExportAll) else [self.export]
        exported, failure = 0, None
        with self._export_lock:
            for i, target in enumerate(targets):
                state = self._export_states.setdefault(i, _ExportState())
                if time.monotonic() < state.retry_at:
                    continue
                try:
                    n = self._export_to(target, state)
                except Exception as exc:
                    state.failed()
                    failure = failure or exc
                    continue
                state.failures = 0
                exported = n if i == 0 else exported
        if failure is not None:
            raise failure
        return exported

    def _export_to(self, target: ExportTarget, state: _ExportState) -> int:
        if state.exported is None:
            target.put(f"public-key-{self.key_id}.pem", public_pem(self.key.public_key()))
            done = [int(n[11:23]) for n in target.names() if n.startswith("checkpoint-")]
            state.exported = max(done, default=0)
        with self.engine.connect() as conn:
            pending = [
                Checkpoint.from_row(r)
                for r in conn.execute(
                    select(audit_checkpoints)
                    .where(audit_checkpoints.c.seq > state.exported)
                    .order_by(audit_checkpoints.c.seq)
                )
            ]
            prev = conn.execute(
                select(func.max(audit_checkpoints.c.seq)).where(audit_checkpoints.c.seq <= state.exported)
            ).scalar()
        prev = int(prev or 0)
        for cp in pending:
            lines = [canonical_json(r.as_dict()) + "\n" for r in read_records(self.engine, prev + 1, cp.seq)]
            target.put(segment_name(prev + 1, cp.seq), "".join(lines).encode("utf-8"))
            target.put(checkpoint_name(cp.seq), cp.to_json())
            state.exported = prev = cp.seq
        return len(pending)

    def seal(self) -> Checkpoint | None:
        """Flush the queue, checkpoint the head (if anything is new) and export: used at stop."""
        self.flush()
        cp = self.checkpoint(force=True)
        self.export_pending()
        return cp

    # ---- background thread -------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread that appends queued records, makes time-based checkpoints and exports."""
        with self._running:
            if self._thread is not None:
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="audit", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread, then seal: nothing queued is left behind."""
        with self._running:  # from here on, records are written by their callers
            thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            self._queue.put(None)
            thread.join(30)
        grouped = self._release_groups(everything=True)  # no new ones: _thread is None now
        if grouped:
            self._write_batch(grouped)
        try:
            self.seal()
        except Exception:
            log.exception("audit: sealing at stop failed")

    def _run(self) -> None:
        tick = min(1.0, self.every_seconds)
        while not self._stop.is_set():
            try:
                try:
                    item = self._queue.get(timeout=0.25)
                except queue.Empty:
                    item = None
                for entry in self._release_groups():
                    self._queue.put(entry)
                self.flush(item)  # what waits goes in one transaction; staged rows are chained
                if not self._stop.is_set():
                    self._periodic(tick)
            except Exception:
                log.exception("audit: background pass failed")

    def _periodic(self, tick: float) -> None:
        now = time.monotonic()
        if now - self._last_periodic < tick:
            return
        self._last_periodic = now
        self.checkpoint()
        self.export_pending()


# ---- reading and verifying -----------------------------------------------------------------------


def read_records(
    engine: Engine, first: int = 1, last: int | None = None, page: int = 2000
) -> Iterator[AuditRecord]:
    """Records with ``first <= seq <= last`` in ``seq`` order, read a page at a time."""
    after = first - 1
    while True:
        stmt = select(audit_log).where(audit_log.c.seq > after).order_by(audit_log.c.seq).limit(page)
        if last is not None:
            stmt = stmt.where(audit_log.c.seq <= last)
        with engine.connect() as conn:
            rows = [AuditRecord.from_row(r) for r in conn.execute(stmt)]
        yield from rows
        if len(rows) < page:
            return
        after = rows[-1].seq


EDITED = "edited"
GAP = "deleted/gap"
REORDERED = "reordered"
CHECKPOINT_MISMATCH = "checkpoint mismatch"


@dataclass(frozen=True)
class Problem:
    """The first thing found wrong: the record (``seq``), the kind, and an explanation."""

    seq: int
    kind: str  # EDITED | GAP | REORDERED | CHECKPOINT_MISMATCH
    message: str

    def __str__(self) -> str:
        return f"seq {self.seq}: {self.kind}: {self.message}"


@dataclass
class VerifyReport:
    records: int = 0
    last_seq: int = 0
    last_hash: str = GENESIS
    checkpoints: int = 0
    exported_checkpoints: int = 0
    problem: Problem | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None

    def summary(self) -> str:
        if self.problem is not None:
            return f"audit chain BROKEN at {self.problem}"
        return (
            f"audit chain ok: {self.records} records (seq 1-{self.last_seq}), "
            f"{self.checkpoints} signed checkpoints verified, {self.exported_checkpoints} exported "
            f"checkpoints match; head {self.last_hash[:16]}…"
        )


def _moved_here(engine: Engine, seq: int, prev_hash: str) -> int | None:
    """The seq of another stored record that would fit at ``seq`` after ``prev_hash`` (its content
    hashes right there): the record that was moved away from ``seq``. Failure path only (scan)."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(audit_log).where(audit_log.c.prev_hash == prev_hash, audit_log.c.seq != seq)
        ).all()
    for row in rows:
        rec = AuditRecord.from_row(row)
        if rec.recomputed(seq) == rec.hash:
            return rec.seq
    return None


def verify(
    engine: Engine, keys: Mapping[str, Ed25519PublicKey], export: ExportTarget | None = None
) -> VerifyReport:
    """Walk the chain from seq 1: recompute every hash, check links and seq continuity, every
    checkpoint's signature (against ``keys``, by key id) and that exported checkpoints and segments
    match the database. The report names the first problem by seq (R-SE-4)."""
    report = VerifyReport()
    found: dict[int, Problem] = {}  # checkpoint/export problems by seq; the walk reports them in order

    def note(p: Problem) -> None:
        if p.seq not in found:
            found[p.seq] = p

    with engine.connect() as conn:
        staged = int(conn.execute(select(func.count()).select_from(audit_pending)).scalar_one())
        db_cps = {
            cp.seq: cp for cp in (Checkpoint.from_row(r) for r in conn.execute(select(audit_checkpoints)))
        }
    for cp in db_cps.values():
        bad = cp.check(keys)
        if bad:
            note(Problem(cp.seq, CHECKPOINT_MISMATCH, f"database checkpoint {bad}"))
    report.checkpoints = len(db_cps)
    if staged:
        report.notes.append(f"{staged} records staged, not yet chained (the running service chains them)")

    exported_cps: dict[int, Checkpoint] = {}
    segments: list[str] = []  # read one at a time during the walk (memory stays flat)
    findings = getattr(export, "findings", None)
    if callable(findings):  # names changed after export (a new S3 version, a delete marker)
        for name, what in findings():
            digits = name.split("-")[1].split(".")[0] if "-" in name else ""
            seq = int(digits) if digits.isdigit() else 0
            note(Problem(seq, CHECKPOINT_MISMATCH, f"exported {name} {what}"))
    if export is not None:
        for name in export.names():
            if name.startswith("segment-"):
                segments.append(name)
            elif name.startswith("checkpoint-"):
                data = export.get(name) or b""
                seq = int(name[11:23]) if name[11:23].isdigit() else 0
                try:
                    cp = Checkpoint.from_json(data)
                except (ValueError, KeyError, TypeError):
                    note(Problem(seq, CHECKPOINT_MISMATCH, f"exported {name} is not a readable checkpoint"))
                    continue
                exported_cps[cp.seq] = cp
                bad = cp.check(keys)
                if bad or cp.seq != seq:
                    note(
                        Problem(
                            seq, CHECKPOINT_MISMATCH, f"exported {name}: {bad or 'seq differs from its name'}"
                        )
                    )
                elif cp.seq not in db_cps:
                    note(
                        Problem(
                            seq, CHECKPOINT_MISMATCH, f"exported {name} has no checkpoint in the database"
                        )
                    )
                elif db_cps[cp.seq] != cp:
                    note(Problem(seq, CHECKPOINT_MISMATCH, f"exported {name} differs from the database's"))
        report.exported_checkpoints = len(exported_cps)
        unexported = sorted(set(db_cps) - set(exported_cps))
        if unexported:
            report.notes.append(
                f"{len(unexported)} checkpoints not exported yet (first seq {unexported[0]}): the running "
                "service exports within seconds"
            )

    def segment_hashes() -> Iterator[tuple[int, str]]:
        """(seq, hash) of every exported record, in seq order (segments are named by seq)."""
        for name in segments:
            data = export.get(name) if export is not None else None
            for line in (data or b"").decode("utf-8", "replace").splitlines():
                try:
                    d = json.loads(line)
                    item = (int(d["seq"]), str(d["hash"]))
                except (ValueError, KeyError, TypeError):
                    first = int(name[8:20]) if name[8:20].isdigit() else 0
                    note(Problem(first, CHECKPOINT_MISMATCH, f"exported {name} is damaged"))
                    break
                yield item

    exported = segment_hashes()
    next_exported = next(exported, None)
    expected, prev = 1, GENESIS
    for rec in read_records(engine):
        while next_exported is not None and next_exported[0] < rec.seq:
            next_exported = next(exported, None)
        exported_hash = next_exported[1] if next_exported and next_exported[0] == rec.seq else None
        problem: Problem | None = None
        if rec.seq != expected:
            problem = Problem(expected, GAP, f"records {expected}-{rec.seq - 1} are missing")
        elif rec.recomputed() != rec.hash:
            moved = _moved_here(engine, rec.seq, prev)
            problem = (
                Problem(
                    rec.seq, REORDERED, f"the record that belongs at seq {rec.seq} is stored at seq {moved}"
                )
                if moved is not None
                else Problem(rec.seq, EDITED, "its fields do not match its hash")
            )
        elif rec.prev_hash != prev:
            moved = _moved_here(engine, rec.seq, prev)
            problem = (
                Problem(
                    rec.seq, REORDERED, f"the record that belongs at seq {rec.seq} is stored at seq {moved}"
                )
                if moved is not None
                else Problem(
                    rec.seq,
                    EDITED,
                    f"it does not link to record {rec.seq - 1}: one of the two was rewritten with a "
                    "recomputed hash",
                )
            )
        elif rec.seq in db_cps and db_cps[rec.seq].hash != rec.hash:
            problem = Problem(
                rec.seq, CHECKPOINT_MISMATCH, "the signed checkpoint holds another hash: rewritten"
            )
        elif rec.seq in exported_cps and exported_cps[rec.seq].hash != rec.hash:
            problem = Problem(rec.seq, CHECKPOINT_MISMATCH, "the exported checkpoint holds another hash")
        elif exported_hash is not None and exported_hash != rec.hash:
            problem = Problem(
                rec.seq, EDITED, "it differs from its exported copy (rewritten with recomputed hashes)"
            )
        earlier = [p for s, p in found.items() if s <= rec.seq]
        if problem is not None or earlier:
            report.problem = min([*earlier, *([problem] if problem else [])], key=lambda p: p.seq)
            return report
        report.records += 1
        report.last_seq, report.last_hash = rec.seq, rec.hash
        prev = rec.hash
        expected += 1

    last_exported = max((int(n[21:33]) for n in segments if n[21:33].isdigit()), default=0)
    beyond = max([*db_cps, *exported_cps, last_exported], default=0)
    if beyond > report.last_seq:
        found.setdefault(
            expected,
            Problem(
                expected,
                GAP,
                f"a checkpoint or exported segment covers records up to seq {beyond}, "
                f"but the log ends at seq {report.last_seq}",
            ),
        )
    if found:
        report.problem = min(found.values(), key=lambda p: p.seq)
    return report


def trusted_keys(
    signing_key: Path | None, extra: Sequence[Path] = (), kms: Kms | None = None
) -> dict[str, Ed25519PublicKey]:
    """Public keys checkpoints may be signed with: the signing key's, plus older ones, plus every
    audit-checkpoint key of ``kms`` (destroyed ones too: their public half is kept)."""
    keys = [load_public_key(p) for p in ([signing_key] if signing_key else []) + list(extra)]
    if kms is not None:
        keys += [
            Ed25519PublicKey.from_public_bytes(kms.public_key("audit-checkpoint", k.key_id))
            for k in kms.managed_keys("audit-checkpoint")
        ]
    return {key_id(k): k for k in keys}


# ---- a role's audit trail (gateway/frontend.py, gateway/center.py) --------------------------------


def start_audit(cfg: Any, catalog: Catalog, kms: Kms | None = None) -> AuditLog:
    """Open, start and announce the audit trail of a role from its ``[audit]`` section; a key
    that cannot be used is reported as :class:`~gateway.archive.ArchiveUnavailable`."""
    from gateway.archive import ArchiveUnavailable

    system = system_actor(cfg)
    from gateway.audit_s3 import ExportUnavailable

    try:
        audit = AuditLog.open(cfg.audit, catalog, system=system, kms=kms)
        audit.export_pending()  # the public key and anything a previous run left unexported
    except ExportUnavailable as exc:
        raise ArchiveUnavailable("audit.s3", str(exc)) from exc
    except (OSError, ValueError, ExportConflict) as exc:
        raise ArchiveUnavailable("audit.signing_key", str(exc)) from exc
    audit.start()
    audit.record_as(
        system,
        EventType.APPLICATION_START,
        resource=f"role:{cfg.role}",
        result=Result.SUCCESS,
        detail={"key_id": audit.key_id},
    )
    return audit


def stop_audit(audit: AuditLog | None) -> None:
    """Record the stop, then stop the thread and seal (checkpoint + export of the tail)."""
    if audit is None:
        return
    audit.record_as(audit.system, EventType.APPLICATION_STOP, resource="", result=Result.SUCCESS)
    audit.stop()
