"""User passwords: argon2id hashes, a strength policy and a common-password blocklist (R-SE-1).

No default or weak passwords (R-SE-1): :func:`check_strength` refuses a password shorter than
:data:`MIN_LENGTH`, with fewer than three of the four character classes (the MLPS level-3 habit),
one that contains the user name, one made of a single repeated or sequential run, and any on the
blocklist ``data/common-passwords.txt`` (case-insensitively, also with trailing digits and
symbols removed, so ``Password2024!`` is refused as ``password``). :func:`generate` makes a
password that passes, to be shown once.

Hashes use argon2id with RFC 9106's second recommended parameter set (t=3, 64 MiB), stronger than
the client-secret hashes (``clients.SECRET_HASHER``): a person's password can be guessed, a
256-bit client secret cannot. A hash made with older parameters is re-hashed at the next login
(:func:`needs_rehash`).
"""

from __future__ import annotations

import secrets
import string
from functools import lru_cache
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

MIN_LENGTH = 12
MAX_LENGTH = 128  # argon2 takes any length; a bound stops megabyte "passwords" costing CPU
BLOCKLIST_FILE = Path(__file__).with_name("data") / "common-passwords.txt"
# RFC 9106 §4 second recommendation: argon2id, t=3, m=64 MiB, p=4 (~100 ms here).
HASHER = PasswordHasher(time_cost=3, memory_cost=65536, parallelism=4)
_SEQUENCES = ("0123456789", "abcdefghijklmnopqrstuvwxyz", "qwertyuiopasdfghjklzxcvbnm")


class WeakPassword(ValueError):
    """A password the policy refuses; the message says why (safe to show the user)."""


@lru_cache(maxsize=1)
def blocklist() -> frozenset[str]:
    lines = BLOCKLIST_FILE.read_text(encoding="utf-8").splitlines()
    return frozenset(w.strip().lower() for w in lines if w.strip() and not w.startswith("#"))


def _classes(password: str) -> int:
    return sum(
        (
            any(c.islower() for c in password),
            any(c.isupper() for c in password),
            any(c.isdigit() for c in password),
            any(not c.isalnum() for c in password),
        )
    )


def _is_run(text: str) -> bool:
    """One character repeated, or a stretch of a sequence (forwards or backwards)."""
    if len(set(text)) <= 2:
        return True
    return any(text in seq or text in seq[::-1] for seq in _SEQUENCES)


def check_strength(password: str, *, username: str = "") -> None:
    """Raise :class:`WeakPassword` if ``password`` breaks the policy (module docstring)."""
    if len(password) < MIN_LENGTH:
        raise WeakPassword(f"at least {MIN_LENGTH} characters are needed (got {len(password)})")
    if len(password) > MAX_LENGTH:
        raise WeakPassword(f"at most {MAX_LENGTH} characters")
    if _classes(password) < 3:
        raise WeakPassword("use at least three of: lower case, upper case, digits, symbols")
    lowered = password.lower()
    if username and len(username) >= 3 and username.lower() in lowered:
        raise WeakPassword("the password must not contain the user name")
    core = lowered.rstrip(string.digits + string.punctuation + " ")
    words = blocklist()
    if lowered in words or core in words or _is_run(core or lowered):
        raise WeakPassword("this password is too common (it is on the blocklist of common passwords)")


def generate(length: int = 20) -> str:
    """A random password that passes :func:`check_strength` (letters, digits, a few symbols)."""
    alphabet = string.ascii_letters + string.digits + "-_.!@#%+="
    while True:
        candidate = "".join(secrets.choice(alphabet) for _ in range(length))
        if _classes(candidate) == 4:
            try:
                check_strength(candidate)
            except WeakPassword:
                continue
            return candidate


def hash_password(password: str) -> str:
    return HASHER.hash(password)


def verify(stored_hash: str, password: str) -> bool:
    """Constant-time check (argon2); False for a wrong password or an unreadable hash."""
    if len(password) > MAX_LENGTH:
        return False
    try:
        return HASHER.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(stored_hash: str) -> bool:
    return HASHER.check_needs_rehash(stored_hash)


@lru_cache(maxsize=1)
def dummy_hash() -> str:
    """A hash to check against when the user does not exist, so timing tells no user names."""
    return HASHER.hash(secrets.token_urlsafe(16))
