"""Sealed columns: short sensitive values in the catalog under AES-256-GCM (R-SE-10, issue 6 §5).

Stored objects are sealed by ``gateway/archive/encrypted.py``; this module does the same for the
few catalog columns that hold secrets or personal free text and are never matched in SQL: users'
TOTP secrets and the exam records' patient name, masked ID, description and diagnosis. Everything
QIDO, index or permission lookups match on (pseudonym, hospital, accession, study UID, codes,
times) stays plain.

Key: a *column data key* (random, 256 bits) kept wrapped by the KMS's current KEK in the same
``data_keys`` table as the objects' data keys, under the pseudo blob key :data:`COLUMN_KEY` — so
``ybyx keys rotate`` re-wraps it with the rest, and ``ybyx keys destroy`` of the KEK wrapping it
makes the sealed columns unreadable too (crypto-shredding). A node makes its column key on the
first value it seals; the newest one is used for sealing, every one stays usable for opening.

Format (ASCII, fits a ``VARCHAR``)::

    "ybc1:" | data key id (32 hex) | ":" | base64url(nonce (12) | AES-256-GCM(value) | tag (16))

with associated data ``"ybc1:" | key id | "|" | table "." column "|" | row identity``: a value
copied to another row or column, or relabelled with another key id, fails to open. The row
identity is a natural unique key known before the insert (the user name; hospital/accession).

Values written before encryption was switched on stay plain until ``ybyx keys seal-existing``
seals them (:func:`seal_existing`); reading accepts them meanwhile. A sealed value read with
encryption off is an error, not garbage.
"""

from __future__ import annotations

import base64
import secrets
import threading
import time
import uuid
from typing import TYPE_CHECKING, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select

if TYPE_CHECKING:
    from gateway.archive.catalog import Catalog
    from gateway.archive.encrypted import DataKeys

PREFIX: Final = "ybc1:"
COLUMN_KEY: Final = ":columns"  # the data_keys.blob_key of column keys (no blob key starts with ':')


class ColumnSealError(OSError):
    """A sealed column value that cannot be opened (key destroyed, value moved or altered, or
    encryption switched off); the message names table, column and row, never key material."""


def is_sealed(value: str | None) -> bool:
    return value is not None and value.startswith(PREFIX)


class ColumnCipher:
    """Seal and open column values under the node's column data key (see the module docstring)."""

    def __init__(self, keys: DataKeys, *, cache_seconds: float = 60.0) -> None:
        self.keys = keys
        self._ttl = cache_seconds
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, bytes]] = {}
        self._current: str | None = None

    def _aad(self, key_id: str, table: str, column: str, row: str) -> bytes:
        return f"{PREFIX}{key_id}|{table}.{column}|{row}".encode()

    def _dek(self, key_id: str, where: str) -> bytes:
        with self._lock:
            hit = self._cache.get(key_id)
            if hit is not None and time.monotonic() - hit[0] <= self._ttl:
                return hit[1]
        try:
            dek = self.keys.get(key_id, where)
        except OSError as exc:  # SealError (no row / KEK destroyed) or KmsError
            raise ColumnSealError(str(exc)) from None
        with self._lock:
            self._cache[key_id] = (time.monotonic(), dek)
        return dek

    def _current_key(self) -> tuple[str, bytes]:
        """The newest column key, made (and stored wrapped) if the node has none yet."""
        key_id = self._current
        if key_id is None:
            from gateway.archive.schema import data_keys

            with self.keys.catalog.engine.connect() as conn:
                key_id = conn.execute(
                    select(data_keys.c.dek_id)
                    .where(data_keys.c.blob_key == COLUMN_KEY)
                    .order_by(data_keys.c.id.desc())
                    .limit(1)
                ).scalar()
            if key_id is None:
                key_id = uuid.uuid4().hex
                dek = AESGCM.generate_key(bit_length=256)
                self.keys.add(COLUMN_KEY, key_id, dek)
                with self._lock:
                    self._cache[key_id] = (time.monotonic(), dek)
            self._current = key_id
        return key_id, self._dek(key_id, "column key")

    def seal(self, value: str, *, table: str, column: str, row: str) -> str:
        key_id, dek = self._current_key()
        nonce = secrets.token_bytes(12)
        ct = AESGCM(dek).encrypt(nonce, value.encode(), self._aad(key_id, table, column, row))
        return f"{PREFIX}{key_id}:{base64.urlsafe_b64encode(nonce + ct).decode()}"

    def open(self, value: str, *, table: str, column: str, row: str) -> str:
        where = f"{table}.{column} of {row}"
        body = value[len(PREFIX) :]
        key_id, _, data = body.partition(":")
        try:
            raw = base64.urlsafe_b64decode(data.encode())
        except ValueError:
            raise ColumnSealError(f"{where}: sealed value is malformed") from None
        if len(key_id) != 32 or len(raw) < 28:
            raise ColumnSealError(f"{where}: sealed value is malformed")
        dek = self._dek(key_id, where)
        try:
            plain = AESGCM(dek).decrypt(raw[:12], raw[12:], self._aad(key_id, table, column, row))
        except InvalidTag:
            raise ColumnSealError(
                f"{where}: sealed value fails authentication (altered, or copied from another row)"
            ) from None
        return plain.decode()

    def forget_cached_keys(self) -> None:
        """Drop every cached column key (after a KEK was destroyed in this process)."""
        with self._lock:
            self._cache.clear()
        self._current = None


