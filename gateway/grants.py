"""Patient authorization for retrieval (患者授权): :class:`RetrievalGrant`, its verifiers and the
one check every retrieval route calls (R-RT-4, R-CQ-5, R-SE-7).

A grant says: this person (pseudonym) lets this institution (and, if named, only this doctor)
see their studies — all studies in a date window, or the listed studies — from ``issued_at`` until
``expires_at``. It arrives as evidence of one *method* (insurance QR code incl. family account,
insurance app, electronic signature, IoT face recognition, written consent with a scanned document
reference); each method has a verifier (:class:`GrantVerifier`) that turns evidence into a grant or
refuses it. The built-in :class:`InsuranceQrVerifier` checks an Ed25519 signature of the insurance
platform over the QR payload, with the platform's public keys from config (``[grants]``).

:func:`check_grant` is a plain domain function: the routes that serve a patient's studies call it
with the grants on record; it returns the grant that allows the request or raises
:class:`GrantDenied` with the reason (no grant, expired, another institution, another doctor,
outside the scope). The caller answers 403 with that reason, audits it and records the retrieval
(allowed or not) for the national index. The users/roles layer (gateway/security/) can call it too.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from sqlalchemy import select, update

from gateway.archive.catalog import Catalog
from gateway.archive.schema import retrieval_grants
from gateway.identity import is_person_ref

Clock = Callable[[], datetime]
QR_PREFIX = "YBQR1."  # version of the insurance platform's QR payload format


class GrantMethod(StrEnum):
    """授权方式 (R-RT-4)."""

    INSURANCE_QR = "insurance-qr"  # 医保码 (incl. family account, 亲情账户)
    INSURANCE_APP = "insurance-app"
    E_SIGNATURE = "e-signature"
    IOT_FACE = "iot-face"
    WRITTEN = "written-consent"  # with a scanned document reference


@dataclass(frozen=True)
class RetrievalGrant:
    """One patient authorization."""

    person_key: str
    institution: str
    issued_at: datetime
    expires_at: datetime
    method: GrantMethod
    evidence: str = ""  # what proves it: the QR payload id, a document reference…
    doctor: str | None = None
    window_from: date | None = None
    window_to: date | None = None
    studies: frozenset[str] | None = None  # None: every study in the window
    grant_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    revoked_at: datetime | None = None  # the patient withdrew it (GrantBook.revoke)

    def covers(self, study_uid: str | None, study_date: date | None) -> bool:
        """Whether a study (or, with neither given, the window as a whole) is in scope."""
        if self.studies is not None and study_uid is not None and study_uid not in self.studies:
            return False
        if study_date is not None:
            if self.window_from is not None and study_date < self.window_from:
                return False
            if self.window_to is not None and study_date > self.window_to:
                return False
        return True

    def as_json(self) -> dict[str, Any]:
        return {
            "grant_id": self.grant_id,
            "person_key": self.person_key,
            "institution": self.institution,
            "doctor": self.doctor,
            "window_from": self.window_from.isoformat() if self.window_from else None,
            "window_to": self.window_to.isoformat() if self.window_to else None,
            "studies": sorted(self.studies) if self.studies is not None else None,
            "issued_at": self.issued_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "method": self.method.value,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


class GrantRejected(ValueError):
    """Evidence that does not prove a grant (bad signature, expired, malformed); says why."""


class GrantDenied(Exception):
    """A request no grant allows; ``reason`` is what the 403 says."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class GrantVerifier(Protocol):
    """Turns one method's evidence into a grant (or :class:`GrantRejected`)."""

    method: GrantMethod

    def verify(self, evidence: str, *, institution: str, now: datetime) -> RetrievalGrant: ...


# ---- the built-in verifier: the insurance platform's signed QR payload -----------------------------


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_qr(key: Ed25519PrivateKey, claims: dict[str, Any]) -> str:
    """A QR payload as the insurance platform makes it: ``YBQR1.<claims>.<signature>`` (base64url;
    the signature covers ``YBQR1.<claims>``). Used by tests and the demo in place of the platform."""
    body = QR_PREFIX + _b64e(json.dumps(claims, ensure_ascii=False, separators=(",", ":")).encode())
    return f"{body}.{_b64e(key.sign(body.encode()))}"


