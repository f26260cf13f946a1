"""History caching and cross-province retrieval (issue 5 §3–5): R-SC-3, R-CA-1..4, R-CE-6, R-CE-7,
R-CE-9, R-CE-11, R-SE-11. A federation on loopback: the index, Guizhou's center (52) holding a
study of the patient, Chongqing's center (50) and a front-end in Chongqing; the one clock of each
node is moved to run the next-day jobs and the retention cleanup."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import select

from gateway.archive.schema import audit_log
from gateway.cache import CST, CacheService, next_run
from gateway.center import Center
from gateway.clock import NodeClock
from gateway.frontend import Frontend
from gateway.grants import GrantMethod, RetrievalGrant, sign_qr
from gateway.identity import IdType, person_key, resident_id_check
from gateway.security.permissions import Role
from index.service import NationalIndex
from tests.conftest import auth
from tests.federation import (
    CENTER_AT_CENTER,
    KEY,
    client_at,
    exam_body,
    store_study,
    tiny_study,
)
from tests.peers.ports import free_port
from tests.test_authz import bearer, found_studies, user_token
from tests.test_security_routes import call

CST_NOW = datetime.now(UTC)
ID_NUMBER = "11010519491231002X"
PERSON = person_key(IdType.RESIDENT_ID, ID_NUMBER, KEY)
HOSPITAL = "H50010300001"
STUDY = "1.2.52.77"
PLATFORM = Ed25519PrivateKey.generate()  # the insurance platform's QR signing key


@dataclass
class Fed:
    index: NationalIndex
    c50: Center
    fe: Frontend
    port52: int
    start52: Callable[[], Center]


def clock_of(svc: CacheService | None) -> NodeClock:
    assert svc is not None and isinstance(svc.book.clock, NodeClock)
    return svc.book.clock


def holding_center(start: Callable[..., Center], index: NationalIndex, port: int, tmp: Path) -> Center:
    """Guizhou's center with the patient's study, archived and registered at the index."""
    c52 = start("52", index=index, port=port)
    manifest = store_study(c52, tiny_study(tmp / "s52", STUDY, count=3))
    h = auth(c52)
    exam = exam_body(STUDY, PERSON, at=CST_NOW - timedelta(days=100), item="GZ-CT-9")
    assert httpx.post(f"{c52.url}/api/v1/exams", json=exam, headers=h).status_code == 200
    httpx.put(f"{c52.url}/api/v1/studies/{STUDY}/manifest", json={"instances": manifest}, headers=h)
    return c52


@pytest.fixture
def fed(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    start_index: Callable[..., NationalIndex],
    start_fed_center: Callable[..., Center],
    start_fed_frontend: Callable[..., Frontend],
) -> Fed:
    p50, p52 = free_port(), free_port()
    on_pg = getattr(request, "param", "sqlite") == "postgresql"  # index and center 50 on PostgreSQL
    pg: Callable[[], str] | None = request.getfixturevalue("new_pg_db") if on_pg else None
    index = start_index(
        db_url=pg() if pg else None,
        provinces=[
            {"code": "50", "center_url": f"http://127.0.0.1:{p50}"},
            {"code": "52", "center_url": f"http://127.0.0.1:{p52}"},
        ],
    )
    # Chongqing's center is a client of Guizhou's (registered in Guizhou's client registry);
    # Guizhou's center is then stopped, so each test starts it when it should be up.
    c52_for_keys = holding_center(start_fed_center, index, p52, tmp_path)
    cid, secret = client_at(c52_for_keys, "center-50", CENTER_AT_CENTER, tmp_path)
    c52_for_keys.stop()
    peers = [{"province": "52", "client_id": cid, "client_secret_file": str(secret)}]
    platform_pem = tmp_path / "insurance-platform.pub"  # the center takes grants for its institutions
    public = PLATFORM.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    platform_pem.write_bytes(public)
    c50 = start_fed_center(
        "50",
        index=index,
        port=p50,
        db_url=pg() if pg else None,
        center_peers=peers,
        cache={"backoff_initial_seconds": 60},
        grants={"insurance_qr_public_keys": [str(platform_pem)]},
    )
    key_file = tmp_path / "pseudonym.key"
    key_file.write_text(KEY.hex() + "\n")
    key_file.chmod(0o600)
    fe = start_fed_frontend(HOSPITAL, center=c50, identity={"key_file": str(key_file)})
    cfg52 = c52_for_keys.cfg

    def start52() -> Center:
        return Center.start(cfg52)

    return Fed(index, c50, fe, p52, start52)


def cache_request(fe: Frontend, **kw: Any) -> httpx.Response:
    body = {
        "name": "张三丰",
        "id_type": "resident-id",
        "id_number": ID_NUMBER,
        "department": "呼吸内科",
        "visit_time": (CST_NOW + timedelta(days=3)).isoformat(),
        "consent": True,
        **kw,
    }
    return httpx.post(f"http://127.0.0.1:{fe.http_port}/api/v1/cache-requests", json=body, headers=auth(fe))


def test_cache_request_needs_consent_and_a_valid_id(fed: Fed) -> None:
    wrong_check = ID_NUMBER[:-1] + "5"
    first17 = "50010319900307123"
    for kw, field, words in (
        ({"consent": False}, "consent", "consent"),
        ({"id_number": wrong_check}, "id_number", "check character"),
        ({"id_number": ID_NUMBER[:-2]}, "id_number", "18 characters"),
        ({"id_type": "driving-licence"}, "id_type", ""),
        (
            {"id_number": first17 + resident_id_check(first17)[::-1], "visit_time": "not a time"},
            "visit_time",
            "",
        ),
    ):
        r = cache_request(fed.fe, **kw)
        assert r.status_code == 422, (kw, r.text)
        errors = {e["field"]: e["message"] for e in r.json()["errors"]}
        assert field in errors and words in errors[field], (kw, errors)


@pytest.mark.parametrize("fed", ["sqlite", "postgresql"], indirect=True)
def test_registration_next_day_jobs_cache_the_history_and_the_doctor_is_served_locally(fed: Fed) -> None:
    c52 = fed.start52()
    try:
        r = cache_request(fed.fe)
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["pushed_to_center"] and body["name_masked"] == "张**" and "id_number" not in body
        rid = body["request_id"]
        at_center = httpx.get(f"{fed.c50.url}/api/v1/cache-requests", headers=auth(fed.c50)).json()
        assert [(x["request_id"], x["state"], x["person_key"]) for x in at_center] == [
            (rid, "pending", PERSON)
        ]

        # the center's job runs on the next day, not before
        c50_cache, fe_cache = fed.c50.cache, fed.fe.workstation.cache if fed.fe.workstation else None
        assert c50_cache is not None and fe_cache is not None
        assert c50_cache.run_once() == {}
        clock_of(c50_cache).set(next_run(datetime.now(UTC), "01:00") + timedelta(minutes=1))
        assert c50_cache.run_once() == {rid: "completed"}
        [done] = c50_cache.book.search()
        assert (done["label"], done["studies_total"], done["studies_done"]) == ("已完成", 1, 1)
        assert c50_cache.area.holds(STUDY)  # out-of-province study fetched, a copy kept (R-CE-7)
        assert len(fed.c50.archive.catalog.locate({"StudyInstanceUID": STUDY})) == 3

        # the front-end's job completes the local cache before the visit day (R-CA-3)
        clock_of(fe_cache).set(next_run(datetime.now(UTC), "01:00") + timedelta(minutes=5))
        assert fe_cache.run_once() == {rid: "completed"}
        [fe_done] = fe_cache.book.search()
        assert fe_done["completed_at"] < (CST_NOW + timedelta(days=2)).isoformat()
        local = httpx.get(
            f"http://127.0.0.1:{fed.fe.http_port}/dicom-web/studies",
            params={"StudyInstanceUID": STUDY},
            headers=auth(fed.fe),
        )
        assert local.status_code == 200 and len(local.json()) == 1  # the doctor's retrieval is a local hit
    finally:
        c52.stop()

    # retention: the front-end's copy goes 1 day after the visit, the center's after 1 month
    visit = CST_NOW + timedelta(days=3)
    clock_of(fe_cache).set(visit + timedelta(days=3))
    fe_cache.run_once()
    assert not fe_cache.area.holds(STUDY)
    clock_of(c50_cache).set(visit + timedelta(days=3))
    c50_cache.run_once()
    assert c50_cache.area.holds(STUDY)  # still within the month (R-CE-11)
    # an archive original of the center is never touched by the cleanup
    manifest = store_study(fed.c50, tiny_study(Path(fed.c50.cfg.storage.path).parent / "orig", "1.2.50.9"))
    h = auth(fed.c50)
    exam = exam_body("1.2.50.9", PERSON, at=CST_NOW - timedelta(days=5))
    assert httpx.post(f"{fed.c50.url}/api/v1/exams", json=exam, headers=h).status_code == 200
    httpx.put(f"{fed.c50.url}/api/v1/studies/1.2.50.9/manifest", json={"instances": manifest}, headers=h)
    clock_of(c50_cache).set(visit + timedelta(days=40))
    c50_cache.run_once()
    assert not c50_cache.area.holds(STUDY)
    assert len(fed.c50.archive.catalog.locate({"StudyInstanceUID": "1.2.50.9"})) == 2


def test_a_holding_center_down_is_retried_three_times_then_failed_with_an_alert_then_recached(
    fed: Fed,
) -> None:
    assert cache_request(fed.fe).status_code == 201
    svc = fed.c50.cache
    assert svc is not None
    clock = clock_of(svc)
    clock.set(next_run(datetime.now(UTC), "01:00") + timedelta(minutes=1))
    states = []
    for _ in range(4):  # the first round and three retries, each after its backoff
        [state] = svc.run_once().values()
        states.append(state)
        clock.advance(timedelta(minutes=10))
    assert states == ["pending", "pending", "pending", "failed"]
    [row] = svc.book.search()
    assert row["attempts"] == 4 and "Connection refused" in row["last_error"]
    with fed.c50.archive.catalog.engine.connect() as conn:
        alerts = conn.scalars(select(audit_log.c.detail).where(audit_log.c.event_type == "anomaly")).all()
    assert any("R-CE-9" in a for a in alerts)
    assert svc.run_once() == {}  # not again the same day
    c52 = fed.start52()
    try:
        clock.set(next_run(clock(), "01:00") + timedelta(minutes=1))
        assert svc.run_once() == {row["request_id"]: "completed"}
        assert svc.area.holds(STUDY)
    finally:
        c52.stop()


def test_the_center_fetches_a_study_on_request_through_the_index(fed: Fed) -> None:
    c52 = fed.start52()
    try:
        h = auth(fed.c50)
        first = {"study_uid": STUDY, "wait": "first"}  # answered once the first instance is here
        r = httpx.post(f"{fed.c50.url}/api/v1/fetches", json=first, headers=h)
        assert r.status_code == 200 and r.json() == {
            "study_uid": STUDY,
            "source": "province:52",
            "complete": False,
        }
        assert fed.c50.archive.catalog.locate({"StudyInstanceUID": STUDY})  # servable already
        whole = httpx.post(f"{fed.c50.url}/api/v1/fetches", json={"study_uid": STUDY}, headers=h)
        assert whole.json()["source"] == "local"  # waited for the rest
        assert len(fed.c50.archive.catalog.locate({"StudyInstanceUID": STUDY})) == 3
        again = httpx.post(f"{fed.c50.url}/api/v1/fetches", json={"study_uid": STUDY}, headers=h)
        assert again.json()["source"] == "local"
        unknown = httpx.post(f"{fed.c50.url}/api/v1/fetches", json={"study_uid": "1.2.3.4.5"}, headers=h)
        assert unknown.status_code == 404
    finally:
        c52.stop()


def test_the_doctor_retrieves_an_uncached_out_of_province_study_with_the_patients_grant(fed: Fed) -> None:
    """R-SC-4, R-RT-4, R-CE-7: front-end cache, else its center, else the holding province."""
    url = f"http://127.0.0.1:{fed.fe.http_port}/api/v1/patients/{PERSON}/studies"
    h = auth(fed.fe)
    c52 = fed.start52()
    try:
        denied = httpx.post(f"{url}/{STUDY}/fetch", params={"doctor": "D1"}, headers=h)
        assert denied.status_code == 403 and "no authorization" in denied.json()["reason"]
        assert not fed.fe.archive.catalog.locate({"StudyInstanceUID": STUDY})
        ws = fed.fe.workstation
        assert ws is not None
        now = datetime.now(UTC)
        ws.grants.add(
            RetrievalGrant(
                PERSON, HOSPITAL, now, now + timedelta(hours=1), GrantMethod.WRITTEN, "scan:consent-1"
            )
        )
        first = httpx.post(f"{url}/{STUDY}/fetch", params={"doctor": "D1"}, headers=h)
        assert first.status_code == 200 and first.json()["source"] == "center", first.text
        assert len(fed.fe.archive.catalog.locate({"StudyInstanceUID": STUDY})) == 3
        assert fed.c50.cache is not None and fed.c50.cache.area.holds(STUDY)  # the center kept a copy
        again = httpx.post(f"{url}/{STUDY}/fetch", params={"doctor": "D1"}, headers=h)
        assert again.json()["source"] == "local"
        unknown = httpx.post(f"{url}/1.2.3.4/fetch", headers=h)
        assert unknown.status_code == 404
    finally:
        c52.stop()


def test_a_registration_less_than_a_day_before_the_visit_is_cached_at_once(fed: Fed) -> None:
    """R-CA-3: the cache is to be complete one natural day before the visit; a registration whose
    next daily run would fall on the visit day runs at once (both roles), with the clock pinned."""
    fe_cache, c50_cache = fed.fe.workstation.cache if fed.fe.workstation else None, fed.c50.cache
    assert fe_cache is not None and c50_cache is not None
    now = datetime.now(UTC)
    for svc in (fe_cache, c50_cache):
        clock_of(svc).set(now)  # pinned: only "at once" can complete it
    tomorrow = (now.astimezone(CST) + timedelta(days=1)).replace(hour=9, minute=0, second=0, microsecond=0)
    c52 = fed.start52()
    try:
        late = cache_request(fed.fe, visit_time=tomorrow.isoformat())
        assert late.status_code == 201, late.text
        rid = late.json()["request_id"]
        for svc in (fe_cache, c50_cache):
            row = svc.book.get(rid)
            assert row is not None and row["next_attempt_at"] <= now.isoformat(), row
        c50_cache.run_once()
        fe_cache.run_once()  # (the nodes' own job threads may have run it first: same outcome)
        for svc in (c50_cache, fe_cache):
            row = svc.book.get(rid)
            assert row is not None and row["state"] == "completed", row
            assert row["completed_at"] < tomorrow.astimezone(UTC).isoformat()
        assert fe_cache.area.holds(STUDY) and c50_cache.area.holds(STUDY)
        # a registration two days ahead keeps the next-day schedule
        early = cache_request(fed.fe, visit_time=(tomorrow + timedelta(days=1)).isoformat())
        row = fe_cache.book.get(early.json()["request_id"])
        assert row is not None and row["next_attempt_at"] == next_run(now, "01:00").isoformat()
    finally:
        c52.stop()
        for svc in (fe_cache, c50_cache):
            clock_of(svc).set(None)


def test_a_centers_doctors_see_its_cached_out_of_province_copy_only_through_a_grant(fed: Fed) -> None:
    """R-RT-4, R-CQ-5, R-SE-2 at a center: a cross-province copy in the center's cache is no
    institution's study there; a doctor of one of the center's institutions sees it (QIDO-RS,
    WADO-RS) only through a live grant of the patient posted at the center (the same policy as a
    front-end's, ``security/grant_policy.py``), and each read is a retrieval record at the index."""
    clinic = "H50010300009"  # a hospital of province 50 using the center's viewer
    c52 = fed.start52()
    try:
        r = httpx.post(f"{fed.c50.url}/api/v1/fetches", json={"study_uid": STUDY}, headers=auth(fed.c50))
        assert r.status_code == 200 and r.json()["source"] == "province:52", r.text
    finally:
        c52.stop()
    dr = user_token(fed.c50, "dr.zhou", Role.DOCTOR, clinic)
    meta = f"/dicom-web/studies/{STUDY}/metadata"
    assert found_studies(fed.c50, dr) == set() and call(fed.c50, "GET", meta, bearer(dr)).status_code == 404

    now = int(datetime.now(UTC).timestamp())
    claims = {"person": PERSON, "institution": clinic, "iat": now - 5, "exp": now + 3600, "jti": "c50-1"}
    qr = sign_qr(PLATFORM, claims)
    g = httpx.post(
        f"{fed.c50.url}/api/v1/grants", json={"method": "insurance-qr", "evidence": qr}, headers=auth(fed.c50)
    )
    assert g.status_code == 201 and g.json()["institution"] == clinic, g.text
    assert found_studies(fed.c50, dr) == {STUDY}
    assert call(fed.c50, "GET", meta, bearer(dr)).status_code == 200
    other = user_token(fed.c50, "dr.qian", Role.DOCTOR, "H50010300008")  # the grant is not theirs
    assert call(fed.c50, "GET", meta, bearer(other)).status_code == 404

    h = auth(fed.index)  # type: ignore[arg-type]  # the index takes the same test tokens

    def records() -> list[dict[str, Any]]:
        rows = httpx.get(f"{fed.index.url}/api/v1/retrievals", params={"person": PERSON}, headers=h).json()
        return [x for x in rows if x["node"] == "urn:ybyx:center:50" and x["action"] == "retrieve"]

    deadline = time.monotonic() + 20
    while len(records()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    got = sorted((x["result"], x["doctor"], x["institution"]) for x in records())
    assert ("allowed", "dr.zhou", clinic) in got and ("denied", "dr.zhou", clinic) in got, got
    revoked = httpx.delete(f"{fed.c50.url}/api/v1/grants/{g.json()['grant_id']}", headers=auth(fed.c50))
    assert revoked.status_code == 200
    assert call(fed.c50, "GET", meta, bearer(dr)).status_code == 404