def cipher_of(catalog: Catalog) -> ColumnCipher | None:
    """The catalog's column cipher: set by ``Archive.open`` when ``[encryption] enabled``."""
    return getattr(catalog, "columns", None)


def seal(catalog: Catalog, value: str, *, table: str, column: str, row: str) -> str:
    """``value`` sealed if encryption is on, else unchanged (behaviour as before)."""
    cipher = cipher_of(catalog)
    return value if cipher is None else cipher.seal(value, table=table, column=column, row=row)


def open_value(catalog: Catalog, value: str, *, table: str, column: str, row: str) -> str:
    """The plaintext of a stored value (plain values from before encryption pass unchanged)."""
    if not is_sealed(value):
        return value
    cipher = cipher_of(catalog)
    if cipher is None:
        raise ColumnSealError(
            f"{table}.{column} of {row}: value is sealed but [encryption] is not enabled on this node"
        )
    return cipher.open(value, table=table, column=column, row=row)


def seal_existing(catalog: Catalog) -> int:
    """Seal every still-plain sealed-column value (``ybyx keys seal-existing``); how many."""
    from sqlalchemy import update

    from gateway.archive.schema import exams, users
    from gateway.exams import SEALED_FIELDS, exam_row_id

    cipher = cipher_of(catalog)
    if cipher is None:
        return 0
    done = 0
    with catalog.engine.connect() as conn:
        plain_users = conn.execute(
            select(users.c.id, users.c.username, users.c.totp_secret).where(
                users.c.totp_secret.is_not(None), users.c.totp_secret.not_like(PREFIX + "%")
            )
        ).all()
    for u in plain_users:
        sealed = cipher.seal(u.totp_secret, table="users", column="totp_secret", row=u.username)
        with catalog.write() as conn:
            conn.execute(
                update(users)
                .where(users.c.id == u.id, users.c.totp_secret == u.totp_secret)
                .values(totp_secret=sealed)
            )
        done += 1
    last = 0
    while True:
        with catalog.engine.connect() as conn:
            rows = conn.execute(
                select(
                    exams.c.id,
                    exams.c.hospital_code,
                    exams.c.accession_number,
                    exams.c.updated_at,
                    *[exams.c[f] for f in SEALED_FIELDS],
                )
                .where(exams.c.id > last)
                .order_by(exams.c.id)
                .limit(500)
            ).all()
        if not rows:
            return done + seal_existing_index_records(catalog)
        last = int(rows[-1].id)
        sealed_rows = [
            (
                r,
                {
                    f: cipher.seal(r._mapping[f], table="exams", column=f, row=exam_row_id(r._mapping))
                    for f in SEALED_FIELDS
                    if not is_sealed(r._mapping[f])
                },
            )
            for r in rows
        ]  # sealed before the write transaction (sealing may store the column key)
        with catalog.write() as conn:
            for r, values in sealed_rows:
                if values:
                    # only if the record did not change meanwhile (it is then sealed already)
                    conn.execute(
                        update(exams)
                        .where(exams.c.id == r.id, exams.c.updated_at == r.updated_at)
                        .values(**values)
                    )
                    done += len(values)


def seal_existing_index_records(catalog: Catalog, *, batch: int = 500) -> int:
    """Seal the national index's still-plain report text (``index/records.py``: description and
    diagnosis, bound to the Study Instance UID); how many values. Run by ``seal-existing`` and at
    every start of an index with ``[encryption] enabled`` (the data migration of R-SE-10)."""
    from sqlalchemy import or_, update

    from gateway.archive.schema import index_records

    cipher = cipher_of(catalog)
    if cipher is None:
        return 0
    fields = ("description", "diagnosis")
    c = index_records.c
    done = last = 0
    while True:
        with catalog.engine.connect() as conn:
            rows = conn.execute(
                select(c.id, c.study_uid, c.updated_at, *[c[f] for f in fields])
                .where(c.id > last, or_(*[c[f].not_like(PREFIX + "%") for f in fields]))
                .order_by(c.id)
                .limit(batch)
            ).all()
        if not rows:
            return done
        last = int(rows[-1].id)
        sealed_rows = [
            (
                r,
                {
                    f: cipher.seal(r._mapping[f], table="index_records", column=f, row=r.study_uid)
                    for f in fields
                    if not is_sealed(r._mapping[f])
                },
            )
            for r in rows
        ]  # sealed before the write transaction (sealing may store the column key)
        with catalog.write() as conn:
            for r, values in sealed_rows:
                # only if the record did not change meanwhile (a re-registration seals it anyway)
                result = conn.execute(
                    update(index_records).where(c.id == r.id, c.updated_at == r.updated_at).values(**values)
                )
                done += len(values) if result.rowcount else 0
