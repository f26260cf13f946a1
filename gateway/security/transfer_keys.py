"""Transfer keys per institution (R-CE-2, issue 6 §5): what one institution uploads is sealed under
a key of its own, so its data can be re-keyed or shredded without touching anyone else's.

R-CE-2 asks the sharing center to manage "transfer encryption keys per institution: generate,
modify, delete". Here an institution's *transfer key* is a 256-bit key made by the node (never by
the institution, never sent anywhere), kept wrapped by the node's KEK in ``data_keys`` (pseudo
blob key ``:transfer:<institution>``), so a KEK rotation re-wraps it like any data key. The data
key of every object an institution's client uploads (``ybyx clients add … --institution CODE``,
STOW-RS at the center) is wrapped by that institution's transfer key instead of the KEK: its
``data_keys.kek_id`` reads ``itk:<transfer key id>``. Envelope chain::

    object ──AES-256-GCM── data key ──wrapped by── institution transfer key ──wrapped by── KEK (KMS)

* ``ybyx keys generate --purpose transfer --institution CODE`` makes the institution's first key;
  uploads made before it (or by clients without an institution) stay under the KEK.
* ``ybyx keys rotate --purpose transfer --institution CODE`` ("modify") makes a new key and
  re-wraps every data key of the institution under it (objects are not rewritten); the previous
  key is kept retired until the next rotation (an upload racing the rotation may still use it),
  which removes retired keys nothing depends on any more.
* ``ybyx keys destroy --purpose transfer --institution CODE`` ("delete") removes every key of the
  institution: its objects become unreadable for good, every other institution's stay readable.
  Later uploads of that institution fall back to the KEK until a new key is generated.

Everything the KMS interface promises holds: the transfer keys never leave the node in clear, are
never logged (only their ids), and every operation is audited by the CLI (``key-operation``).
"""

from __future__ import annotations

import base64
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import func, insert, select, update

from gateway.archive.schema import data_keys
from gateway.security.envelope import KeyGone, SealError
from gateway.security.kms import KeyDestroyed, Kms, KmsError

if TYPE_CHECKING:
    from gateway.archive.catalog import Catalog

ITK: Final = "itk:"  # data_keys.kek_id prefix of a data key wrapped by a transfer key
TOMBSTONE: Final = "destroyed"  # data_keys.kek_id of a destroyed transfer key (material gone)
BLOB_PREFIX: Final = ":transfer:"  # data_keys.blob_key of an institution's transfer keys

_UPLOADER: ContextVar[str | None] = ContextVar("ybyx_uploading_institution", default=None)


@contextmanager
def uploading_for(institution: str | None) -> Iterator[None]:
    """Objects stored inside this block are the upload of ``institution`` (None: no institution)."""
    token = _UPLOADER.set(institution or None)
    try:
        yield
    finally:
        _UPLOADER.reset(token)


def current_institution() -> str | None:
    return _UPLOADER.get()


def _kek_context(institution: str, key_id: str) -> bytes:
    """What the KEK wrap of a transfer key is bound to: its id, as for any data key in the table
    (``encrypted._context``), so a KEK rotation re-wraps it with the rest. The data keys under it
    name the key id, not the institution: relabelling the row changes nobody's access."""
    return b"|ybyx-dek|" + key_id.encode()


def _dek_context(dek_id: str, key_id: str) -> bytes:
    return f"|ybyx-dek|{dek_id}|{key_id}".encode()


@dataclass(frozen=True)
class TransferKeyInfo:
    institution: str
    key_id: str
    state: str  # active | retired | destroyed
    created: datetime
    objects: int  # data keys it wraps


