"""Users on every route; institution scoping (IDOR); login, MFA, lockout, sessions over HTTP
(issue 6 §2-§3; R-SE-1, R-SE-2, R-SE-3, R-SE-4, R-SE-16).

Real front-end and center apps (uvicorn, SQLite catalog, folder store), real DIMSE to put studies
in, real logins: every user here logged in at ``POST /auth/login`` with a password (and a TOTP
code from pyotp where required). The unauthenticated half of the route walker (401 on every
route but the public ones) is ``test_security_routes.py``; this file adds: every route for a user
of every role → 403 unless the permission table allows it, and a doctor of one hospital cannot
reach another hospital's study by any route.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
from pydicom import dcmread
from sqlalchemy import select

from dimse.scu import send
from gateway.archive.schema import audit_log
from gateway.center import Center
from gateway.frontend import Frontend
from gateway.identity import IdType, load_key, pseudonymise, write_new_key
from gateway.ingest import Accepted
from gateway.security import sensitivity
from gateway.security.guard import PUBLIC, required_scope
from gateway.security.permissions import ACTION_KINDS, PERMISSIONS, SELF, Kind, Reach, Role, permission
from gateway.security.sensitivity import Access, Label, label_access, redact
from gateway.security.sessions import COOKIE, CSRF_COOKIE
from tests.conftest import auth, node_url
from tests.test_exams import exam_body, resident_id
from tests.test_security_routes import call, routes_of

GOOD = "Kx8#vmQ2-tRw9p"
HOME = "TEST_HOSPITAL"  # conftest's front-end institution
OTHER = "H_B"
PEERS = [{"ae_title": "MOD_A", "institution": HOME}, {"ae_title": "MOD_B", "institution": OTHER}]
Node = Frontend | Center


def make_user(node: Node, username: str, role: Role, institution: str = "", **kw: Any) -> str | None:
    """Create an account in the node's catalog (as ``ybyx admin create-user`` does): its TOTP secret."""
    assert node.security.logins is not None
    _, secret = node.security.logins.users.create(username, role, GOOD, institution=institution, **kw)
    return secret


def login(node: Node, username: str, password: str = GOOD, code: str | None = None) -> httpx.Response:
    body = {"username": username, "password": password, **({"totp": code} if code else {})}
    return httpx.post(f"{node_url(node)}/auth/login", json=body, timeout=30)


def user_token(node: Node, username: str, role: Role, institution: str = "", **kw: Any) -> str:
    secret = make_user(node, username, role, institution, **kw)
    r = login(node, username, code=pyotp.TOTP(secret).now() if secret else None)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["role"] == role.value and body["token_type"] == "Bearer"
    return str(body["access_token"])


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def cookies_of(r: httpx.Response) -> dict[str, str]:
    """name → the whole Set-Cookie header (httpx's jar does not keep Secure cookies over http)."""
    return {h.split("=", 1)[0]: h for h in r.headers.get_list("set-cookie")}


# ---- the tables ------------------------------------------------------------------------------------


def test_the_permission_table_is_least_privilege() -> None:
    for p in PERMISSIONS:
        assert p.kind is ACTION_KINDS[p.action]
    # uploads and node-to-node actions are nobody's; the auditor reads only the audit trail
    assert not any(p.action in ("stow", "api:exams", "api:inventory", "api:manifest") for p in PERMISSIONS)
    assert {p.action for p in PERMISSIONS if p.role is Role.AUDITOR} == {"audit:read", SELF}
    assert permission(Role.SYSTEM_ADMIN, "wado") is None and permission(Role.SYSTEM_ADMIN, "qido") is None
    doctor = permission(Role.DOCTOR, "wado")
    assert doctor is not None and doctor.reach is Reach.INSTITUTION
    patient = permission(Role.PATIENT, "qido")
    assert patient is not None and patient.reach is Reach.OWN
    assert permission("superuser", "wado") is None
    # the permission table never grants what the sensitivity labels deny (R-SE-3)
    for p in PERMISSIONS:
        assert sensitivity.may(p.role, p.action), p


