"""Who a patient is to the insurance cloud: ID type + ID number, validated, and its pseudonym.

R-UP-5 (exam basic information carries 证件类型 / 证件号码), R-SE-8 (personal data minimised):
the raw ID number is normalised and checked here and then replaced by a keyed hash (HMAC-SHA-256
under the managed national key, ARCHITECTURE "Identity") and a masked form for display; nothing
downstream stores it in clear.

Two ways to name a person's study at the national index (issue 5 §1), both supported:

* the **pseudonym** (``person_key``): 64 hex characters, HMAC-SHA-256 of ``type:number``;
* the **national index record key** of the 医保影像云索引 (:class:`IndexRecordKey`): person
  management code (26 digits) – exam time ``YYYYMMDDhhmm`` – body-part code (9 digits) – device
  code (13 characters) – the storing unit's unified social credit code (18 characters, GB
  32100-2015, with its own check character), joined by ``-``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import unicodedata
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from pathlib import Path
from typing import Protocol


class IdType(StrEnum):
    """证件类型 accepted at the upload and cache-request interfaces."""

    RESIDENT_ID = "resident-id"  # 居民身份证, 18 characters, ISO 7064 MOD 11-2 check character
    PASSPORT = "passport"  # 护照
    HK_MACAO_PERMIT = "hk-macao-permit"  # 港澳居民来往内地通行证 (H/M + 8 or 10 digits)
    TAIWAN_PERMIT = "taiwan-permit"  # 台湾居民来往大陆通行证 (8 or 10 digits)
    FOREIGNER_PERMANENT = "foreigner-permanent"  # 外国人永久居留身份证 (15 or 18 characters)


class InvalidId(ValueError):
    """An ID number that cannot be right; the message says why (for a 422 naming the field)."""


_WEIGHTS = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
_CHECK = "10X98765432"
PERSON_KEY = re.compile(r"^[0-9a-f]{64}$")
PERSON_CODE = re.compile(r"^\d{26}$")


def resident_id_check(first17: str) -> str:
    """The ISO 7064 MOD 11-2 check character of a resident ID's first 17 digits (GB 11643)."""
    total = sum(int(d) * w for d, w in zip(first17, _WEIGHTS, strict=True))
    return _CHECK[total % 11]


def _clean(number: str) -> str:
    # Hospital systems send full-width digits (１２３), lower-case x and stray spaces or hyphens.
    value = unicodedata.normalize("NFKC", number)
    return re.sub(r"[\s\-]+", "", value).upper()


def _resident_id(value: str) -> str:
    if re.fullmatch(r"\d{15}", value):
        # first-generation card (15 digits, 2-digit year, no check character): the 18-character
        # form inserts "19" and computes the check character (GB 11643-1999 appendix)
        first17 = f"{value[:6]}19{value[6:]}"
        value = first17 + resident_id_check(first17)
    if not re.fullmatch(r"\d{17}[\dX]", value):
        raise InvalidId(f"a resident ID has 18 characters (17 digits and a digit or X), got {len(value)}")
    try:
        born = date(int(value[6:10]), int(value[10:12]), int(value[12:14]))
    except ValueError:
        raise InvalidId(f"birth date {value[6:14]} in the resident ID is not a date") from None
    if born.year < 1900:
        raise InvalidId(f"birth date {value[6:14]} in the resident ID is before 1900")
    if resident_id_check(value[:17]) != value[17]:
        raise InvalidId("check character does not match (ISO 7064 MOD 11-2)")
    return value


def normalise(id_type: IdType, number: str) -> str:
    """The canonical form of an ID number (NFKC, upper case, no spaces or hyphens), or
    :class:`InvalidId` saying what is wrong."""
    value = _clean(number)
    if not value:
        raise InvalidId("is empty")
    if id_type is IdType.RESIDENT_ID:
        return _resident_id(value)
    if id_type is IdType.HK_MACAO_PERMIT:
        if not re.fullmatch(r"[HM]\d{8}(\d{2})?", value):
            raise InvalidId("a Hong Kong/Macao permit is H or M followed by 8 or 10 digits")
    elif id_type is IdType.TAIWAN_PERMIT:
        if not re.fullmatch(r"\d{8}(\d{2})?", value):
            raise InvalidId("a Taiwan permit has 8 or 10 digits")
    elif id_type is IdType.FOREIGNER_PERMANENT:
        if re.fullmatch(r"9\d{16}[\dX]", value):
            # the 2023 card: 18 characters starting with 9, resident-ID check character
            if resident_id_check(value[:17]) != value[17]:
                raise InvalidId("check character does not match (ISO 7064 MOD 11-2)")
        elif not re.fullmatch(r"[A-Z]{3}\d{12}", value):
            raise InvalidId(
                "a permanent residence card has 15 (3 letters + 12 digits) or 18 characters (9 + 17)"
            )
    elif not re.fullmatch(r"[A-Z0-9]{5,20}", value):
        raise InvalidId("a passport number has 5-20 letters and digits")
    return value


def mask(number: str) -> str:
    """A display form that does not identify: the first 4 and last 4 characters kept."""
    return number if len(number) <= 8 else f"{number[:4]}{'*' * (len(number) - 8)}{number[-4:]}"


