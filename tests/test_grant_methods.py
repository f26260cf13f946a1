"""The patient authorization methods (issue 5 §6; R-RT-4, R-CQ-5, R-SE-4): each built-in verifier
checks a signed token of its issuer, whose public key is in ``[grants]`` — the insurance QR code
(incl. a family account's guardian), the insurance app, the e-signature service (with the signed
document's SHA-256), a registered IoT face-recognition device (score threshold, freshness window)
and an operator's signature over a scanned written consent (kept in the blob store, referenced by
the grant). Valid evidence → a grant; a wrong signature, an expired token, a replayed nonce or
another person → refused with the reason (422/403) and audited.

A front-end with no center configured: the grant routes need none, and the doctor routes that
need the center answer 503 with the reason (not 502: nothing failed, nothing is configured)."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import event, func, select

from gateway.archive.schema import audit_log, retrieval_grants
from gateway.frontend import Frontend
from gateway.grants import GrantMethod, sign_token
from gateway.identity import IdType, person_key
from tests.conftest import auth
from tests.federation import KEY

HOSPITAL = "H50010300001"
PERSON = person_key(IdType.RESIDENT_ID, "11010519491231002X", KEY)
GUARDIAN = person_key(IdType.RESIDENT_ID, "110105194912310019", KEY)
DEVICE, OPERATOR = "FACE-01", "op.wang"
SCAN = b"%PDF-1.4 consent to retrieval signed by the patient " + bytes(range(256))


@dataclass
class Desk:
    fe: Frontend
    keys: dict[GrantMethod, Ed25519PrivateKey]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.fe.http_port}"

    def token(self, method: GrantMethod, key: Ed25519PrivateKey | None = None, **claims: Any) -> str:
        now = int(time.time())
        body: dict[str, Any] = {
            "person": PERSON,
            "institution": HOSPITAL,
            "iat": now - 5,
            "exp": now + 3600,
            "jti": uuid.uuid4().hex,
        }
        if method is GrantMethod.IOT_FACE:
            body |= {"device": DEVICE, "score": 0.97, "captured_at": now - 10}
        if method in (GrantMethod.E_SIGNATURE, GrantMethod.WRITTEN):
            body["document_sha256"] = hashlib.sha256(SCAN).hexdigest()
        if method is GrantMethod.WRITTEN:
            body["operator"] = OPERATOR
        return sign_token(key or self.keys[method], {**body, **claims}, method)

    def post(self, method: GrantMethod, evidence: str, **extra: Any) -> httpx.Response:
        if method in (GrantMethod.E_SIGNATURE, GrantMethod.WRITTEN) and "document" not in extra:
            extra["document"] = base64.b64encode(SCAN).decode()
        body = {"method": method.value, "evidence": evidence, **extra}
        return httpx.post(f"{self.url}/api/v1/grants", json=body, headers=auth(self.fe), timeout=30)


@pytest.fixture
def desk(tmp_path: Path, start_fed_frontend: Callable[..., Frontend]) -> Desk:
    return make_desk(tmp_path, start_fed_frontend)


def make_desk(tmp_path: Path, start_fed_frontend: Callable[..., Frontend], **sections: Any) -> Desk:
    keys = {m: Ed25519PrivateKey.generate() for m in GrantMethod}

    def pem(method: GrantMethod) -> str:
        path = tmp_path / f"{method.value}.pub"
        public = keys[method].public_key()
        path.write_bytes(public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
        return str(path)

    codes = tmp_path / "codes"
    codes.mkdir()
    (codes / "ours.toml").write_text(f'hospital = "{HOSPITAL}"\n[codes]\n"CT001" = "250301001"\n')
    fe = start_fed_frontend(  # no center: the grants need none
        HOSPITAL,
        doctor={"codes_dir": str(codes)},
        grants={
            "insurance_qr_public_keys": [pem(GrantMethod.INSURANCE_QR)],
            "insurance_app_public_keys": [pem(GrantMethod.INSURANCE_APP)],
            "e_signature_public_keys": [pem(GrantMethod.E_SIGNATURE)],
            "face_devices": [{"id": DEVICE, "public_key": pem(GrantMethod.IOT_FACE)}],
            "face_min_score": 0.9,
            "face_max_age_seconds": 120,
            "consent_operators": [{"id": OPERATOR, "public_key": pem(GrantMethod.WRITTEN)}],
        },
        **sections,
    )
    return Desk(fe, keys)


def refusals(fe: Frontend) -> list[dict[str, Any]]:
    fe.audit.flush()
    with fe.archive.catalog.engine.connect() as conn:
        rows = conn.execute(
            select(audit_log.c.resource, audit_log.c.detail).where(
                audit_log.c.event_type == "share", audit_log.c.result == "failure"
            )
        ).all()
    return [{"resource": r.resource, **json.loads(r.detail)} for r in rows]


@pytest.mark.parametrize("method", list(GrantMethod))
def test_each_method_valid_evidence_is_a_grant_and_bad_evidence_is_refused_with_the_reason_audited(
    desk: Desk, method: GrantMethod
) -> None:
    ok = desk.post(method, desk.token(method))
    assert ok.status_code == 201, ok.text
    grant = ok.json()
    assert (grant["method"], grant["person_key"], grant["institution"]) == (method.value, PERSON, HOSPITAL)

    now = int(time.time())
    cases: list[tuple[httpx.Response, int, str]] = [
        (desk.post(method, desk.token(method, Ed25519PrivateKey.generate())), 422, "signature"),
        (desk.post(method, desk.token(method, iat=now - 7200, exp=now - 60)), 422, "expired"),
        (desk.post(method, desk.token(method, institution="H99")), 422, "institution"),
        (desk.post(method, desk.token(method), person_key=GUARDIAN), 403, "another person"),
    ]
    replayed = desk.token(method)
    assert desk.post(method, replayed).status_code == 201
    cases.append((desk.post(method, replayed), 422, "replay"))
    for r, status, reason in cases:
        assert r.status_code == status and reason in r.text, (reason, r.status_code, r.text)
        if status == 403:
            assert r.json()["reason"].startswith("the evidence authorizes another person")
    audited = [a for a in refusals(desk.fe) if a["method"] == method.value]
    assert len(audited) == len(cases)
    for (_r, status, reason), record in zip(cases, audited, strict=True):
        assert reason in record["reason"] and record["status"] == status


def test_family_account_qr_the_guardian_authorizes_for_the_dependent(desk: Desk) -> None:
    qr = GrantMethod.INSURANCE_QR
    ok = desk.post(qr, desk.token(qr, family=True, guardian=GUARDIAN), person_key=PERSON)
    assert ok.status_code == 201, ok.text
    assert ok.json()["person_key"] == PERSON and ok.json()["evidence"].endswith(f":family:{GUARDIAN[:16]}")
    for claims, reason in (
        ({"family": True}, "guardian: a family-account QR code names the guardian"),
        ({"family": True, "guardian": PERSON}, "the guardian and the dependent are the same person"),
        ({"family": True, "guardian": "12345"}, "guardian"),
    ):
        r = desk.post(qr, desk.token(qr, **claims))
        assert r.status_code == 422 and reason in r.text, r.text


def test_face_attestation_needs_a_registered_device_the_score_and_a_fresh_capture(desk: Desk) -> None:
    face, now = GrantMethod.IOT_FACE, int(time.time())
    ok = desk.post(face, desk.token(face, score=0.9))  # the threshold itself is enough
    assert ok.status_code == 201 and f":device:{DEVICE}:score:0.900" in ok.json()["evidence"], ok.text
    for claims, reason in (
        ({"score": 0.89}, "below the required 0.9"),
        ({"score": "high"}, "score: the face match score"),
        ({"captured_at": now - 600}, "stale attestation"),
        ({"captured_at": now + 3600}, "in the future"),
        ({"device": "FACE-99"}, "'FACE-99' is not a registered face-recognition device"),
    ):
        r = desk.post(face, desk.token(face, **claims))
        assert r.status_code == 422 and reason in r.text, (claims, r.text)


@pytest.mark.parametrize("method", [GrantMethod.WRITTEN, GrantMethod.E_SIGNATURE])
def test_a_consent_document_is_checked_against_its_signed_sha256_and_kept_in_the_blob_store(
    desk: Desk, method: GrantMethod
) -> None:
    ok = desk.post(method, desk.token(method))
    assert ok.status_code == 201, ok.text
    ref = ok.json()["document"]
    assert ref == f"consent/{hashlib.sha256(SCAN).hexdigest()}"
    assert b"".join(desk.fe.archive.store.get(ref)) == SCAN  # the scan itself, kept with the grant
    other = base64.b64encode(SCAN + b"tampered").decode()
    for extra, reason in (
        ({"document": other}, "is not the"),
        ({"document": "***"}, "document: not base64"),
    ):
        r = desk.post(method, desk.token(method), **extra)
        assert r.status_code == 422 and reason in r.text, r.text
    missing = httpx.post(
        f"{desk.url}/api/v1/grants",
        json={"method": method.value, "evidence": desk.token(method)},
        headers=auth(desk.fe),
    )
    assert missing.status_code == 422 and "document: the" in missing.text
    if method is GrantMethod.WRITTEN:  # the operator is a registered one
        r = desk.post(method, desk.token(method, operator="op.nobody"))
        assert r.status_code == 422 and "not a registered consent operator" in r.text


def test_without_a_center_the_doctor_routes_answer_503_with_the_reason(desk: Desk) -> None:
    """A front-end with no ``[forward] center_url``: nothing failed upstream, the service is not
    configured here — 503 with the reason, not 502."""
    assert desk.post(GrantMethod.INSURANCE_QR, desk.token(GrantMethod.INSURANCE_QR)).status_code == 201
    base, h = f"{desk.url}/api/v1/patients/{PERSON}", auth(desk.fe)
    for r in (
        httpx.get(f"{base}/history", params={"visit": "2025-11-20", "doctor": "D1"}, headers=h),
        httpx.get(f"{base}/same-exams", params={"order": "CT001", "date": "2025-11-20"}, headers=h),
        httpx.post(f"{base}/studies/1.2.52.1/fetch", params={"doctor": "D1"}, headers=h),
    ):
        assert r.status_code == 503, (r.request.url, r.status_code, r.text)
        assert "no center configured ([forward] center_url)" in r.json()["reason"], r.text


RACERS = 4


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_same_token_posted_at_the_same_moment_is_one_grant_and_the_others_are_replays(
    tmp_path: Path, start_fed_frontend: Callable[..., Frontend], request: pytest.FixtureRequest, backend: str
) -> None:
    """Issue 5 §6 (R-RT-4, R-SE-7): a nonce is accepted once even when posts race. On PostgreSQL
    the transactions run in parallel: every post is held just before its INSERT until all have
    got there, so a check made before the insert (a lookup) sees no grant in any of them; the
    unique index on the nonce must let exactly one commit. SQLite serialises the writers."""
    pg = backend == "postgresql"
    sections = {"database": {"url": request.getfixturevalue("fresh_pg_url")}} if pg else {}
    desk = make_desk(tmp_path, start_fed_frontend, **sections)
    engine = desk.fe.archive.catalog.engine
    gate = threading.Barrier(RACERS if pg else 1, timeout=30)
    held: list[str] = []

    def hold_insert(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO RETRIEVAL_GRANTS"):
            held.append(statement)
            gate.wait()

    token = desk.token(GrantMethod.INSURANCE_QR)
    event.listen(engine, "before_cursor_execute", hold_insert)
    try:
        with ThreadPoolExecutor(RACERS) as pool:
            answers = list(pool.map(lambda _: desk.post(GrantMethod.INSURANCE_QR, token), range(RACERS)))
    finally:
        event.remove(engine, "before_cursor_execute", hold_insert)

    statuses = sorted(r.status_code for r in answers)
    assert statuses == [201] + [422] * (RACERS - 1), [(r.status_code, r.text) for r in answers]
    for r in answers:
        if r.status_code == 422:
            assert "replay: the nonce" in r.json()["error"], r.text
    if pg:
        assert len(held) == RACERS  # the race happened: every post got as far as its INSERT
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(retrieval_grants)).scalar_one() == 1
    audited = [a for a in refusals(desk.fe) if "replay" in a["reason"]]
    assert len(audited) == RACERS - 1 and all(a["status"] == 422 for a in audited)
