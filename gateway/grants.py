"""Patient authorization for retrieval (患者授权): :class:`RetrievalGrant`, its verifiers and the
one check every retrieval route calls (R-RT-4, R-CQ-5, R-SE-7).

A grant says: this person (pseudonym) lets this institution (and, if named, only this doctor)
see their studies — all studies in a date window, or the listed studies — from ``issued_at`` until
``expires_at``. It arrives as evidence of one *method* (insurance QR code incl. family account,
insurance app, electronic signature, IoT face recognition, written consent with a scanned document
reference); each method has a verifier (:class:`GrantVerifier`) that turns evidence into a grant or
refuses it. The built-in ones (:class:`SignedTokenVerifier` and its subclasses) each check an
Ed25519-signed token of the method's issuer, whose public keys are in config (``[grants]``): the
insurance platform's QR payload (:class:`InsuranceQrVerifier`, incl. a family account's guardian),
the insurance app's token (:class:`InsuranceAppVerifier`), the e-signature service's token over a
consent document's SHA-256 (:class:`ESignatureVerifier`), a registered IoT face-recognition
device's attestation with its match score and capture time (:class:`IotFaceVerifier`), and an
operator's signature over a scanned written consent (:class:`WrittenConsentVerifier`). A token's
nonce is accepted once (:meth:`GrantBook.add`); :class:`GrantDesk` is where a node (front-end or
center) takes evidence: verify, check the person, keep the consent document in the blob store,
record the grant.

:func:`check_grant` is a plain domain function: the routes that serve a patient's studies call it
with the grants on record; it returns the grant that allows the request or raises
:class:`GrantDenied` with the reason (no grant, expired, another institution, another doctor,
outside the scope). The caller answers 403 with that reason, audits it and records the retrieval
(allowed or not) for the national index. The users/roles layer (gateway/security/) can call it too.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from gateway.archive.blobstore import BlobStore
from gateway.archive.catalog import Catalog
from gateway.archive.schema import retrieval_grants
from gateway.identity import PERSON_KEY, is_person_ref

Clock = Callable[[], datetime]
QR_PREFIX = "YBQR1."  # version of the insurance platform's QR payload format
CONSENT_PREFIX = "consent/"  # consent documents in the blob store: consent/<sha256>


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
    nonce: str = ""  # "<method tag>:<jti>" of a verified token: accepted once (GrantBook.add)

    @property
    def document(self) -> str | None:
        """The blob-store reference of the consent document behind the grant (e-signature,
        written consent), or None."""
        _, found, digest = self.evidence.partition(":doc:")
        return f"{CONSENT_PREFIX}{digest[:64]}" if found else None

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
            "evidence": self.evidence,
            "document": self.document,
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

    def verify(
        self, evidence: str, *, institution: str | None, now: datetime, document: bytes | None = None
    ) -> RetrievalGrant:
        """``institution``: the one the evidence must name (a front-end's), or None to take the
        one it names (a center, for its institutions' users); ``document``: the consent document's
        bytes where the method has one."""
        ...


# ---- the built-in verifiers: signed tokens of the authorizing parties -------------------------------

#: The token format (and its version) of each method: ``<PREFIX><claims>.<signature>``.
PREFIXES: dict[GrantMethod, str] = {
    GrantMethod.INSURANCE_QR: QR_PREFIX,
    GrantMethod.INSURANCE_APP: "YBAPP1.",
    GrantMethod.E_SIGNATURE: "YBESIG1.",
    GrantMethod.IOT_FACE: "YBFACE1.",
    GrantMethod.WRITTEN: "YBWC1.",
}
_TAGS = {
    GrantMethod.INSURANCE_QR: "qr",
    GrantMethod.INSURANCE_APP: "app",
    GrantMethod.E_SIGNATURE: "esig",
    GrantMethod.IOT_FACE: "face",
    GrantMethod.WRITTEN: "written",
}
NONCE = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
SKEW = timedelta(minutes=5)


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_token(key: Ed25519PrivateKey, claims: dict[str, Any], method: GrantMethod) -> str:
    """A token of ``method`` as its issuer makes it: ``<PREFIX><claims>.<signature>`` (base64url
    JSON; the Ed25519 signature covers ``<PREFIX><claims>``). Used by tests and the demo in place
    of the insurance platform, the app, the e-signature service, a face device or an operator."""
    body = PREFIXES[method] + _b64e(json.dumps(claims, ensure_ascii=False, separators=(",", ":")).encode())
    return f"{body}.{_b64e(key.sign(body.encode()))}"


def sign_qr(key: Ed25519PrivateKey, claims: dict[str, Any]) -> str:
    """An insurance QR payload: ``YBQR1.<claims>.<signature>``."""
    return sign_token(key, claims, GrantMethod.INSURANCE_QR)


def load_public_keys(paths: Iterable[Path]) -> list[Ed25519PublicKey]:
    keys = []
    for path in paths:
        key = load_pem_public_key(path.read_bytes())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{path}: not an Ed25519 public key")
        keys.append(key)
    return keys


class SignedTokenVerifier:
    """What the built-in verifiers share (R-RT-4): the evidence is ``<PREFIX><claims>.<signature>``,
    signed (Ed25519) by one of the issuer's public keys from config; the claims name the person
    (``person``: pseudonym), the institution (and optionally ``doctor``), the scope (``studies``,
    or a ``from``/``to`` window), ``iat``/``exp`` (Unix seconds) and a unique nonce ``jti`` — a
    token is accepted once (:meth:`GrantBook.add` refuses a replayed nonce). A subclass names its
    method and checks its own claims (:meth:`check`); ``signer_claim`` names the claim that says
    which registered signer (a face device, an operator) signed, when keys are per signer."""

    method: GrantMethod = GrantMethod.INSURANCE_QR
    name = "a signed token"  # how a reason names the evidence
    signer = "its issuer"
    config_key = ""
    signer_claim: str | None = None

    def __init__(
        self,
        keys: Sequence[Ed25519PublicKey] | Mapping[str, Ed25519PublicKey],
        *,
        max_lifetime: timedelta = timedelta(hours=24),
    ) -> None:
        self.keys = keys
        self.max_lifetime = max_lifetime

    @property
    def prefix(self) -> str:
        return PREFIXES[self.method]

    def verify(
        self, evidence: str, *, institution: str | None, now: datetime, document: bytes | None = None
    ) -> RetrievalGrant:
        claims = self._signed_claims(evidence)
        extra = self.check(claims, now=now, document=document)
        return self._grant(claims, extra, institution=institution, now=now)

    def check(self, claims: dict[str, Any], *, now: datetime, document: bytes | None) -> str:
        """The method's own checks; what to add to the grant's evidence ("" for nothing)."""
        return ""

    def _signed_claims(self, evidence: str) -> dict[str, Any]:
        if not self.keys:
            raise GrantRejected(f"no {self.signer} key configured ([grants] {self.config_key})")
        if not evidence.startswith(self.prefix) or evidence.count(".") != 2:
            raise GrantRejected(f"not {self.name} ({self.prefix}<claims>.<signature>)")
        body, _, sig = evidence.rpartition(".")
        try:
            signature = _b64d(sig)
            claims = json.loads(_b64d(body.removeprefix(self.prefix)))
        except (ValueError, json.JSONDecodeError):
            raise GrantRejected(f"{self.name} is not base64url JSON") from None
        if not isinstance(claims, dict):
            raise GrantRejected(f"the claims of {self.name} are not an object")
        if isinstance(self.keys, Mapping):
            assert self.signer_claim is not None
            who = claims.get(self.signer_claim)
            key = self.keys.get(who) if isinstance(who, str) else None
            if key is None:
                raise GrantRejected(
                    f"{self.signer_claim}: {who!r} is not a registered {self.signer}"
                    f" ([grants] {self.config_key})"
                )
            keys: Sequence[Ed25519PublicKey] = [key]
        else:
            keys = self.keys
        if not any(_valid(k, signature, body.encode()) for k in keys):
            raise GrantRejected(f"the signature of {self.name} is not {self.signer}'s")
        return claims

    def _grant(
        self, c: dict[str, Any], extra: str, *, institution: str | None, now: datetime
    ) -> RetrievalGrant:
        person = c.get("person")
        if not isinstance(person, str) or not is_person_ref(person):
            raise GrantRejected("person: a pseudonym (64 hex) is required")
        named = c.get("institution")
        if institution is not None and named != institution:
            raise GrantRejected(f"{self.name} authorizes institution {named!r}, not this one")
        if not isinstance(named, str) or not named:
            raise GrantRejected("institution: the institution authorized is required")
        try:
            issued = datetime.fromtimestamp(float(c["iat"]), UTC)
            expires = datetime.fromtimestamp(float(c["exp"]), UTC)
        except (KeyError, TypeError, ValueError, OverflowError):
            raise GrantRejected("iat and exp (Unix seconds) are required") from None
        if expires <= now:
            raise GrantRejected(f"{self.name} expired at {expires.isoformat()}")
        if issued > now + SKEW:
            raise GrantRejected(f"{self.name} is issued in the future")
        if expires - issued > self.max_lifetime:
            raise GrantRejected(f"{self.name} is valid longer than {self.max_lifetime} allows")
        jti = c.get("jti")
        if not isinstance(jti, str) or not NONCE.match(jti):
            raise GrantRejected("jti: the token's unique nonce is required (1-64 of A-Z a-z 0-9 . _ -)")
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
        nonce = f"{_TAGS[self.method]}:{jti}"
        return RetrievalGrant(
            person_key=person,
            institution=named,
            issued_at=issued,
            expires_at=expires,
            method=self.method,
            evidence=nonce + (f":{extra}" if extra else ""),
            doctor=str(doctor) if doctor else None,
            window_from=window_from,
            window_to=window_to,
            studies=frozenset(studies) if studies is not None else None,
            nonce=nonce,
        )


class InsuranceQrVerifier(SignedTokenVerifier):
    """医保码 authorization: the patient shows a QR code in the insurance app, signed by the
    insurance platform. A family-account (亲情账户) code has ``family: true`` and names the
    ``guardian`` (their pseudonym) who authorizes for the dependent ``person``; the grant's
    evidence keeps who the guardian was."""

    method = GrantMethod.INSURANCE_QR
    name = "an insurance QR payload"
    signer = "the insurance platform"
    config_key = "insurance_qr_public_keys"

    def check(self, claims: dict[str, Any], *, now: datetime, document: bytes | None) -> str:
        if not claims.get("family"):
            return ""
        guardian = claims.get("guardian")
        if not isinstance(guardian, str) or not PERSON_KEY.match(guardian):
            raise GrantRejected("guardian: a family-account QR code names the guardian (a pseudonym, 64 hex)")
        if guardian == claims.get("person"):
            raise GrantRejected("guardian: the guardian and the dependent are the same person")
        return f"family:{guardian[:16]}"


class InsuranceAppVerifier(SignedTokenVerifier):
    """医保 app authorization: the patient confirms in the insurance app, whose server signs an
    authorization token the HIS receives."""

    method = GrantMethod.INSURANCE_APP
    name = "an insurance app authorization token"
    signer = "the insurance app"
    config_key = "insurance_app_public_keys"


def _document(claims: dict[str, Any], document: bytes | None, what: str) -> str:
    """The consent document's SHA-256 the signature covers, checked against the posted bytes."""
    digest = claims.get("document_sha256")
    if not isinstance(digest, str) or not SHA256_HEX.match(digest):
        raise GrantRejected(
            "document_sha256: the SHA-256 (64 lower-case hex) of the signed document is required"
        )
    if document is None:
        raise GrantRejected(f"document: the {what} itself is required (base64)")
    got = hashlib.sha256(document).hexdigest()
    if got != digest:
        raise GrantRejected(f"document: its SHA-256 {got[:16]}… is not the {digest[:16]}… that was signed")
    return f"doc:{digest}"


class ESignatureVerifier(SignedTokenVerifier):
    """电子签名: the patient signs a consent document with the e-signature service, which signs a
    token carrying the document's SHA-256; the document is posted with it, checked against that
    hash and kept in the blob store (``consent/<sha256>``)."""

    method = GrantMethod.E_SIGNATURE
    name = "an e-signature consent token"
    signer = "the e-signature service"
    config_key = "e_signature_public_keys"

    def check(self, claims: dict[str, Any], *, now: datetime, document: bytes | None) -> str:
        return _document(claims, document, "signed consent document")


class IotFaceVerifier(SignedTokenVerifier):
    """IoT 人脸识别: a registered face-recognition device attests that the person at it is the
    patient — its attestation names the ``device`` (whose key is in config), the match ``score``
    (at least ``min_score``) and ``captured_at`` (Unix seconds, at most ``max_age`` old)."""

    method = GrantMethod.IOT_FACE
    name = "a face-recognition attestation"
    signer = "face-recognition device"
    config_key = "face_devices"
    signer_claim = "device"

    def __init__(
        self,
        devices: Mapping[str, Ed25519PublicKey],
        *,
        min_score: float = 0.9,
        max_age: timedelta = timedelta(minutes=5),
        max_lifetime: timedelta = timedelta(hours=24),
    ) -> None:
        super().__init__(devices, max_lifetime=max_lifetime)
        self.min_score = min_score
        self.max_age = max_age

    def check(self, claims: dict[str, Any], *, now: datetime, document: bytes | None) -> str:
        score = claims.get("score")
        if isinstance(score, bool) or not isinstance(score, int | float):
            raise GrantRejected("score: the face match score (0-1) is required")
        if score < self.min_score:
            raise GrantRejected(f"score: the face match score {score} is below the required {self.min_score}")
        try:
            captured = datetime.fromtimestamp(float(claims["captured_at"]), UTC)
        except (KeyError, TypeError, ValueError, OverflowError):
            raise GrantRejected("captured_at: when the face was captured (Unix seconds) is needed") from None
        if captured > now + SKEW:
            raise GrantRejected("captured_at: the face capture is in the future")
        if now - captured > self.max_age:
            raise GrantRejected(
                f"captured_at: the face capture is older than {self.max_age} (stale attestation)"
            )
        return f"device:{claims['device']}:score:{float(score):.3f}"


class WrittenConsentVerifier(SignedTokenVerifier):
    """书面同意: the patient signs a paper consent; an operator scans it and signs a token carrying
    the scan's SHA-256 with their own key (``operator``, registered in config). The scan is posted
    with it, checked against that hash and kept in the blob store; the grant keeps the reference."""

    method = GrantMethod.WRITTEN
    name = "a written-consent token"
    signer = "consent operator"
    config_key = "consent_operators"
    signer_claim = "operator"

    def check(self, claims: dict[str, Any], *, now: datetime, document: bytes | None) -> str:
        return _document(claims, document, "scanned consent document")


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
        """Keep a verified grant. A token's nonce is accepted once: a grant whose nonce is already
        on record is refused (:class:`GrantRejected`, a replay); evidence without a nonce (a grant
        made by the node itself) given twice is the first grant (idempotent).

        The check is the unique index on ``retrieval_grants.nonce`` (migration 0018), not a lookup
        before the insert: two posts of the same token at the same moment (PostgreSQL runs them in
        parallel transactions) would both find nothing and both insert; the index lets exactly one
        commit and the other's IntegrityError becomes the same replay refusal."""
        c = retrieval_grants.c
        try:
            with self.catalog.write() as conn:
                if not grant.nonce:
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
                        nonce=grant.nonce or None,
                        recorded_at=self.clock(),
                    )
                )
        except IntegrityError:
            if grant.nonce and self._nonce_used(grant.nonce):
                replay = f"replay: the nonce {grant.nonce!r} was already used for a grant"
                raise GrantRejected(replay) from None
            raise
        return grant

    def _nonce_used(self, nonce: str) -> bool:
        with self.catalog.engine.connect() as conn:
            found = conn.execute(select(retrieval_grants.c.id).where(retrieval_grants.c.nonce == nonce))
            return found.first() is not None

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
                nonce=r.nonce or "",
            )