def load_public_keys(paths: Iterable[Path]) -> list[Ed25519PublicKey]:
    keys = []
    for path in paths:
        key = load_pem_public_key(path.read_bytes())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{path}: not an Ed25519 public key")
        keys.append(key)
    return keys


class InsuranceQrVerifier:
    """医保码 authorization: the patient shows a QR code in the insurance app; the payload is signed
    (Ed25519) by the insurance platform and names the person (pseudonym or person management
    code), the institution (and optionally the doctor), the scope, issue and expiry times (Unix
    seconds) and a unique ``jti``; ``family`` marks a family-account (亲情账户) authorization."""

    method = GrantMethod.INSURANCE_QR

    def __init__(
        self, keys: Sequence[Ed25519PublicKey], *, max_lifetime: timedelta = timedelta(hours=24)
    ) -> None:
        self.keys = list(keys)
        self.max_lifetime = max_lifetime

    def verify(self, evidence: str, *, institution: str, now: datetime) -> RetrievalGrant:
        if not self.keys:
            raise GrantRejected("no insurance platform key configured ([grants] insurance_qr_public_keys)")
        if not evidence.startswith(QR_PREFIX) or evidence.count(".") != 2:
            raise GrantRejected("not an insurance QR payload (YBQR1.<claims>.<signature>)")
        body, _, sig = evidence.rpartition(".")
        try:
            signature = _b64d(sig)
            claims = json.loads(_b64d(body.removeprefix(QR_PREFIX)))
        except (ValueError, json.JSONDecodeError):
            raise GrantRejected("the QR payload is not base64url JSON") from None
        if not any(_valid(k, signature, body.encode()) for k in self.keys):
            raise GrantRejected("the QR payload's signature is not the insurance platform's")
        if not isinstance(claims, dict):
            raise GrantRejected("the QR claims are not an object")
        return self._grant(claims, evidence_id=str(claims.get("jti", "")), institution=institution, now=now)

    def _grant(
        self, c: dict[str, Any], *, evidence_id: str, institution: str, now: datetime
    ) -> RetrievalGrant:
        person = c.get("person")
        if not isinstance(person, str) or not is_person_ref(person):
            raise GrantRejected("person: a pseudonym (64 hex) is required")
        if c.get("institution") != institution:
            raise GrantRejected(f"the QR code authorizes institution {c.get('institution')!r}, not this one")
        try:
            issued = datetime.fromtimestamp(float(c["iat"]), UTC)
            expires = datetime.fromtimestamp(float(c["exp"]), UTC)
        except (KeyError, TypeError, ValueError):
            raise GrantRejected("iat and exp (Unix seconds) are required") from None
        if expires <= now:
            raise GrantRejected(f"the QR code expired at {expires.isoformat()}")
        if issued > now + timedelta(minutes=5):
            raise GrantRejected("the QR code is issued in the future")
        if expires - issued > self.max_lifetime:
            raise GrantRejected(f"the QR code is valid longer than {self.max_lifetime} allows")
        if not evidence_id:
            raise GrantRejected("jti: the QR code's unique id is required")
        studies = c.get("studies")
        if studies is not None and not (
            isinstance(studies, list) and all(isinstance(s, str) for s in studies)
        ):
            raise GrantRejected("studies: a list of Study Instance UIDs")
        try:
            window_from = date.fromisoformat(c["from"]) if c.get("from") else None
            window_to = date.fromisoformat(c["to"]) if c.get("to") else None
        except (TypeError, ValueError):
            raise GrantRejected("from/to: dates YYYY-MM-DD") from None
        doctor = c.get("doctor")
        return RetrievalGrant(
            person_key=person,
            institution=institution,
            issued_at=issued,
            expires_at=expires,
            method=self.method,
            evidence=f"qr:{evidence_id}" + (":family" if c.get("family") else ""),
            doctor=str(doctor) if doctor else None,
            window_from=window_from,
            window_to=window_to,
            studies=frozenset(studies) if studies is not None else None,
        )