def test_sensitivity_labels_mask_id_numbers_always_and_personal_data_for_admins() -> None:
    id_number = resident_id()
    doc = {
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Zhang^San", "Ideographic": "张^三"}]},
        "00100020": {"vr": "LO", "Value": [id_number]},
        "00100030": {"vr": "DA", "Value": ["19800615"]},
        "00101002": {"vr": "SQ", "Value": [{"00100020": {"vr": "LO", "Value": ["X1"]}}]},
        "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
        "0040A730": {"vr": "SQ", "Value": [{"0040A160": {"vr": "UT", "Value": ["no findings"]}}]},
    }
    as_doctor = redact(doc, Role.DOCTOR)
    assert as_doctor["00100020"]["Value"] == [id_number[:4] + "*" * 10 + id_number[-4:]]
    assert as_doctor["00100010"] == doc["00100010"] and as_doctor["0040A730"] == doc["0040A730"]
    assert as_doctor["00101002"] == {"vr": "SQ"}  # other IDs: an identifier, masked (no values)
    as_admin = redact(doc, Role.INSTITUTION_ADMIN)
    assert as_admin["00100010"]["Value"] == [{"Alphabetic": "Z*^S*", "Ideographic": "张*^三*"}]
    assert as_admin["00100030"]["Value"] == ["19800101"]
    assert "0040A730" not in as_admin  # reports: denied
    assert as_admin["0020000D"] == doc["0020000D"]
    hospital_id = {"00100020": {"vr": "LO", "Value": ["MRN-0042"]}}
    assert redact(hospital_id, Role.DOCTOR) == hospital_id  # a hospital's own number is not an ID number
    assert label_access(Role.AUDITOR, Label.IMAGE) is Access.DENY
    assert label_access(Role.AUDITOR, Label.AUDIT) is Access.READ
    assert label_access(Role.DOCTOR, Label.AUDIT) is Access.DENY


# ---- every route, every role -----------------------------------------------------------------------


def expected(node: Node, role: Role, institution: str, action: str) -> bool:
    granted = permission(role, action)
    if granted is None or not sensitivity.may(role, action):
        return False
    if granted.reach is Reach.INSTITUTION and granted.kind is not Kind.STUDY:
        # (api:send acts on studies: its route checks the study and the target, api/send.py)
        return institution == node.security.home_institution and bool(institution)
    return True


def test_every_route_for_a_user_of_every_role(
    start_frontend: Callable[..., Frontend], start_center: Callable[..., Center]
) -> None:
    for node in (start_frontend(), start_center()):
        home = node.security.home_institution or "50"
        people = {
            Role.SYSTEM_ADMIN: "",
            Role.INSTITUTION_ADMIN: home,
            Role.DOCTOR: home,
            Role.PATIENT: "",
            Role.AUDITOR: "",
        }
        tokens = {role: user_token(node, f"u-{role.value}", role, inst) for role, inst in people.items()}
        seen: dict[Role, set[str]] = {role: set() for role in people}
        # logout last: it ends the session the other calls use
        for method, path in sorted(routes_of(node), key=lambda r: r == ("POST", "/auth/logout")):
            if (method, path) in PUBLIC or path.startswith("/viewer"):
                continue
            action = required_scope(method, path)
            assert action is not None, (method, path)
            for role, tok in tokens.items():
                r = call(node, method, path, bearer(tok))
                if expected(node, role, people[role], action):
                    assert r.status_code not in (401, 403), (node.security.role, role, method, path, r.text)
                    seen[role].add(action)
                else:
                    assert r.status_code == 403, (node.security.role, role, method, path, r.status_code)
                    assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
        # what that means, said plainly
        assert seen[Role.AUDITOR] == {SELF}
        assert not seen[Role.SYSTEM_ADMIN] & {"qido", "wado", "stow"}
        assert not seen[Role.PATIENT] - {"qido", "wado", SELF}
        if isinstance(node, Frontend):
            assert {"qido", "wado", SELF} <= seen[Role.DOCTOR]
            assert not seen[Role.DOCTOR] & {"metrics", "api:forwarding", "stow", "api:exams"}
            codes = {"api:codes", "api:codes:write"}  # the code maps (R-CE-4)
            assert seen[Role.SYSTEM_ADMIN] == {"metrics", "api:forwarding", "api:monitoring", SELF} | codes
            assert seen[Role.INSTITUTION_ADMIN] == {"api:forwarding", "api:monitoring", SELF} | codes
        # a client token, even with every scope, is not a user: the session routes refuse it
        assert call(node, "GET", "/auth/whoami", auth(node)).status_code == 403


# ---- IDOR: hospital A's doctor and hospital B's study ----------------------------------------------