# ---- the desk: evidence in, a grant on record out (both roles) -------------------------------------


@dataclass
class GrantDesk:
    """Where a node takes evidence of a patient's authorization (``POST /api/v1/grants``): the
    method's verifier, the person check, the consent document kept in the blob store, the grant
    on record. A front-end passes its ``institution`` (the evidence must name it); a center
    passes None (the evidence names one of its institutions; only that institution's users are
    then shown anything by it, ``security/grant_policy.py``)."""

    book: GrantBook
    verifiers: Mapping[str, GrantVerifier]
    institution: str | None
    documents: BlobStore | None = None

    def accept(
        self, method: str, evidence: str, *, person: str | None = None, document: bytes | None = None
    ) -> RetrievalGrant:
        """The grant on record; :class:`GrantRejected` (bad evidence, replay: 422) or
        :class:`GrantDenied` (the evidence is another person's than ``person``: 403)."""
        verifier = self.verifiers.get(method)
        if verifier is None:
            known = ", ".join(sorted(self.verifiers)) or "none configured"
            raise GrantRejected(f"method: no verifier for {method!r} (configured: {known})")
        now = self.book.clock()
        grant = verifier.verify(evidence, institution=self.institution, now=now, document=document)
        if person is not None and grant.person_key != person:
            raise GrantDenied("the evidence authorizes another person than the patient named in the request")
        ref = grant.document
        if ref is not None and document is not None:
            if self.documents is None:
                raise GrantRejected("document: this node has no blob store to keep the consent document")
            if not self.documents.exists(ref):  # content-addressed: the same scan is kept once
                self.documents.put(ref, io.BytesIO(document))
        return self.book.add(grant)