def _valid(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


# ---- the check ------------------------------------------------------------------------------------


def check_grant(
    grants: Iterable[RetrievalGrant],
    *,
    person_key: str,
    institution: str,
    doctor: str | None,
    now: datetime,
    study_uid: str | None = None,
    study_date: date | None = None,
) -> RetrievalGrant:
    """The grant allowing this retrieval, or :class:`GrantDenied` naming the first reason in the
    order a person would ask: is there any, for us, not revoked, still valid, for this doctor, for
    this study."""
    mine = [g for g in grants if g.person_key == person_key]
    if not mine:
        raise GrantDenied("no authorization from the patient for retrieval")
    here = [g for g in mine if g.institution == institution]
    if not here:
        raise GrantDenied("the patient's authorization is for another institution")
    kept = [g for g in here if g.revoked_at is None]
    if not kept:
        raise GrantDenied("the patient revoked the authorization")
    valid = [g for g in kept if g.issued_at - timedelta(minutes=5) <= now < g.expires_at]
    if not valid:
        last = max(g.expires_at for g in kept)
        raise GrantDenied(f"the patient's authorization expired at {last.isoformat()}")
    for_doctor = [g for g in valid if g.doctor is None or g.doctor == doctor]
    if not for_doctor:
        raise GrantDenied("the patient's authorization names another doctor")
    for g in sorted(for_doctor, key=lambda g: g.expires_at, reverse=True):
        if g.covers(study_uid, study_date):
            return g
    raise GrantDenied("the study is outside the scope the patient authorized")


# ---- grants on record -----------------------------------------------------------------------------


def _day(value: str | None) -> date | None:
    return datetime.strptime(value, "%Y%m%d").date() if value else None


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class GrantBook:
    """The grants a front-end holds (table ``retrieval_grants``)."""

    def __init__(self, catalog: Catalog, *, clock: Clock = lambda: datetime.now(UTC)) -> None:
        self.catalog = catalog
        self.clock = clock

    def add(self, grant: RetrievalGrant) -> RetrievalGrant:
        """Keep a verified grant; the same evidence twice is the first grant (idempotent)."""
        c = retrieval_grants.c
        with self.catalog.write() as conn:
            same = conn.execute(
                select(c.grant_id).where(
                    c.evidence == grant.evidence, c.person_key == grant.person_key, c.evidence != ""
                )
            ).first()
            if same is not None:
                return next(g for g in self._rows(conn, c.grant_id == same.grant_id))
            conn.execute(
                retrieval_grants.insert().values(
                    grant_id=grant.grant_id,
                    person_key=grant.person_key,
                    institution=grant.institution,
                    doctor=grant.doctor,
                    window_from=grant.window_from.strftime("%Y%m%d") if grant.window_from else None,
                    window_to=grant.window_to.strftime("%Y%m%d") if grant.window_to else None,
                    studies=json.dumps(sorted(grant.studies)) if grant.studies is not None else None,
                    issued_at=grant.issued_at,
                    expires_at=grant.expires_at,
                    method=grant.method.value,
                    evidence=grant.evidence[:256],
                    recorded_at=self.clock(),
                )
            )
        return grant

    def revoke(self, grant_id: str) -> RetrievalGrant | None:
        """The patient withdraws a grant (R-RT-4, R-SE-7): from now on it allows nothing, here
        (the doctor API) and on DICOMweb (``security/grant_policy.py``). Revoking twice keeps the
        first time. None: no such grant."""
        c = retrieval_grants.c
        with self.catalog.write() as conn:
            conn.execute(
                update(retrieval_grants)
                .where(c.grant_id == grant_id, c.revoked_at.is_(None))
                .values(revoked_at=self.clock())
            )
            return next(iter(self._rows(conn, c.grant_id == grant_id)), None)

    def for_person(self, person_key: str) -> list[RetrievalGrant]:
        with self.catalog.engine.connect() as conn:
            return list(self._rows(conn, retrieval_grants.c.person_key == person_key))

    @staticmethod
    def _rows(conn: Any, where: Any) -> Iterable[RetrievalGrant]:
        for r in conn.execute(select(retrieval_grants).where(where)):
            yield RetrievalGrant(
                person_key=r.person_key,
                institution=r.institution,
                issued_at=_aware(r.issued_at),
                expires_at=_aware(r.expires_at),
                method=GrantMethod(r.method),
                evidence=r.evidence,
                doctor=r.doctor,
                window_from=_day(r.window_from),
                window_to=_day(r.window_to),
                studies=frozenset(json.loads(r.studies)) if r.studies is not None else None,
                grant_id=r.grant_id,
                revoked_at=_aware(r.revoked_at) if r.revoked_at is not None else None,
            )