@pytest.fixture
def two_hospitals(start_frontend: Callable[..., Frontend], samples: Path, tmp_path: Path) -> dict[str, Any]:
    """A front-end holding a study from an AE of its own hospital and one from hospital B's AE,
    and an exam record (with a patient's ID number) for B's study."""
    key = tmp_path / "pseudonym.key"
    write_new_key(key)
    fe = start_frontend(peers=PEERS, identity={"key_file": str(key)})
    studies = {}
    for ae, folder in (("MOD_A", "03_DX_chest"), ("MOD_B", "05_US_carotid")):
        files = sorted((samples / folder).iterdir())
        assert send(files, "127.0.0.1", fe.dicom_port, "YBYX", calling_ae=ae).ok
        ds = dcmread(files[0], stop_before_pixels=True)
        studies[ae] = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    number = resident_id("77")
    r = httpx.post(
        f"{node_url(fe)}/api/v1/exams",
        json=exam_body(studies["MOD_B"][0], hospital_code=OTHER, id_number=number),
        headers=auth(fe),
        timeout=10,
    )
    assert r.status_code == 201, r.text
    person_key, _ = pseudonymise(IdType.RESIDENT_ID, number, load_key(key))
    return {"fe": fe, "a": studies["MOD_A"], "b": studies["MOD_B"], "person_key": person_key}


def study_paths(study: tuple[str, str, str]) -> list[str]:
    st, se, sop = study
    s, i = f"/dicom-web/studies/{st}", f"/dicom-web/studies/{st}/series/{se}/instances/{sop}"
    return [
        s,
        f"{s}/metadata",
        f"{s}/rendered",
        f"{s}/thumbnail",
        f"{s}/series",
        f"{s}/instances",
        f"{s}/series/{se}",
        f"{s}/series/{se}/metadata",
        f"{s}/series/{se}/instances",
        i,
        f"{i}/metadata",
        f"{i}/frames/1",
        f"{i}/frames/1/rendered",
        f"{i}/rendered",
        f"{i}/thumbnail",
        f"{i}/bulk/7FE00010",
    ]


def found_studies(node: Node, tok: str, resource: str = "studies") -> set[str]:
    r = call(node, "GET", f"/dicom-web/{resource}", bearer(tok))
    assert r.status_code == 200, r.text
    return {item["0020000D"]["Value"][0] for item in r.json()}


def test_a_doctor_sees_only_their_hospitals_studies_by_every_route(two_hospitals: dict[str, Any]) -> None:
    fe: Frontend = two_hospitals["fe"]
    a, b = two_hospitals["a"], two_hospitals["b"]
    doctor_a = user_token(fe, "dr.a", Role.DOCTOR, HOME)
    doctor_b = user_token(fe, "dr.b", Role.DOCTOR, OTHER)
    # QIDO-RS: filtered in the one SQL statement, at every level
    for resource in ("studies", "series", "instances"):
        assert found_studies(fe, doctor_a, resource) == {a[0]}, resource
        assert found_studies(fe, doctor_b, resource) == {b[0]}, resource
    assert found_studies(fe, doctor_a, f"studies?StudyInstanceUID={b[0]}") == set()
    # a node client (no user) still sees both
    assert len(call(fe, "GET", "/dicom-web/studies", auth(fe)).json()) == 2
    nowhere = ("1.2.840.99.404", b[1], b[2])
    missing = call(fe, "GET", study_paths(nowhere)[0], bearer(doctor_a))
    for own, foreign, tok in ((a, b, doctor_a), (b, a, doctor_b)):
        for path in study_paths(own):
            if path.endswith(("/bulk/7FE00010", "/frames/1/rendered")) and own is b:
                continue  # (US sample: RGB, answers vary by renderer; the foreign side is what counts)
            r = call(fe, "GET", path, bearer(tok))
            assert r.status_code not in (401, 403, 404), (path, r.status_code, r.text[:200])
        for path in study_paths(foreign):
            r = call(fe, "GET", path, bearer(tok))
            assert r.status_code == 404, (path, r.status_code)
            # the same answer as for a study that does not exist: nothing learned
            assert (
                r.content == missing.content and r.headers["content-type"] == missing.headers["content-type"]
            )
            assert call(fe, "HEAD", path, bearer(tok)).status_code == 404