class TransferKeys:
    """The institutions' transfer keys of one node (see the module docstring)."""

    def __init__(self, catalog: Catalog, kms: Kms, *, cache_seconds: float = 5.0) -> None:
        self.catalog = catalog
        self.kms = kms
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, str, bytes]] = {}  # key id -> (time, institution, key)

    # ---- keys ------------------------------------------------------------------------------

    def _rows(self, institution: str | None = None) -> list[Any]:
        c = data_keys.c
        stmt = select(c.id, c.dek_id, c.blob_key, c.kek_id, c.wrapped, c.created_at).where(
            c.blob_key.like(BLOB_PREFIX + "%")
        )
        if institution is not None:
            stmt = stmt.where(c.blob_key == BLOB_PREFIX + institution)
        with self.catalog.engine.connect() as conn:
            return list(conn.execute(stmt.order_by(c.id)).all())

    def _open(self, row: Any, where: str) -> bytes:
        institution = row.blob_key[len(BLOB_PREFIX) :]
        key_id: str = row.dek_id
        if row.kek_id == TOMBSTONE:
            raise KeyGone(
                f"{where}: unreadable, the transfer key {key_id} of institution {institution} was destroyed"
            )
        try:
            key = self.kms.unwrap(
                row.kek_id,
                base64.b64decode(row.wrapped),
                _kek_context(institution, key_id),
            )
        except KeyDestroyed as exc:
            raise KeyGone(f"{where}: unreadable, {exc}") from None
        with self._lock:
            self._cache[key_id] = (time.monotonic(), institution, key)
        return key

    def _key(self, key_id: str, where: str) -> bytes:
        with self._lock:
            hit = self._cache.get(key_id)
        if hit is not None and time.monotonic() - hit[0] <= self.cache_seconds:
            return hit[2]
        with self.catalog.engine.connect() as conn:
            row = conn.execute(
                select(
                    data_keys.c.dek_id, data_keys.c.blob_key, data_keys.c.kek_id, data_keys.c.wrapped
                ).where(data_keys.c.dek_id == key_id, data_keys.c.blob_key.like(BLOB_PREFIX + "%"))
            ).first()
        if row is None:
            raise KeyGone(f"{where}: its transfer key {key_id} is not in the catalog (destroyed)")
        return self._open(row, where)

    def active(self, institution: str) -> str | None:
        """The id of the institution's newest live transfer key (None: it has none)."""
        live = [r for r in self._rows(institution) if r.kek_id != TOMBSTONE]
        return str(live[-1].dek_id) if live else None

    # ---- wrapping data keys ----------------------------------------------------------------

    def wrap(self, dek_id: str, dek: bytes) -> tuple[str, str] | None:
        """(kek_id, wrapped) for a data key stored inside :func:`uploading_for` an institution with
        a transfer key; None otherwise (the caller wraps it with the KEK)."""
        institution = current_institution()
        if institution is None:
            return None
        key_id = self.active(institution)
        if key_id is None:
            return None
        key = self._key(key_id, f"transfer key of {institution}")
        nonce = secrets.token_bytes(12)
        wrapped = nonce + AESGCM(key).encrypt(nonce, dek, _dek_context(dek_id, key_id))
        return ITK + key_id, base64.b64encode(wrapped).decode()

    def unwrap(self, kek_id: str, wrapped: str, dek_id: str, where: str) -> bytes:
        key_id = kek_id[len(ITK) :]
        raw = base64.b64decode(wrapped)
        try:
            return AESGCM(self._key(key_id, where)).decrypt(raw[:12], raw[12:], _dek_context(dek_id, key_id))
        except InvalidTag:
            raise SealError(f"{where}: its wrapped data key does not open (altered or another key)") from None

    # ---- lifecycle (R-CE-2: generate, modify, delete) --------------------------------------

    def generate(self, institution: str) -> str:
        """A new transfer key for ``institution``, made its active one; its id."""
        key_id = uuid.uuid4().hex
        kek = self.kms.active()
        key = AESGCM.generate_key(bit_length=256)
        wrapped = base64.b64encode(self.kms.wrap(kek, key, _kek_context(institution, key_id))).decode()
        with self.catalog.write() as conn:
            conn.execute(
                insert(data_keys).values(
                    dek_id=key_id,
                    blob_key=BLOB_PREFIX + institution,
                    kek_id=kek,
                    wrapped=wrapped,
                    created_at=datetime.now(UTC),
                )
            )
        return key_id

    def rotate(self, institution: str, *, batch: int = 500) -> tuple[str, int, int]:
        """A new key for ``institution`` and every data key of it re-wrapped under that key (no
        object rewritten); retired keys nothing depends on any more are removed. (new key id,
        data keys re-wrapped, retired keys removed)."""
        before = [r for r in self._rows(institution) if r.kek_id != TOMBSTONE]
        if not before:
            raise KmsError(f"institution {institution} has no transfer key (ybyx keys generate first)")
        new_id = self.generate(institution)
        new_key = self._key(new_id, f"transfer key of {institution}")
        old_ids = [ITK + str(r.dek_id) for r in before]
        c = data_keys.c
        done = last = 0
        while True:
            with self.catalog.engine.connect() as conn:
                rows = conn.execute(
                    select(c.id, c.dek_id, c.kek_id, c.wrapped)
                    .where(c.kek_id.in_(old_ids), c.id > last)
                    .order_by(c.id)
                    .limit(batch)
                ).all()
            if not rows:
                break
            last = int(rows[-1].id)
            updates = []
            for r in rows:
                dek = self.unwrap(r.kek_id, r.wrapped, r.dek_id, f"data key {r.dek_id}")
                nonce = secrets.token_bytes(12)
                sealed = nonce + AESGCM(new_key).encrypt(nonce, dek, _dek_context(r.dek_id, new_id))
                updates.append((int(r.id), r.kek_id, base64.b64encode(sealed).decode()))
            now = datetime.now(UTC)
            with self.catalog.write() as conn:
                for row_id, old, wrapped in updates:
                    conn.execute(
                        update(data_keys)
                        .where(c.id == row_id, c.kek_id == old)
                        .values(kek_id=ITK + new_id, wrapped=wrapped, rewrapped_at=now)
                    )
            done += len(updates)
        # keys retired by an earlier rotation: any upload racing that one has been re-wrapped now
        pruned = 0
        for r in before[:-1]:
            if self._dependents(str(r.dek_id)) == 0:
                self._tombstone(str(r.dek_id))
                pruned += 1
        return new_id, done, pruned

    def _dependents(self, key_id: str) -> int:
        with self.catalog.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).select_from(data_keys).where(data_keys.c.kek_id == ITK + key_id)
                ).scalar_one()
            )

    def _tombstone(self, key_id: str) -> None:
        with self.catalog.write() as conn:
            conn.execute(
                update(data_keys)
                .where(data_keys.c.dek_id == key_id)
                .values(kek_id=TOMBSTONE, wrapped="", rewrapped_at=datetime.now(UTC))
            )
        with self._lock:
            self._cache.pop(key_id, None)

    def destroy(self, institution: str) -> tuple[list[str], int]:
        """Destroy every transfer key of ``institution``: its objects become unreadable for good.
        (key ids destroyed, data keys now unreadable)."""
        live = [str(r.dek_id) for r in self._rows(institution) if r.kek_id != TOMBSTONE]
        if not live:
            raise KmsError(f"institution {institution} has no transfer key to destroy")
        lost = sum(self._dependents(k) for k in live)
        for key_id in live:
            self._tombstone(key_id)
        return live, lost

    def forget_cached_keys(self) -> None:
        with self._lock:
            self._cache.clear()

    def list(self) -> list[TransferKeyInfo]:
        rows = self._rows()
        newest: dict[str, str] = {}
        for r in rows:
            if r.kek_id != TOMBSTONE:
                newest[r.blob_key] = r.dek_id
        out = []
        for r in rows:
            key_id = str(r.dek_id)
            if r.kek_id == TOMBSTONE:
                state = "destroyed"
            else:
                state = "active" if newest.get(r.blob_key) == key_id else "retired"
            institution = str(r.blob_key)[len(BLOB_PREFIX) :]
            out.append(TransferKeyInfo(institution, key_id, state, r.created_at, self._dependents(key_id)))
        return out