class MacKey(Protocol):
    """A pseudonym key held by a KMS (``gateway/security/managed.py``): ``digest`` is HMAC-SHA-256
    under it, computed by the KMS (R-SE-14)."""

    def digest(self, message: bytes) -> bytes: ...


PseudonymKey = bytes | MacKey  # the raw key from a key file, or the KMS's


def person_key(id_type: IdType, normalised: str, key: PseudonymKey) -> str:
    """The pseudonym: HMAC-SHA-256 of ``type:number`` under the managed key, hex (R-SE-8)."""
    message = f"{id_type.value}:{normalised}".encode()
    if isinstance(key, bytes):
        return hmac.new(key, message, hashlib.sha256).hexdigest()
    return key.digest(message).hex()


def pseudonymise(id_type: IdType, number: str, key: PseudonymKey) -> tuple[str, str]:
    """Validate ``number`` and return (person key, masked form); :class:`InvalidId` if wrong."""
    value = normalise(id_type, number)
    return person_key(id_type, value, key), mask(value)


def is_person_ref(value: str) -> bool:
    """A pseudonym (64 hex) or a person management code (26 digits): how the index names people."""
    return bool(PERSON_KEY.match(value) or PERSON_CODE.match(value))


# ---- the unified social credit code (统一社会信用代码, GB 32100-2015) ---------------------------------

USCC_CHARS = "0123456789ABCDEFGHJKLMNPQRTUWXY"  # 31 characters: no I, O, Z, S, V
_USCC_WEIGHTS = [pow(3, i, 31) for i in range(17)]


def uscc_check(first17: str) -> str:
    """The check character of a unified social credit code's first 17 characters (MOD 31)."""
    total = sum(USCC_CHARS.index(c) * w for c, w in zip(first17, _USCC_WEIGHTS, strict=True))
    return USCC_CHARS[(31 - total % 31) % 31]


def normalise_uscc(code: str) -> str:
    """An 18-character unified social credit code, checked; :class:`InvalidId` says why not."""
    value = _clean(code)
    if len(value) != 18:
        raise InvalidId(f"a unified social credit code has 18 characters, got {len(value)}")
    bad = sorted({c for c in value if c not in USCC_CHARS})
    if bad:
        raise InvalidId(f"character(s) {''.join(bad)} are not used in a unified social credit code")
    if not value[2:8].isdigit():
        raise InvalidId(f"characters 3-8 ({value[2:8]}) are the administrative division code: 6 digits")
    if uscc_check(value[:17]) != value[17]:
        raise InvalidId("check character does not match (GB 32100-2015, MOD 31)")
    return value


# ---- the national index record key ----------------------------------------------------------------


@dataclass(frozen=True)
class IndexRecordKey:
    """索引记录主键 of the 医保影像云索引: one study of one person at one storing unit."""

    person_code: str  # 人员管理码, 26 digits
    exam_time: datetime  # minute precision, China Standard Time as written
    body_part: str  # body-part code, 9 digits
    device: str  # device code, 13 digits or capital letters
    storing_unit: str  # the storing unit's unified social credit code, 18 characters

    def __post_init__(self) -> None:
        if not PERSON_CODE.match(self.person_code):
            raise InvalidId(f"person management code: 26 digits, got {self.person_code!r}")
        if not re.fullmatch(r"\d{9}", self.body_part):
            raise InvalidId(f"body-part code: 9 digits, got {self.body_part!r}")
        if not re.fullmatch(r"[0-9A-Z]{13}", self.device):
            raise InvalidId(f"device code: 13 digits or capital letters, got {self.device!r}")
        object.__setattr__(self, "storing_unit", normalise_uscc(self.storing_unit))
        object.__setattr__(self, "exam_time", self.exam_time.replace(second=0, microsecond=0))

    @classmethod
    def parse(cls, text: str) -> IndexRecordKey:
        """From ``code-YYYYMMDDhhmm-body-device-uscc``; :class:`InvalidId` names the bad part."""
        parts = _clean_key(text).split("-")
        if len(parts) != 5:
            raise InvalidId(
                "an index record key has 5 parts joined by '-': person management code, "
                f"exam time, body-part code, device code, unified social credit code (got {len(parts)})"
            )
        code, when, body, device, unit = parts
        if not re.fullmatch(r"\d{12}", when):
            raise InvalidId(f"exam time: YYYYMMDDhhmm, got {when!r}")
        try:
            at = datetime.strptime(when, "%Y%m%d%H%M")
        except ValueError:
            raise InvalidId(f"exam time {when} is not a date and time") from None
        try:
            return cls(code, at, body, device, unit)
        except InvalidId as exc:
            raise InvalidId(str(exc)) from None

    def __str__(self) -> str:
        when = self.exam_time.strftime("%Y%m%d%H%M")
        return f"{self.person_code}-{when}-{self.body_part}-{self.device}-{self.storing_unit}"


def _clean_key(text: str) -> str:
    value = unicodedata.normalize("NFKC", text).strip().upper()
    return re.sub(r"[\u2010-\u2015]", "-", value)  # en/em dashes as typed in documents


# ---- the managed key ------------------------------------------------------------------------------


def load_key(path: Path) -> bytes:
    """Read a pseudonym key file (hex, ≥ 32 bytes); refuse one others can read (R-SE-14: the
    national key is distributed to every front-end by the key management, never generated there)."""
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