def test_a_patient_sees_only_their_own_studies_and_ids_are_masked(two_hospitals: dict[str, Any]) -> None:
    fe: Frontend = two_hospitals["fe"]
    a, b = two_hospitals["a"], two_hospitals["b"]
    patient = user_token(fe, "p.zhang", Role.PATIENT, person_key=two_hospitals["person_key"])
    assert found_studies(fe, patient) == {b[0]}
    assert call(fe, "GET", f"/dicom-web/studies/{b[0]}/metadata", bearer(patient)).status_code == 200
    assert call(fe, "GET", f"/dicom-web/studies/{a[0]}/metadata", bearer(patient)).status_code == 404
    stranger = user_token(fe, "p.nobody", Role.PATIENT)  # no pseudonym on the account: nothing
    assert found_studies(fe, stranger) == set()


def test_a_doctor_never_sees_a_resident_id_number(
    start_frontend: Callable[..., Frontend], tmp_path: Path
) -> None:
    from gateway.sample import write_samples

    out = tmp_path / "s"
    files = [p for p in write_samples(out, ct_slices=1) if "03_DX" in str(p)]
    number = resident_id("55")
    ds = dcmread(files[0])
    ds.PatientID = number  # some hospitals key patients by their ID card number
    ds.save_as(files[0])
    fe = start_frontend()
    assert send(files, "127.0.0.1", fe.dicom_port, "YBYX").ok
    doctor = user_token(fe, "dr.mask", Role.DOCTOR, HOME)
    [found] = call(fe, "GET", "/dicom-web/studies?includefield=all", bearer(doctor)).json()
    assert found["00100020"]["Value"] == [number[:4] + "*" * 10 + number[-4:]]
    meta = call(fe, "GET", f"/dicom-web/studies/{ds.StudyInstanceUID}/metadata", bearer(doctor))
    assert number not in meta.text and number[:4] + "*" * 10 in meta.text
    # the node client (the archive's peers) gets the data as stored
    assert number in call(fe, "GET", f"/dicom-web/studies/{ds.StudyInstanceUID}/metadata", auth(fe)).text


def test_at_the_center_a_study_belongs_to_the_hospital_of_its_exam_record(
    start_center: Callable[..., Center], samples: Path
) -> None:
    """The center knows institutions from the exam records front-ends forward; a study without one
    is visible to no hospital's doctor (fail closed)."""
    center = start_center()
    uids = []
    for folder in ("03_DX_chest", "05_US_carotid", "04_XA_coronary"):
        [path] = sorted((samples / folder).iterdir())[:1]
        assert isinstance(center.ingest.accept_file(path, source="STOW-test"), Accepted)
        uids.append(str(dcmread(path, stop_before_pixels=True).StudyInstanceUID))
    for uid, hospital, n in ((uids[0], HOME, "1"), (uids[1], OTHER, "2")):
        body = exam_body(uid, hospital_code=hospital, accession_number=f"ACC-{n}")
        del body["id_number"], body["id_type"]
        body.update(id_type="resident-id", person_key=n * 64, id_masked="1101**********0000")
        r = httpx.post(f"{node_url(center)}/api/v1/exams", json=body, headers=auth(center), timeout=10)
        assert r.status_code == 200, r.text
    doctor_a = user_token(center, "dr.c.a", Role.DOCTOR, HOME)
    doctor_b = user_token(center, "dr.c.b", Role.DOCTOR, OTHER)
    assert found_studies(center, doctor_a) == {uids[0]}
    assert found_studies(center, doctor_b) == {uids[1]}
    for tok in (doctor_a, doctor_b):  # the third study has no exam record yet: nobody's
        assert call(center, "GET", f"/dicom-web/studies/{uids[2]}/metadata", bearer(tok)).status_code == 404
    assert call(center, "GET", f"/dicom-web/studies/{uids[1]}/metadata", bearer(doctor_a)).status_code == 404
    assert call(center, "GET", f"/dicom-web/studies/{uids[0]}/metadata", bearer(doctor_a)).status_code == 200


# ---- logins over HTTP --------------------------------------------------------------------------------


def audit_rows(node: Node, event: str) -> list[Any]:
    node.audit.flush()
    with node.archive.catalog.engine.connect() as conn:
        return list(
            conn.execute(
                select(audit_log.c.actor, audit_log.c.result, audit_log.c.detail, audit_log.c.source)
                .where(audit_log.c.event_type == event)
                .order_by(audit_log.c.seq)
            )
        )


