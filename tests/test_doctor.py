"""The doctor workstation on a front-end (issue 5 §6–8): patient authorization (R-RT-4, R-CQ-5),
history in the 3-year window with report, QC grade and cache flag (R-RT-1, R-RT-3, R-SC-4), same-
exam reminders through the code map (R-RT-2, R-CE-4), citations (R-VW-3). A federation on loopback:
index → center 50 → front-end H50010300001; records of another province's hospital at the index."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import select

from gateway.archive.schema import audit_log, citations
from gateway.center import Center
from gateway.frontend import Frontend
from gateway.grants import GrantDenied, GrantMethod, RetrievalGrant, check_grant, sign_qr
from gateway.identity import IdType, person_key
from gateway.security.permissions import Role
from gateway.workstation import history_window, same_exam_window
from index.service import NationalIndex
from tests.conftest import auth
from tests.federation import (
    KEY,
    store_study,
    tiny_study,
)
from tests.peers.ports import free_port
from tests.test_authz import bearer, user_token

CST = timezone(timedelta(hours=8))
HOSPITAL, OTHER = "H50010300001", "H52000000001"
PERSON = person_key(IdType.RESIDENT_ID, "11010519491231002X", KEY)
STRANGER = person_key(IdType.RESIDENT_ID, "110105194912310019", KEY)


@dataclass
class Federation:
    index: NationalIndex
    center: Center
    fe: Frontend
    platform: Ed25519PrivateKey  # the insurance platform's QR signing key

    def qr(self, person: str = PERSON, **claims: Any) -> str:
        now = time.time()
        body = {"person": person, "institution": HOSPITAL, "iat": int(now) - 5, "exp": int(now) + 3600}
        return sign_qr(self.platform, {"jti": f"qr-{now}-{len(claims)}", **body, **claims})

    def grant(self, **claims: Any) -> httpx.Response:
        body = {"method": "insurance-qr", "evidence": self.qr(**claims)}
        return httpx.post(f"{self.fe_url}/api/v1/grants", json=body, headers=auth(self.fe))

    @property
    def fe_url(self) -> str:
        return f"http://127.0.0.1:{self.fe.http_port}"


def index_record(study: str, day: date, **kw: Any) -> dict[str, Any]:
    return {
        "study_uid": study,
        "person_key": PERSON,
        "id_type": "resident-id",
        "exam_time": datetime(day.year, day.month, day.day, 10, 0, tzinfo=CST).isoformat(),
        "modality": "CT",
        "body_part": "CHEST",
        "exam_item_code": "GZ-CT-9",
        "exam_item_name": "胸部CT平扫",
        "hospital_code": OTHER,
        "hospital_level": "三级甲等",
        "province": "52",
        "center": "urn:ybyx:center:52",
        "description": "双肺纹理清晰。",
        "diagnosis": "未见明显异常。",
        **kw,
    }


RECORDS = [
    index_record("1.2.52.1", date(2022, 11, 20), qc_grade="甲"),  # first day of the window
    index_record("1.2.52.2", date(2022, 11, 19)),  # one day too old
    index_record("1.2.52.3", date(2025, 10, 21), qc_grade="甲"),  # 30 days before the order
    index_record("1.2.52.4", date(2025, 10, 19), qc_grade="甲"),  # 32 days before
    index_record("1.2.52.5", date(2025, 11, 10), qc_grade="丙"),  # not of diagnostic quality
    index_record("1.2.52.8", date(2025, 11, 12), qc_grade="废"),  # reject grade (what QC writes)
    index_record("1.2.52.6", date(2025, 11, 1), exam_item_code="GZ-XX-1"),  # no mapping
    index_record("1.2.52.7", date(2024, 5, 1), hospital_code=HOSPITAL, exam_item_code="CT001"),  # ours
]


@pytest.fixture
def fed(
    tmp_path: Path,
    start_index: Callable[..., NationalIndex],
    start_fed_center: Callable[..., Center],
    start_fed_frontend: Callable[..., Frontend],
) -> Federation:
    port = free_port()
    index = start_index(
        provinces=[
            {"code": "50", "center_url": f"http://127.0.0.1:{port}"},
            {"code": "52", "center_url": "http://127.0.0.1:9"},
        ]
    )
    center = start_fed_center("50", index=index, port=port)
    codes = tmp_path / "codes"
    codes.mkdir()
    (codes / "ours.toml").write_text(f'hospital = "{HOSPITAL}"\n[codes]\n"CT001" = "250301001"\n')
    (codes / "gz.toml").write_text(f'hospital = "{OTHER}"\n[codes]\n"GZ-CT-9" = "250301001"\n')
    platform = Ed25519PrivateKey.generate()
    pem = tmp_path / "insurance-platform.pub"
    pem.write_bytes(platform.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    fe = start_fed_frontend(
        HOSPITAL,
        center=center,
        doctor={"codes_dir": str(codes)},
        grants={"insurance_qr_public_keys": [str(pem)]},
    )
    h = auth(index)
    for rec in RECORDS:
        r = httpx.post(f"{index.url}/api/v1/index-records", json=rec, headers=h)
        assert r.status_code == 201, r.text
    store_study(fe, tiny_study(tmp_path / "cached", "1.2.52.1"))  # already in the front-end's cache
    return Federation(index, center, fe, platform)


def test_history_is_the_3_year_window_at_other_institutions_with_report_grade_and_cache(
    fed: Federation,
) -> None:
    assert fed.grant().status_code == 201
    r = httpx.get(
        f"{fed.fe_url}/api/v1/patients/{PERSON}/history", params={"visit": "2025-11-20"}, headers=auth(fed.fe)
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["from"], body["to"]) == ("2022-11-20", "2025-11-20")
    got = {s["study_uid"]: s for s in body["studies"]}
    # not 1.2.52.2 (a day too old) nor 1.2.52.7 (our own institution)
    assert set(got) == {"1.2.52.1", "1.2.52.3", "1.2.52.4", "1.2.52.5", "1.2.52.6", "1.2.52.8"}
    first = got["1.2.52.1"]
    assert first["exam_date"] == "2022-11-20" and first["qc_grade"] == "甲" and first["cached"] is True
    assert first["report"] == {"description": "双肺纹理清晰。", "diagnosis": "未见明显异常。"}
    assert got["1.2.52.3"]["cached"] is False and got["1.2.52.6"]["qc_grade"] is None


def test_same_exam_30_days_before_is_reminded_32_is_not_nor_a_reject_grade(fed: Federation) -> None:
    assert fed.grant().status_code == 201
    r = httpx.get(
        f"{fed.fe_url}/api/v1/patients/{PERSON}/same-exams",
        params={"order": "CT001", "date": "2025-11-20"},
        headers=auth(fed.fe),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["insurance_item_code"] == "250301001"
    assert [(s["study_uid"], s["days_ago"]) for s in body["same_exams"]] == [("1.2.52.3", 30)]
    assert body["unmapped"] == [{"hospital": OTHER, "code": "GZ-XX-1"}]
    maps = httpx.get(f"{fed.fe_url}/api/v1/code-maps", headers=auth(fed.fe)).json()
    assert {"hospital": OTHER, "code": "GZ-XX-1"} in maps["unmapped"]
    unmapped_order = httpx.get(
        f"{fed.fe_url}/api/v1/patients/{PERSON}/same-exams",
        params={"order": "CT999", "date": "2025-11-20"},
        headers=auth(fed.fe),
    )
    assert unmapped_order.status_code == 422 and "CT999" in unmapped_order.text


def _audit_reasons(fe: Frontend) -> list[str]:
    with fe.archive.catalog.engine.connect() as conn:
        details = conn.scalars(select(audit_log.c.detail).where(audit_log.c.result == "failure")).all()
    return [d for d in details if "reason" in d]


def test_no_grant_expired_grant_or_another_institutions_grant_is_403_audited_and_recorded_at_the_index(
    fed: Federation,
) -> None:
    url, h = f"{fed.fe_url}/api/v1/patients", auth(fed.fe)
    no_grant = httpx.get(f"{url}/{PERSON}/history", params={"visit": "2025-11-20", "doctor": "D1"}, headers=h)
    assert no_grant.status_code == 403 and "no authorization" in no_grant.json()["reason"]

    ws = fed.fe.workstation
    assert ws is not None
    now = datetime.now(UTC)
    ws.grants.add(
        RetrievalGrant(STRANGER, "H99", now, now + timedelta(hours=1), GrantMethod.WRITTEN, "doc:1")
    )
    other = httpx.get(f"{url}/{STRANGER}/history", params={"visit": "2025-11-20"}, headers=h)
    assert other.status_code == 403 and "another institution" in other.json()["reason"]

    assert fed.grant(doctor="D1").status_code == 201
    assert httpx.get(
        f"{url}/{PERSON}/history", params={"visit": "2025-11-20", "doctor": "D1"}, headers=h
    ).is_success
    other_doctor = httpx.get(
        f"{url}/{PERSON}/history", params={"visit": "2025-11-20", "doctor": "D2"}, headers=h
    )
    assert other_doctor.status_code == 403 and "another doctor" in other_doctor.json()["reason"]
    ws.clock = lambda: datetime.now(UTC) + timedelta(hours=2)  # the one clock, moved past the expiry
    expired = httpx.get(f"{url}/{PERSON}/history", params={"visit": "2025-11-20", "doctor": "D1"}, headers=h)
    assert expired.status_code == 403 and "expired" in expired.json()["reason"]

    reasons = _audit_reasons(fed.fe)
    for words in ("no authorization", "another institution", "another doctor", "expired"):
        assert any(words in r for r in reasons), (words, reasons)

    ih = auth(fed.index)

    def at_index() -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = httpx.get(
            f"{fed.index.url}/api/v1/retrievals", params={"result": "denied"}, headers=ih
        ).json()
        return rows

    deadline = time.monotonic() + 15
    while len(at_index()) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    denied = at_index()
    assert len(denied) == 4 and {d["institution"] for d in denied} == {HOSPITAL}
    assert {d["node"] for d in denied} == {f"urn:ybyx:frontend:{HOSPITAL}"}
    allowed = httpx.get(f"{fed.index.url}/api/v1/retrievals", params={"result": "allowed"}, headers=ih).json()
    assert [a["action"] for a in allowed] == ["history"] and allowed[0]["grant_id"]


def test_grant_evidence_is_verified(fed: Federation) -> None:
    h = auth(fed.fe)
    forged = sign_qr(Ed25519PrivateKey.generate(), {"person": PERSON, "institution": HOSPITAL})
    for evidence, reason in (
        (forged, "signature"),
        (fed.qr(institution="H99"), "institution"),
        (fed.qr(exp=int(time.time()) - 10), "expired"),
        (fed.qr(exp=int(time.time()) + 90 * 86400), "longer"),
        ("not-a-qr", "not an insurance QR"),
    ):
        r = httpx.post(
            f"{fed.fe_url}/api/v1/grants", json={"method": "insurance-qr", "evidence": evidence}, headers=h
        )
        assert r.status_code == 422 and reason in r.text, (reason, r.text)
    r = httpx.post(f"{fed.fe_url}/api/v1/grants", json={"method": "iot-face", "evidence": "x"}, headers=h)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "method"
    no_guardian = fed.grant(family=True, studies=["1.2.52.3"])  # a family-account code names the guardian
    assert no_guardian.status_code == 422 and "guardian" in no_guardian.text
    ok = fed.grant(family=True, guardian=STRANGER, studies=["1.2.52.3"])  # 亲情账户: guardian for dependent
    assert ok.status_code == 201 and ok.json()["studies"] == ["1.2.52.3"], ok.text
    assert ok.json()["evidence"].endswith(f":family:{STRANGER[:16]}") and ok.json()["person_key"] == PERSON
    # a listed-studies grant shows only those studies
    r = httpx.get(f"{fed.fe_url}/api/v1/patients/{PERSON}/history", params={"visit": "2025-11-20"}, headers=h)
    assert [s["study_uid"] for s in r.json()["studies"]] == ["1.2.52.3"]


def test_check_grant_reasons_in_order() -> None:
    now = datetime(2025, 11, 20, 2, tzinfo=UTC)
    g = RetrievalGrant(
        PERSON,
        HOSPITAL,
        now - timedelta(hours=1),
        now + timedelta(hours=1),
        GrantMethod.INSURANCE_QR,
        window_from=date(2022, 11, 20),
        window_to=date(2025, 11, 20),
    )
    kw: dict[str, Any] = {"person_key": PERSON, "institution": HOSPITAL, "doctor": None, "now": now}
    assert check_grant([g], **kw, study_date=date(2022, 11, 20)) is g
    for grants, extra, reason in (
        ([], {}, "no authorization"),
        ([g], {"institution": "H99"}, "another institution"),
        ([g], {"now": now + timedelta(hours=2)}, "expired"),
        ([g], {"study_date": date(2022, 11, 19)}, "outside the scope"),
    ):
        with pytest.raises(GrantDenied, match=reason):
            check_grant(grants, **{**kw, **extra})


def test_windows_edges() -> None:
    assert history_window(date(2025, 11, 20)) == (date(2022, 11, 20), date(2025, 11, 20))
    assert history_window(date(2024, 2, 29)) == (date(2021, 2, 28), date(2024, 2, 29))
    assert same_exam_window(date(2025, 11, 20)) == (date(2025, 10, 21), date(2025, 11, 20))


def test_citations_have_unique_ids(fed: Federation) -> None:
    body = {
        "person_key": PERSON,
        "study_uid": "1.2.52.3",
        "section": "impression",
        "text": "未见明显异常。",
        "doctor": "D1",
    }
    a = httpx.post(f"{fed.fe_url}/api/v1/citations", json=body, headers=auth(fed.fe))
    b = httpx.post(f"{fed.fe_url}/api/v1/citations", json=body, headers=auth(fed.fe))
    assert a.status_code == b.status_code == 201 and a.json()["citation_id"] != b.json()["citation_id"]
    bad = httpx.post(f"{fed.fe_url}/api/v1/citations", json={**body, "section": "all"}, headers=auth(fed.fe))
    assert bad.status_code == 422


def test_a_logged_in_doctor_is_the_doctor_and_a_node_client_names_the_doctor(fed: Federation) -> None:
    """Issue 5 §7 × issue 6 §3 (R-SE-2, R-SE-4): the doctor role has ``api:doctor`` at its own
    hospital's front-end; a user's doctor identity is the session's, a ``doctor`` naming someone
    else is refused 403 and audited; the HIS (a node client) keeps naming the doctor."""
    dr = bearer(user_token(fed.fe, "dr.li", Role.DOCTOR, HOSPITAL))
    assert fed.grant(doctor="dr.li").status_code == 201  # the patient authorized dr.li only
    url, visit = f"{fed.fe_url}/api/v1/patients/{PERSON}", {"visit": "2025-11-20"}
    mine = httpx.get(f"{url}/history", params=visit, headers=dr)
    assert mine.status_code == 200 and mine.json()["studies"], mine.text
    assert httpx.get(f"{url}/history", params={**visit, "doctor": "dr.li"}, headers=dr).status_code == 200
    spoof = httpx.get(f"{url}/history", params={**visit, "doctor": "D1"}, headers=dr)
    assert spoof.status_code == 403 and "not the logged-in doctor" in spoof.json()["reason"]
    r = httpx.get(f"{url}/same-exams", params={"order": "CT001", "date": "2025-11-20"}, headers=dr)
    assert r.status_code == 200 and [s["study_uid"] for s in r.json()["same_exams"]] == ["1.2.52.3"]
    fetch = httpx.post(f"{url}/studies/1.2.52.1/fetch", params={"doctor": "D1"}, headers=dr)
    assert fetch.status_code == 403 and "not the logged-in doctor" in fetch.json()["reason"]

    cite = {"person_key": PERSON, "study_uid": "1.2.52.3", "section": "findings", "text": "双肺纹理清晰。"}
    c = httpx.post(f"{fed.fe_url}/api/v1/citations", json=cite, headers=dr)
    assert c.status_code == 201, c.text
    with fed.fe.archive.catalog.engine.connect() as conn:
        cid = c.json()["citation_id"]
        who = conn.scalar(select(citations.c.doctor).where(citations.c.citation_id == cid))
    assert who == "dr.li"
    forged = httpx.post(f"{fed.fe_url}/api/v1/citations", json={**cite, "doctor": "D1"}, headers=dr)
    assert forged.status_code == 403

    # the HIS names the doctor: the grant's doctor passes, another is refused by the grant
    h = auth(fed.fe)
    assert httpx.get(f"{url}/history", params={**visit, "doctor": "dr.li"}, headers=h).status_code == 200
    other = httpx.get(f"{url}/history", params={**visit, "doctor": "D1"}, headers=h)
    assert other.status_code == 403 and "another doctor" in other.json()["reason"]
    unnamed = httpx.post(f"{fed.fe_url}/api/v1/citations", json=cite, headers=h)
    assert unnamed.status_code == 422 and "doctor" in unnamed.text
    # another hospital's doctor and a patient have no doctor workstation here
    for name, role, inst in (("dr.wu", Role.DOCTOR, OTHER), ("pt.zhang", Role.PATIENT, "")):
        tok = bearer(user_token(fed.fe, name, role, inst, **({"person_key": PERSON} if inst == "" else {})))
        assert httpx.get(f"{url}/history", params=visit, headers=tok).status_code == 403, name
    reasons = _audit_reasons(fed.fe)
    assert sum("not the logged-in doctor" in r for r in reasons) == 3, reasons
