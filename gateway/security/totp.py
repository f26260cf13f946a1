"""TOTP second factor (RFC 6238, pyotp) for admins and public-internet access (R-SE-1).

Secrets are 160-bit base32 (RFC 4226 §4), enrolled when the account is made
(``ybyx admin create-user --role …-admin`` always; ``--totp`` for others) and shown once as an
``otpauth://`` URI for an authenticator app. A code is accepted in the current 30-second step or
the one before (clock drift), and each step once only: the last step used is stored, so a code
seen over a shoulder or in a log cannot be replayed.
"""

from __future__ import annotations

import re
import time

import pyotp

ISSUER = "ybyx"
STEP = 30
_CODE = re.compile(r"^\d{6}$")


def new_secret() -> str:
    return pyotp.random_base32(32)


def provisioning_uri(secret: str, username: str) -> str:
    return pyotp.TOTP(secret).provisioning_uri(name=username, issuer_name=ISSUER)


def matching_step(secret: str, code: str, *, last_step: int | None, now: float | None = None) -> int | None:
    """The time step ``code`` is valid for (now or one step ago), if later than ``last_step``;
    None if the code is wrong, malformed or already used."""
    code = code.strip().replace(" ", "")
    if not _CODE.match(code):
        return None
    at = time.time() if now is None else now
    totp = pyotp.TOTP(secret, interval=STEP)
    current = int(at // STEP)
    for step in (current, current - 1):
        if last_step is not None and step <= last_step:
            continue
        if totp.verify(code, for_time=step * STEP, valid_window=0):
            return step
    return None
