"""Audit export to S3 with object lock: the immutable copy of checkpoints and segments (R-SE-4).

:class:`ObjectLockExport` is an :class:`gateway.audit.ExportTarget` in a bucket created with S3
Object Lock (which also turns versioning on). Every object — ``segment-<first>-<last>.jsonl``,
``checkpoint-<seq>.json``, ``public-key-<id>.pem`` — is written in **one** PUT that carries its
retention (mode ``COMPLIANCE`` or ``GOVERNANCE``, retain-until = now + ``retain_days``) and,
if configured, a legal hold, so an object is never visible unlocked. The server then refuses,
until the date, to delete that version or to shorten its retention (``GOVERNANCE``: unless a
user holding ``s3:BypassGovernanceRetention`` asks to; ``COMPLIANCE``: nobody, root included).

What S3 cannot refuse on a versioned bucket: a *new version* under the same name (a plain PUT)
or a delete marker (a DELETE without version id). Neither removes the locked version, so this
target always reads the **oldest** version of a name (the one the exporter wrote) and
:meth:`ObjectLockExport.findings` reports every name that later got another version or a delete
marker; ``verify`` turns those into ``checkpoint mismatch`` problems.

``put`` is idempotent: a name that exists with the same bytes is left alone (no second version),
other bytes raise :class:`~gateway.audit.ExportConflict`. With the export order of
:meth:`gateway.audit.AuditLog.export_pending` (segment, then checkpoint; progress read back from
the target's own names) a crash between a PUT and the next one re-exports the same names with the
same bytes on the next pass: the export resumes without duplicates.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from minio.commonconfig import COMPLIANCE, GOVERNANCE
from minio.datatypes import Object
from minio.error import MinioException, S3Error
from minio.retention import Retention
from urllib3.exceptions import HTTPError, MaxRetryError

from gateway.archive.s3 import minio_client
from gateway.audit import ExportConflict, utcnow

if TYPE_CHECKING:
    from gateway.config import AuditS3Section

MODES: Final = (COMPLIANCE, GOVERNANCE)
SHA256_META: Final = "x-amz-meta-sha256"
_NO_LOCK: Final = "ObjectLockConfigurationNotFoundError"


class ExportUnavailable(OSError):
    """The S3 export cannot be used (unreachable, credentials, a bucket without object lock)."""


class ObjectLockExport:
    """Append-only export into an object-locked S3 bucket (see the module docstring).

    The constructor does no network I/O; :meth:`check` creates the bucket with object lock, or
    checks that an existing one has it, and is called at start (``AuditLog.open``).
    """

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        *,
        secure: bool = False,
        region: str | None = None,
        prefix: str = "",
        mode: str = COMPLIANCE,
        retain_days: int = 190,
        legal_hold: bool = False,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"object lock mode must be one of {', '.join(MODES)} (got {mode!r})")
        if retain_days < 1:
            raise ValueError(f"retain_days must be at least 1 (got {retain_days})")
        self.endpoint = endpoint
        self.bucket = bucket
        prefix = prefix.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.mode = mode
        self.retain_days = retain_days
        self.legal_hold = legal_hold
        self.clock = clock
        # short reads, few retries: the export runs on the audit thread, and a failed pass is
        # retried later anyway
        self._client = minio_client(
            endpoint,
            access_key,
            secret_key,
            secure=secure,
            region=region,
            read_timeout=30.0,
            retries=2,
            pool_size=4,
        )

    @classmethod
    def from_config(cls, section: AuditS3Section) -> ObjectLockExport:
        return cls(
            section.endpoint,
            section.access_key,
            section.secret_key,
            section.bucket,
            secure=section.secure,
            region=section.region,
            prefix=section.prefix,
            mode=section.mode,
            retain_days=section.retain_days,
            legal_hold=section.legal_hold,
        )

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    # ---- errors ----------------------------------------------------------------------------

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (MinioException, HTTPError) as exc:
            if isinstance(exc, S3Error):
                reason = f"{exc.code}: {exc.message} (bucket {self.bucket!r})"
            elif isinstance(exc, MaxRetryError):
                reason = f"unreachable ({exc.reason})"
            else:
                reason = f"{type(exc).__name__}: {exc}"
            raise ExportUnavailable(f"audit export s3 endpoint {self.endpoint}: {reason}") from exc

    def check(self) -> None:
        """Create the bucket with object lock if missing; refuse one without object lock."""
        with self._errors():
            if not self._client.bucket_exists(self.bucket):
                self._client.make_bucket(self.bucket, object_lock=True)
            try:
                self._client.get_object_lock_config(self.bucket)
            except S3Error as exc:
                if exc.code != _NO_LOCK:
                    raise
                raise ExportUnavailable(
                    f"audit export s3 endpoint {self.endpoint}: bucket {self.bucket!r} has no object lock "
                    "(S3 enables it only when a bucket is created: use a new bucket, or let ybyx create it)"
                ) from None

    # ---- ExportTarget ------------------------------------------------------------------------

    def _key(self, name: str) -> str:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad export name {name!r}")
        return self.prefix + name

    def _listing(self, prefix: str) -> dict[str, tuple[list[Object], bool]]:
        """Name -> (its versions, oldest first; whether a delete marker is its latest entry).

        Oldest first by time, ties (same millisecond) broken by the listing order, which S3 gives
        newest first for the versions of one key."""
        real: dict[str, list[Object]] = {}
        deleted: dict[str, bool] = {}
        with self._errors():
            for o in self._client.list_objects(self.bucket, prefix=prefix, include_version=True):
                name = str(o.object_name)[len(self.prefix) :]
                if "/" in name:
                    continue
                if o.is_delete_marker:
                    deleted[name] = deleted.get(name, False) or _is_latest(o)
                else:
                    real.setdefault(name, []).append(o)
        return {
            name: (sorted(reversed(real.get(name, [])), key=_written), deleted.get(name, False))
            for name in real.keys() | deleted.keys()
        }

    def versions(self, name: str) -> list[Object]:
        """The versions stored under ``name`` (delete markers left out), oldest first."""
        return self._listing(self._key(name)).get(name, ([], False))[0]

    def _read(self, name: str, version_id: str | None) -> bytes:
        with self._errors():
            resp = self._client.get_object(self.bucket, self._key(name), version_id=version_id)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

    def retain_until(self) -> datetime:
        return self.clock() + timedelta(days=self.retain_days)

    def put(self, name: str, data: bytes) -> None:
        """Write ``name`` once, locked; the same bytes again are a no-op, other bytes a conflict."""
        original = self.get(name)
        if original is not None:
            if original != data:
                raise ExportConflict(f"{self}{name} exists with other content; not replaced")
            return
        with self._errors():
            self._client.put_object(
                self.bucket,
                self._key(name),
                io.BytesIO(data),
                len(data),
                content_type="application/json" if name.endswith(".json") else "application/octet-stream",
                metadata={SHA256_META: hashlib.sha256(data).hexdigest()},
                retention=Retention(self.mode, self.retain_until()),
                legal_hold=self.legal_hold,
            )

    def get(self, name: str) -> bytes | None:
        """The bytes first written under ``name`` (its oldest version), None if never written."""
        real = [v for v in self.versions(name) if not v.is_delete_marker]
        return self._read(name, real[0].version_id) if real else None

    def names(self) -> list[str]:
        """Every name that has a stored version (also names hidden by a delete marker)."""
        return sorted(name for name, (versions, _) in self._listing(self.prefix).items() if versions)

    def findings(self) -> list[tuple[str, str]]:
        """Names changed after export: ``(name, what)`` for a later version with other bytes or a
        delete marker on top. The locked first version is still there and is what ``get`` reads."""
        out: list[tuple[str, str]] = []
        for name, (versions, deleted) in sorted(self._listing(self.prefix).items()):
            if deleted:
                out.append((name, "was deleted after export (a delete marker hides the locked version)"))
            elif len(versions) > 1:
                first = self._read(name, versions[0].version_id)
                if any(self._read(name, v.version_id) != first for v in versions[1:]):
                    out.append(
                        (name, f"was overwritten after export ({len(versions)} versions with other bytes)")
                    )
        return out

    def retention(self, name: str) -> tuple[str | None, datetime | None, bool]:
        """(mode, retain-until, legal hold) of the locked first version of ``name``."""
        real = [v for v in self.versions(name) if not v.is_delete_marker]
        if not real:
            raise FileNotFoundError(f"{self}{name}: not exported")
        vid = real[0].version_id
        with self._errors():
            ret = self._client.get_object_retention(self.bucket, self._key(name), version_id=vid)
            try:
                hold = self._client.is_object_legal_hold_enabled(self.bucket, self._key(name), version_id=vid)
            except S3Error as exc:
                if exc.code != "NoSuchObjectLegalHold":  # SeaweedFS: never had one = off
                    raise
                hold = False
        return (ret.mode if ret else None), (ret.retain_until_date if ret else None), hold


def _written(o: Object) -> Any:
    return o.last_modified or datetime.min


def _is_latest(o: Object) -> bool:
    return str(o.is_latest).lower() == "true"