def test_admins_need_a_totp_code_and_logins_are_audited(start_frontend: Callable[..., Frontend]) -> None:
    fe = start_frontend()
    secret = make_user(fe, "ops", Role.SYSTEM_ADMIN)
    assert secret is not None
    r = login(fe, "ops")
    assert r.status_code == 401 and r.json()["error"] == "mfa_required" and COOKIE not in cookies_of(r)
    assert login(fe, "ops", code="123456").status_code == 401
    r = login(fe, "ops", code=pyotp.TOTP(secret).now())
    assert r.status_code == 200, r.text
    tok = r.json()["access_token"]
    assert call(fe, "GET", "/metrics", bearer(tok)).status_code == 200
    who = call(fe, "GET", "/auth/whoami", bearer(tok)).json()
    assert who["username"] == "ops" and who["role"] == "system-admin" and "metrics" in who["actions"]
    assert login(fe, "ops", "Wrong-Password-1").json()["error"] == "invalid_credentials"
    assert login(fe, "ghost", "Wrong-Password-1").json()["error"] == "invalid_credentials"  # same answer
    rows = audit_rows(fe, "login")
    outcomes = [(r.actor, r.result, json.loads(r.detail)["reason"]) for r in rows]
    assert outcomes == [
        ("ops", "failure", "second factor required"),
        ("ops", "failure", "wrong or reused TOTP code"),
        ("ops", "success", "ok"),
        ("ops", "failure", "wrong password"),
        ("ghost", "failure", "unknown user"),
    ]
    assert {r.source for r in rows} == {"127.0.0.1"}


def test_brute_force_on_login_is_locked_with_retry_after(start_frontend: Callable[..., Frontend]) -> None:
    fe = start_frontend(security={"users": {"lockout_threshold": 3, "lockout_base_seconds": 120}})
    make_user(fe, "dr.target", Role.DOCTOR, HOME)
    answers = [login(fe, "dr.target", f"Guess-number-{n}") for n in range(3)]
    assert [r.status_code for r in answers] == [401, 401, 429]
    assert 110 < int(answers[-1].headers["retry-after"]) <= 120
    right = login(fe, "dr.target")  # even the right password now waits
    assert right.status_code == 429 and right.json()["error"] == "locked"
    reasons = [json.loads(r.detail)["reason"] for r in audit_rows(fe, "login")]
    assert reasons == ["wrong password", "wrong password", "wrong password; now locked", "account locked"]
    [anomaly] = audit_rows(fe, "anomaly")  # the lock itself, once, for an alert
    assert anomaly.actor == "dr.target" and json.loads(anomaly.detail)["locked_seconds"] == 120


def test_cookie_sessions_need_csrf_and_logout_ends_cookie_and_tokens(
    start_frontend: Callable[..., Frontend],
) -> None:
    fe = start_frontend()
    make_user(fe, "dr.web", Role.DOCTOR, HOME)
    r = login(fe, "dr.web")
    assert r.status_code == 200
    set_cookies = cookies_of(r)
    session = set_cookies[COOKIE]
    for attribute in ("HttpOnly", "Secure", "SameSite=strict", "Path=/"):
        assert attribute.lower() in session.lower(), (attribute, session)
    assert "httponly" not in set_cookies[CSRF_COOKIE].lower()  # the page's script reads this one
    secret = session.split("=", 1)[1].split(";")[0]
    csrf, tok = r.json()["csrf_token"], r.json()["access_token"]
    jar = {"Cookie": f"{COOKIE}={secret}"}
    who = call(fe, "GET", "/auth/whoami", jar)
    assert who.status_code == 200 and who.json()["via"] == "cookie"
    assert call(fe, "GET", "/dicom-web/studies", jar).status_code == 200
    # a page on another site cannot make the browser post with it: no CSRF token, refused
    r = call(fe, "POST", "/auth/logout", jar)
    assert r.status_code == 403 and r.json()["error"] == "csrf"
    assert call(fe, "POST", "/auth/logout", {**jar, "X-CSRF-Token": "forged"}).status_code == 403
    fresh = call(fe, "POST", "/auth/token", bearer(tok))
    assert fresh.status_code == 200 and fresh.json()["expires_in"] == 300
    r = call(fe, "POST", "/auth/logout", {**jar, "X-CSRF-Token": csrf})
    assert r.status_code == 200
    # ended: the cookie and every token of the session, at once
    for headers in (jar, bearer(tok), bearer(fresh.json()["access_token"])):
        r = call(fe, "GET", "/auth/whoami", headers)
        assert r.status_code == 401, headers
    assert [row.actor for row in audit_rows(fe, "logout")] == ["dr.web"]
