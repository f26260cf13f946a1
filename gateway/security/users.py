"""User accounts in the catalog (issue 6 §2; R-SE-1, R-SE-2).

There is no default account: the first system administrator is made on the command line
(``ybyx admin create-user``), with a password typed twice or generated and shown once. Accounts
have one :class:`~gateway.security.permissions.Role`; institution administrators and doctors
belong to an institution (the code the front-end's ``institution`` and its peers' use), patients
may carry their pseudonym (``person_key``, as in exam records) to see their own studies.

Failed logins lock the account with back-off (:meth:`UserStore.record_failure`): after
``lockout_threshold`` failures in a row, ``lockout_base_seconds``, doubling with each further
failure up to ``lockout_max_seconds``; a successful login resets the count. Locked or not, a wrong
password costs one argon2id check, and an unknown user name costs the same (timing tells nothing).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from gateway.archive.catalog import Catalog
from gateway.archive.schema import users
from gateway.security import columns, passwords, totp
from gateway.security.permissions import ADMIN_ROLES, INSTITUTION_ROLES, Role

USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@\-]{2,63}$")
INSTITUTION = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
log = logging.getLogger(__name__)


class UserError(ValueError):
    """An account that cannot be made or changed; the message says why."""


@dataclass(frozen=True)
class User:
    id: int
    username: str
    role: Role
    institution: str
    person_key: str | None
    totp_enrolled: bool
    failed_logins: int
    locked_until: datetime | None
    disabled: bool

    def locked(self, now: datetime) -> float:
        """Seconds the account stays locked (0 if it is not)."""
        if self.locked_until is None:
            return 0.0
        until = self.locked_until if self.locked_until.tzinfo else self.locked_until.replace(tzinfo=UTC)
        return max(0.0, (until - now).total_seconds())


@dataclass(frozen=True)
class Lockout:
    threshold: int = 5
    base_seconds: float = 60.0
    max_seconds: float = 3600.0

    def seconds(self, failures: int) -> float:
        """How long ``failures`` failures in a row lock for (0 below the threshold)."""
        if failures < self.threshold:
            return 0.0
        return float(min(self.max_seconds, self.base_seconds * 2 ** (failures - self.threshold)))


def _user(row: object) -> User:
    r = row
    return User(
        id=r.id,  # type: ignore[attr-defined]
        username=r.username,  # type: ignore[attr-defined]
        role=Role(r.role),  # type: ignore[attr-defined]
        institution=r.institution,  # type: ignore[attr-defined]
        person_key=r.person_key,  # type: ignore[attr-defined]
        totp_enrolled=r.totp_secret is not None,  # type: ignore[attr-defined]
        failed_logins=r.failed_logins,  # type: ignore[attr-defined]
        locked_until=r.locked_until,  # type: ignore[attr-defined]
        disabled=r.disabled_at is not None,  # type: ignore[attr-defined]
    )


class UserStore:
    """The ``users`` table."""

    def __init__(self, catalog: Catalog, lockout: Lockout | None = None) -> None:
        self.catalog = catalog
        self.lockout = lockout or Lockout()

    def create(
        self,
        username: str,
        role: Role | str,
        password: str,
        *,
        institution: str = "",
        person_key: str | None = None,
        with_totp: bool = False,
    ) -> tuple[User, str | None]:
        """Make an account; returns it and its TOTP secret (enrolled always for admin roles, else if
        ``with_totp``) to be shown once. :class:`UserError` or ``passwords.WeakPassword`` if not."""
        if not USERNAME.match(username):
            raise UserError(f"user name {username!r}: 3-64 letters, digits, '.', '_', '-', '@'")
        try:
            role = Role(role)
        except ValueError:
            raise UserError(f"role {role!r}: one of {', '.join(r.value for r in Role)}") from None
        if role in INSTITUTION_ROLES and not institution:
            raise UserError(f"a {role} belongs to an institution: give --institution")
        if institution and not INSTITUTION.match(institution):
            raise UserError(f"institution {institution!r}: 1-64 letters, digits, '.', '_', '-'")
        if person_key is not None and not re.fullmatch(r"[0-9a-f]{64}", person_key):
            raise UserError("person key: 64 hex digits (the pseudonym of exam records)")
        passwords.check_strength(password, username=username)
        secret = totp.new_secret() if (role in ADMIN_ROLES or with_totp) else None
        now = datetime.now(UTC)
        stored = self._seal(secret, username)  # before the write: it may store the column key
        try:
            with self.catalog.write() as conn:
                pk = conn.execute(
                    users.insert().values(
                        username=username,
                        role=role.value,
                        institution=institution,
                        person_key=person_key,
                        password_hash=passwords.hash_password(password),
                        password_set_at=now,
                        totp_secret=stored,
                        failed_logins=0,
                        created_at=now,
                    )
                ).inserted_primary_key
        except IntegrityError:
            raise UserError(f"user {username!r} exists") from None
        assert pk is not None
        return User(
            int(pk[0]), username, role, institution, person_key, secret is not None, 0, None, False
        ), secret

    def _seal(self, secret: str | None, username: str) -> str | None:
        """The TOTP secret as stored: sealed to its user's row when encryption is on (R-SE-10)."""
        if secret is None:
            return None
        return columns.seal(self.catalog, secret, table="users", column="totp_secret", row=username)

    def get(self, username: str) -> User | None:
        with self.catalog.engine.connect() as conn:
            row = conn.execute(select(users).where(users.c.username == username)).first()
        return None if row is None else _user(row)

    def by_id(self, user_pk: int) -> User | None:
        with self.catalog.engine.connect() as conn:
            row = conn.execute(select(users).where(users.c.id == user_pk)).first()
        return None if row is None else _user(row)

    def list(self) -> list[User]:
        with self.catalog.engine.connect() as conn:
            return [_user(r) for r in conn.execute(select(users).order_by(users.c.id))]

    def check_password(self, username: str, password: str) -> User | None:
        """The active account if the password is right; one argon2 check either way."""
        with self.catalog.engine.connect() as conn:
            row = conn.execute(select(users).where(users.c.username == username)).first()
        if row is None:
            passwords.verify(passwords.dummy_hash(), password)
            return None
        if not passwords.verify(row.password_hash, password):
            return None
        if passwords.needs_rehash(row.password_hash):
            with self.catalog.write() as conn:
                conn.execute(
                    update(users)
                    .where(users.c.id == row.id)
                    .values(password_hash=passwords.hash_password(password))
                )
        return _user(row)

    def check_totp(self, user: User, code: str) -> bool:
        """A valid, unused code for the user's enrolled secret; the step is then spent."""
        with self.catalog.write() as conn:
            row = conn.execute(
                select(users.c.totp_secret, users.c.totp_last_step).where(users.c.id == user.id)
            ).first()
            if row is None or row.totp_secret is None:
                return False
            try:
                secret = columns.open_value(
                    self.catalog, row.totp_secret, table="users", column="totp_secret", row=user.username
                )
            except columns.ColumnSealError as exc:
                # R-SE-10: a shredded or moved secret refuses the login; it must not crash it
                log.error("TOTP check for %s: %s", user.username, exc)
                return False
            step = totp.matching_step(secret, code, last_step=row.totp_last_step)
            if step is None:
                return False
            conn.execute(update(users).where(users.c.id == user.id).values(totp_last_step=step))
        return True

    def record_failure(self, username: str, now: datetime | None = None) -> float:
        """Count a failed login of an existing account; the seconds it is now locked for."""
        now = now or datetime.now(UTC)
        with self.catalog.write() as conn:
            row = conn.execute(
                select(users.c.id, users.c.failed_logins).where(users.c.username == username)
            ).first()
            if row is None:
                return 0.0
            failures = row.failed_logins + 1
            lock = self.lockout.seconds(failures)
            conn.execute(
                update(users)
                .where(users.c.id == row.id)
                .values(failed_logins=failures, locked_until=now + timedelta(seconds=lock) if lock else None)
            )
        return lock

    def record_success(self, user: User, now: datetime | None = None) -> None:
        with self.catalog.write() as conn:
            conn.execute(
                update(users)
                .where(users.c.id == user.id)
                .values(failed_logins=0, locked_until=None, last_login_at=now or datetime.now(UTC))
            )

    def set_password(self, username: str, password: str) -> None:
        passwords.check_strength(password, username=username)
        with self.catalog.write() as conn:
            done = conn.execute(
                update(users)
                .where(users.c.username == username)
                .values(
                    password_hash=passwords.hash_password(password),
                    password_set_at=datetime.now(UTC),
                    failed_logins=0,
                    locked_until=None,
                )
            ).rowcount
        if not done:
            raise UserError(f"no user {username!r}")

    def enroll_totp(self, username: str) -> str:
        """A new TOTP secret for the account (replacing any), to be shown once."""
        secret = totp.new_secret()
        stored = self._seal(secret, username)
        with self.catalog.write() as conn:
            done = conn.execute(
                update(users)
                .where(users.c.username == username)
                .values(totp_secret=stored, totp_last_step=None)
            ).rowcount
        if not done:
            raise UserError(f"no user {username!r}")
        return secret

    def disable(self, username: str) -> bool:
        with self.catalog.write() as conn:
            return bool(
                conn.execute(
                    update(users)
                    .where(users.c.username == username, users.c.disabled_at.is_(None))
                    .values(disabled_at=datetime.now(UTC))
                ).rowcount
            )
