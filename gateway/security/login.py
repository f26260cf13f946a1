"""Logging in: password, second factor, lockout, session (issue 6 §2; R-SE-1, R-SE-16).

:meth:`Logins.login` is the whole decision, in this order:

1. the address is not locked (:class:`AddressLockout`: ``address_lockout_threshold`` failures
   from one address lock it, with the same doubling back-off as accounts);
2. the account is not locked (``users.UserStore.record_failure``);
3. the password is right (argon2id; an unknown user costs the same check);
4. a second factor is given when required — always for admins, for doctors and patients per
   ``mfa_doctors`` / ``mfa_patients`` (``public``: when the address is outside
   ``internal_networks``) — and is a valid, unused TOTP code;
5. a session is made.

Failures are counted against both the account and the address; a wrong TOTP code counts like a
wrong password. The answer to the client never says whether the user exists or which check
failed (``reason`` is for the audit trail only), except "second factor required", given only
after a correct password.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING

from gateway.security.permissions import ADMIN_ROLES, Role
from gateway.security.sessions import NewSession, SessionStore
from gateway.security.users import Lockout, User, UserStore

if TYPE_CHECKING:
    from gateway.archive.catalog import Catalog
    from gateway.config import UsersSection


class Outcome(StrEnum):
    OK = "ok"
    FAILED = "failed"  # wrong user, password or code: one answer for all
    LOCKED = "locked"  # account or address locked: 429 + Retry-After
    MFA_REQUIRED = "mfa_required"  # password right, no code given
    MFA_NOT_ENROLLED = "mfa_not_enrolled"  # a second factor is required but none is enrolled


@dataclass(frozen=True)
class LoginResult:
    outcome: Outcome
    reason: str  # for the audit trail, never for the client
    user: User | None = None
    session: NewSession | None = None
    retry_after: float = 0.0


class AddressLockout:
    """Failed logins per network address, in memory (bounded), with doubling back-off."""

    def __init__(
        self, lockout: Lockout, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000
    ) -> None:
        self.lockout = lockout
        self._clock = clock
        self._max = max_keys
        self._state: OrderedDict[str, tuple[int, float]] = OrderedDict()  # failures, locked until
        self._lock = threading.Lock()

    def _now(self) -> float:
        return self._clock()

    def locked(self, address: str) -> float:
        with self._lock:
            _, until = self._state.get(address, (0, 0.0))
        return max(0.0, until - self._now())

    def failure(self, address: str) -> float:
        with self._lock:
            failures, _ = self._state.pop(address, (0, 0.0))
            failures += 1
            wait = self.lockout.seconds(failures)
            self._state[address] = (failures, self._now() + wait)
            if len(self._state) > self._max:
                self._state.popitem(last=False)
        return wait

    def success(self, address: str) -> None:
        with self._lock:
            self._state.pop(address, None)


class Logins:
    """Users, sessions and the login decision of one node."""

    def __init__(self, catalog: Catalog, cfg: UsersSection) -> None:
        self.cfg = cfg
        self.users = UserStore(
            catalog, Lockout(cfg.lockout_threshold, cfg.lockout_base_seconds, cfg.lockout_max_seconds)
        )
        self.sessions = SessionStore(
            catalog, idle=timedelta(minutes=cfg.idle_minutes), lifetime=timedelta(hours=cfg.session_hours)
        )
        self.addresses = AddressLockout(
            Lockout(cfg.address_lockout_threshold, cfg.lockout_base_seconds, cfg.lockout_max_seconds)
        )
        self._internal = [ipaddress.ip_network(n, strict=False) for n in cfg.internal_networks]

    def is_public(self, address: str) -> bool:
        """True when ``address`` is outside the internal networks (public-internet access)."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return True  # unknown: treat as public (the stricter answer)
        return not any(ip in net for net in self._internal)

    def mfa_required(self, user: User, address: str) -> bool:
        if user.role in ADMIN_ROLES:
            return True
        rule = {Role.DOCTOR: self.cfg.mfa_doctors, Role.PATIENT: self.cfg.mfa_patients}.get(
            user.role, "never"
        )
        if user.role is Role.AUDITOR:
            rule = "always" if user.totp_enrolled else "never"
        return rule == "always" or (rule == "public" and self.is_public(address))

    def _failed(self, username: str, address: str, reason: str, user: User | None = None) -> LoginResult:
        account = self.users.record_failure(username)
        wait = max(account, self.addresses.failure(address))
        if wait:
            return LoginResult(Outcome.LOCKED, f"{reason}; now locked", user, retry_after=wait)
        return LoginResult(Outcome.FAILED, reason, user)

    def login(self, username: str, password: str, code: str | None, address: str) -> LoginResult:
        """The login decision (module docstring); blocking (argon2, database): run in a thread."""
        wait = self.addresses.locked(address)
        if wait:
            return LoginResult(Outcome.LOCKED, "address locked", retry_after=wait)
        known = self.users.get(username)
        if known is not None:
            wait = known.locked(datetime.now(UTC))
            if wait:
                return LoginResult(Outcome.LOCKED, "account locked", known, retry_after=wait)
        user = self.users.check_password(username, password)
        if user is None:
            return self._failed(
                username, address, "unknown user" if known is None else "wrong password", known
            )
        if user.disabled:
            return self._failed(username, address, "account disabled", user)
        mfa = False
        if self.mfa_required(user, address):
            if not user.totp_enrolled:
                return LoginResult(Outcome.MFA_NOT_ENROLLED, "second factor required, none enrolled", user)
            if not code:
                return LoginResult(Outcome.MFA_REQUIRED, "second factor required", user)
            if not self.users.check_totp(user, code):
                return self._failed(username, address, "wrong or reused TOTP code", user)
            mfa = True
        elif code and user.totp_enrolled:
            if not self.users.check_totp(user, code):
                return self._failed(username, address, "wrong or reused TOTP code", user)
            mfa = True
        self.users.record_success(user)
        self.addresses.success(address)
        return LoginResult(Outcome.OK, "ok", user, self.sessions.create(user, source=address, mfa=mfa))
