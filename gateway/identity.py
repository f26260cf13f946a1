"""Who a patient is to the insurance cloud: ID type + ID number, validated, and its pseudonym.

R-UP-5 (exam basic information carries 证件类型 / 证件号码), R-SE-8 (personal data minimised):
the raw ID number is checked here and then replaced by a keyed hash (HMAC-SHA-256 under a managed
key, ARCHITECTURE "Identity") and a masked form for display; nothing downstream stores it in clear.
The national key management and the index record key arrive with issue 5.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from datetime import date
from enum import StrEnum
from pathlib import Path


class IdType(StrEnum):
    """证件类型 accepted at the upload interface."""

    RESIDENT_ID = "resident-id"  # 居民身份证, 18 characters, ISO 7064 MOD 11-2 check character
    PASSPORT = "passport"  # 护照
    HK_MACAO_PERMIT = "hk-macao-permit"  # 港澳居民来往内地通行证 (H/M + 8 or 10 digits)
    TAIWAN_PERMIT = "taiwan-permit"  # 台湾居民来往大陆通行证 (8 or 10 digits)
    FOREIGNER_PERMANENT = "foreigner-permanent"  # 外国人永久居留身份证 (15 or 18 characters)


class InvalidId(ValueError):
    """An ID number that cannot be right; the message says why (for a 422 naming the field)."""


_WEIGHTS = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
_CHECK = "10X98765432"


def resident_id_check(first17: str) -> str:
    """The ISO 7064 MOD 11-2 check character of a resident ID's first 17 digits (GB 11643)."""
    total = sum(int(d) * w for d, w in zip(first17, _WEIGHTS, strict=True))
    return _CHECK[total % 11]


def normalise(id_type: IdType, number: str) -> str:
    """The canonical form of an ID number (upper case, no spaces), or :class:`InvalidId`."""
    value = re.sub(r"\s+", "", number).upper()
    if not value:
        raise InvalidId("is empty")
    if id_type is IdType.RESIDENT_ID:
        if not re.fullmatch(r"\d{17}[\dX]", value):
            raise InvalidId("a resident ID has 17 digits and a digit or X")
        try:
            date(int(value[6:10]), int(value[10:12]), int(value[12:14]))
        except ValueError:
            raise InvalidId(f"birth date {value[6:14]} in the resident ID is not a date") from None
        if resident_id_check(value[:17]) != value[17]:
            raise InvalidId("check character does not match (ISO 7064 MOD 11-2)")
    elif id_type is IdType.HK_MACAO_PERMIT:
        if not re.fullmatch(r"[HM]\d{8}(\d{2})?", value):
            raise InvalidId("a Hong Kong/Macao permit is H or M followed by 8 or 10 digits")
    elif id_type is IdType.TAIWAN_PERMIT:
        if not re.fullmatch(r"\d{8}(\d{2})?", value):
            raise InvalidId("a Taiwan permit has 8 or 10 digits")
    elif id_type is IdType.FOREIGNER_PERMANENT:
        if not re.fullmatch(r"[A-Z]{3}\d{12}|\d{17}[\dX]", value):
            raise InvalidId("a permanent residence card has 15 (3 letters + 12 digits) or 18 characters")
    elif not re.fullmatch(r"[A-Z0-9]{5,20}", value):
        raise InvalidId("a passport number has 5-20 letters and digits")
    return value


def mask(number: str) -> str:
    """A display form that does not identify: the first 4 and last 4 characters kept."""
    return number if len(number) <= 8 else f"{number[:4]}{'*' * (len(number) - 8)}{number[-4:]}"


def person_key(id_type: IdType, normalised: str, key: bytes) -> str:
    """The pseudonym: HMAC-SHA-256 of ``type:number`` under the managed key, hex."""
    return hmac.new(key, f"{id_type.value}:{normalised}".encode(), hashlib.sha256).hexdigest()


def load_key(path: Path) -> bytes:
    """Read a pseudonym key file (hex, ≥ 32 bytes); refuse one others can read."""
    mode = path.stat().st_mode & 0o077
    if mode:
        raise PermissionError(f"{path}: key file is readable by others (chmod 600)")
    raw = bytes.fromhex(path.read_text(encoding="ascii").strip())
    if len(raw) < 32:
        raise ValueError(f"{path}: key must be at least 32 bytes (64 hex characters)")
    return raw


def write_new_key(path: Path) -> None:
    """Create a key file with 32 random bytes, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(secrets.token_hex(32) + "\n")
