"""Login sessions: cookies for pages, short-lived JWTs for APIs (issue 6 §2; R-SE-1, R-SE-16).

A session starts at a successful login and ends at logout, after ``idle_minutes`` without a
request, or ``session_hours`` after login, whichever comes first. Pages carry it in the cookie
:data:`COOKIE` (``__Host-`` prefix: ``Secure``, ``Path=/``, no ``Domain``; ``HttpOnly``;
``SameSite=Strict``). A cookie-authenticated request that changes anything (any method but GET,
HEAD, OPTIONS) must also send the session's CSRF token in :data:`CSRF_HEADER` (synchronizer token:
the server keeps its hash; it is handed out at login and in the readable :data:`CSRF_COOKIE`).
APIs use a bearer JWT from the node's token issuer (``POST /auth/login`` or ``/auth/token``),
carrying ``role``, ``institution`` and ``sid``: the guard accepts it only while its session is
active, so logout ends the cookie and every token of the session at once.

Only hashes are stored: the cookie secret and CSRF token as SHA-256 (they are 256-bit random, so
a plain hash suffices), so a copied database yields no usable session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update

from gateway.archive.catalog import Catalog
from gateway.archive.schema import user_sessions, users
from gateway.security.users import User, _user

COOKIE = "__Host-ybyx_session"
CSRF_COOKIE = "__Host-ybyx_csrf"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_TOUCH_EVERY = timedelta(seconds=60)  # last_seen is written at most once a minute per session


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo else at.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Session:
    session_id: str
    user: User
    mfa: bool
    expires_at: datetime
    csrf_hash: str

    def csrf_ok(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(_digest(token), self.csrf_hash)


@dataclass(frozen=True)
class NewSession:
    session: Session
    cookie_secret: str  # goes into the cookie, never stored
    csrf_token: str  # given to the page, never stored


class SessionStore:
    """The ``user_sessions`` table."""

    def __init__(self, catalog: Catalog, *, idle: timedelta, lifetime: timedelta) -> None:
        self.catalog = catalog
        self.idle = idle
        self.lifetime = lifetime

    def create(self, user: User, *, source: str, mfa: bool, now: datetime | None = None) -> NewSession:
        now = now or datetime.now(UTC)
        secret, csrf, sid = secrets.token_urlsafe(32), secrets.token_urlsafe(32), secrets.token_urlsafe(24)
        expires = now + self.lifetime
        with self.catalog.write() as conn:
            conn.execute(
                user_sessions.insert().values(
                    session_id=sid,
                    secret_hash=_digest(secret),
                    csrf_hash=_digest(csrf),
                    user_pk=user.id,
                    source=source[:256],
                    mfa=int(mfa),
                    created_at=now,
                    last_seen_at=now,
                    expires_at=expires,
                )
            )
        return NewSession(Session(sid, user, mfa, expires, _digest(csrf)), secret, csrf)

    def by_cookie(self, secret: str, now: datetime | None = None) -> Session | None:
        return self._active(user_sessions.c.secret_hash == _digest(secret), now)

    def by_id(self, session_id: str, now: datetime | None = None) -> Session | None:
        return self._active(user_sessions.c.session_id == session_id, now)

    def _active(self, where: object, now: datetime | None) -> Session | None:
        """The session if it is neither revoked, expired, idle too long, nor its user disabled."""
        now = now or datetime.now(UTC)
        query = (
            select(user_sessions, users)
            .select_from(user_sessions.join(users, users.c.id == user_sessions.c.user_pk))
            .where(where)  # type: ignore[arg-type]
        )
        with self.catalog.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None or row.revoked_at is not None or row.disabled_at is not None:
            return None
        seen = _aware(row.last_seen_at)
        if _aware(row.expires_at) <= now or seen + self.idle <= now:
            return None
        user_row = {c.name: row._mapping[users.c[c.name]] for c in users.columns}
        session = Session(
            row.session_id, _user(_Row(user_row)), bool(row.mfa), _aware(row.expires_at), row.csrf_hash
        )
        if now - seen >= _TOUCH_EVERY:
            with self.catalog.write() as conn:
                conn.execute(
                    update(user_sessions)
                    .where(user_sessions.c.session_id == row.session_id)
                    .values(last_seen_at=now)
                )
        return session

    def revoke(self, session_id: str) -> bool:
        with self.catalog.write() as conn:
            return bool(
                conn.execute(
                    update(user_sessions)
                    .where(user_sessions.c.session_id == session_id, user_sessions.c.revoked_at.is_(None))
                    .values(revoked_at=datetime.now(UTC))
                ).rowcount
            )

    def revoke_all(self, user: User) -> int:
        with self.catalog.write() as conn:
            return int(
                conn.execute(
                    update(user_sessions)
                    .where(user_sessions.c.user_pk == user.id, user_sessions.c.revoked_at.is_(None))
                    .values(revoked_at=datetime.now(UTC))
                ).rowcount
            )


class _Row:
    """Attribute access over a mapping (the joined row's user columns)."""

    def __init__(self, values: dict[str, object]) -> None:
        self.__dict__.update(values)