def _signers(entries: Iterable[Any]) -> dict[str, Ed25519PublicKey]:
    out: dict[str, Ed25519PublicKey] = {}
    for entry in entries:
        [out[entry.id]] = load_public_keys([entry.public_key])
    return out


def verifiers_from_config(section: Any) -> dict[str, GrantVerifier]:
    """The built-in verifiers of a ``[grants]`` section (``gateway.config.GrantsSection``): the
    insurance QR always (it says when no key is configured); each other method once its keys are
    configured. A key that cannot be read raises ``(config key, reason)`` as :class:`KeyError`."""
    lifetime = timedelta(hours=section.max_lifetime_hours)

    def keys(name: str, load: Callable[[], Any]) -> Any:
        try:
            return load()
        except (OSError, ValueError) as exc:
            raise KeyError(f"grants.{name}", str(exc)) from exc

    out: dict[str, GrantVerifier] = {
        GrantMethod.INSURANCE_QR.value: InsuranceQrVerifier(
            keys("insurance_qr_public_keys", lambda: load_public_keys(section.insurance_qr_public_keys)),
            max_lifetime=lifetime,
        )
    }
    if section.insurance_app_public_keys:
        app = keys("insurance_app_public_keys", lambda: load_public_keys(section.insurance_app_public_keys))
        out[GrantMethod.INSURANCE_APP.value] = InsuranceAppVerifier(app, max_lifetime=lifetime)
    if section.e_signature_public_keys:
        esig = keys("e_signature_public_keys", lambda: load_public_keys(section.e_signature_public_keys))
        out[GrantMethod.E_SIGNATURE.value] = ESignatureVerifier(esig, max_lifetime=lifetime)
    if section.face_devices:
        devices = keys("face_devices", lambda: _signers(section.face_devices))
        out[GrantMethod.IOT_FACE.value] = IotFaceVerifier(
            devices,
            min_score=section.face_min_score,
            max_age=timedelta(seconds=section.face_max_age_seconds),
            max_lifetime=lifetime,
        )
    if section.consent_operators:
        ops = keys("consent_operators", lambda: _signers(section.consent_operators))
        out[GrantMethod.WRITTEN.value] = WrittenConsentVerifier(ops, max_lifetime=lifetime)
    return out
