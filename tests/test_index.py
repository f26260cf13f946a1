"""The national index (issue 5 §2): registration, lookup and its window, the province directory,
retrieval records, centers registering archived studies — on SQLite and PostgreSQL (R-SC-4,
R-CE-7, R-RT-4)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.center import Center
from gateway.security.guard import ROLE_SCOPES, required_scope
from index.service import NationalIndex
from tests.conftest import auth, node_url
from tests.federation import CST, PERSON, exam_body, index_record, store_study, tiny_study
from tests.peers.ports import free_port
from tests.test_security_routes import fill, walk

USCC = "91350100M000100Y43"


record = index_record


@pytest.fixture(params=["sqlite", "postgresql"])
def index(request: pytest.FixtureRequest, start_index: Callable[..., NationalIndex]) -> NationalIndex:
    db = request.getfixturevalue("fresh_pg_url") if request.param == "postgresql" else None
    return start_index(
        db_url=db, provinces=[{"code": "52", "name": "贵州", "center_url": "http://127.0.0.1:9/"}]
    )


def test_registration_is_idempotent_and_lookup_keeps_the_3_year_window(index: NationalIndex) -> None:
    url, h = f"{node_url(index)}/api/v1", auth(index)
    code = "1" * 26
    key = f"{code}-202211200010-000000101-CT0000000001A-{USCC}"
    studies = {
        "1.2.9.1": record("1.2.9.1", datetime(2022, 11, 19, 23, 50, tzinfo=CST)),
        "1.2.9.2": record("1.2.9.2", datetime(2022, 11, 20, 0, 10, tzinfo=CST), record_key=key),
        "1.2.9.3": record("1.2.9.3", datetime(2025, 11, 20, 9, 0, tzinfo=CST)),
        "1.2.9.4": record("1.2.9.4", datetime(2024, 3, 1, 9, 0), modality="MR", body_part="HEAD"),
    }
    for body in studies.values():
        r = httpx.post(f"{url}/index-records", json=body, headers=h)
        assert r.status_code == 201, r.text
    again = httpx.post(f"{url}/index-records", json=studies["1.2.9.3"], headers=h)
    assert (again.status_code, again.json()["outcome"]) == (200, "unchanged")
    graded = httpx.post(f"{url}/index-records", json={**studies["1.2.9.3"], "qc_grade": "甲"}, headers=h)
    assert graded.json()["outcome"] == "updated" and graded.json()["record"]["qc_grade"] == "甲"

    window = {"person": PERSON, "from": "2022-11-20", "to": "2025-11-20"}
    found = httpx.get(f"{url}/index-records", params=window, headers=h).json()
    assert [r["study_uid"] for r in found] == ["1.2.9.3", "1.2.9.4", "1.2.9.2"]  # not 2022-11-19
    assert found[0]["center_url"] == "http://127.0.0.1:9" and found[0]["qc_grade"] == "甲"
    assert "id_number" not in found[0] and found[0]["person_key"] == PERSON
    only_mr = httpx.get(f"{url}/index-records", params={**window, "modality": "MR"}, headers=h).json()
    assert [r["study_uid"] for r in only_mr] == ["1.2.9.4"]
    chest_ct = {**window, "body_part": "CHEST", "exam_item": "CT001"}
    assert len(httpx.get(f"{url}/index-records", params=chest_ct, headers=h).json()) == 2
    # older studies on explicit request (no window, R-RT-1); by person management code too
    assert len(httpx.get(f"{url}/index-records", params={"person": PERSON}, headers=h).json()) == 4
    by_code = httpx.get(f"{url}/index-records", params={"person": code}, headers=h).json()
    assert [r["study_uid"] for r in by_code] == ["1.2.9.2"]
    by_key = httpx.get(f"{url}/index-records/{key.replace('-', chr(0x2013))}", headers=h)
    assert by_key.status_code == 200 and by_key.json()["study_uid"] == "1.2.9.2"
    assert (
        httpx.get(f"{url}/index-records/1.2.9.4", headers=h).json()["exam_time"].startswith("2024-03-01T01")
    )


def test_bad_registrations_and_lookups_are_422_naming_the_field(index: NationalIndex) -> None:
    url, h = f"{node_url(index)}/api/v1", auth(index)
    at = datetime(2025, 1, 1, tzinfo=CST)
    cases = {
        "province": record("1.2.8.1", at, province="99"),
        "record_key": record("1.2.8.2", at, record_key=f"{'1' * 26}-202501010000-000000101-CT01-{USCC}"),
        "storing_unit": record("1.2.8.3", at, storing_unit=USCC[:-1] + "4"),
        "person_key": record("1.2.8.4", at, person_key="11010519491231002X"),
        "id_type": record("1.2.8.5", at, id_type="driving-licence"),
    }
    for field, body in cases.items():
        r = httpx.post(f"{url}/index-records", json=body, headers=h)
        assert r.status_code == 422, (field, r.text)
        assert field in [e["field"] for e in r.json()["errors"]], (field, r.json())
    for params, field in (
        ({}, "person"),
        ({"person": "11010519491231002X"}, "person"),
        ({"person": PERSON, "from": "2025-13-01"}, "from"),
        ({"person": PERSON, "from": "2025-02-01", "to": "2025-01-01"}, "from"),
    ):
        r = httpx.get(f"{url}/index-records", params=params, headers=h)
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == field, (params, r.text)
    # a study another province registered is not taken over
    assert httpx.post(f"{url}/index-records", json=record("1.2.8.9", at), headers=h).status_code == 201
    other = record("1.2.8.9", at, province="50")
    assert httpx.post(f"{url}/index-records", json=other, headers=h).status_code in (409, 422)


def test_every_index_route_is_guarded_by_its_scope(start_index: Callable[..., NationalIndex]) -> None:
    idx = start_index()
    app = idx.http.server.config.app
    found = sorted({(m, fill(t)) for m, t in walk(list(app.routes))})
    public = {("GET", "/healthz"), ("POST", "/oauth/token"), ("GET", "/.well-known/jwks.json")}
    needed = set()
    for method, path in found:
        r = httpx.request(method, f"{node_url(idx)}{path}")
        if (method, path) in public:
            assert r.status_code != 401
            continue
        assert r.status_code == 401, (method, path)
        scope = required_scope(method, path)
        assert scope is not None, (method, path)
        needed.add(scope)
        others = " ".join(sorted(ROLE_SCOPES["index"] - {scope}))
        assert httpx.request(method, f"{node_url(idx)}{path}", headers=auth(idx, others)).status_code == 403
        through = httpx.request(method, f"{node_url(idx)}{path}", headers=auth(idx, scope))
        assert through.status_code not in (401, 403), (method, path, through.text)
    assert needed == set(ROLE_SCOPES["index"])


def wait_for(check: Callable[[], Any], timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_a_center_registers_each_study_once_archived_and_sends_retrievals_on(
    db: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    start_index: Callable[..., NationalIndex],
    start_fed_center: Callable[..., Center],
) -> None:
    port = free_port()
    pg = request.getfixturevalue("new_pg_db") if db == "postgresql" else None
    provinces = [{"code": "50", "center_url": f"http://127.0.0.1:{port}"}]
    idx = start_index(provinces=provinces, db_url=pg() if pg else None)
    center = start_fed_center("50", index=idx, port=port, db_url=pg() if pg else None)
    files = tiny_study(tmp_path / "s1", "1.2.50.1")
    manifest = store_study(center, files)
    h = auth(center)
    exam = exam_body("1.2.50.1", PERSON, at=datetime(2025, 10, 1, 9, 30, tzinfo=CST))
    assert httpx.post(f"{center.url}/api/v1/exams", json=exam, headers=h).status_code == 200
    assert center.registrar is not None and center.registrar.state("1.2.50.1") is None  # images unconfirmed
    r = httpx.put(f"{center.url}/api/v1/studies/1.2.50.1/manifest", json={"instances": manifest}, headers=h)
    assert r.json()["state"] == "complete"
    state = wait_for(lambda: (s := center.registrar.state("1.2.50.1")) and s["state"] == "registered" and s)
    assert state["attempts"] == 1
    ih = auth(idx)
    [rec] = httpx.get(f"{idx.url}/api/v1/index-records", params={"person": PERSON}, headers=ih).json()
    assert (rec["province"], rec["center"], rec["center_url"]) == ("50", "urn:ybyx:center:50", center.url)
    assert (rec["modality"], rec["storing_unit"], rec["exam_date"]) == ("CT", USCC, "20251001")
    # the center answers its front-ends' lookups through the index
    via = httpx.get(f"{center.url}/api/v1/index-records", params={"person": PERSON}, headers=h).json()
    assert [r["study_uid"] for r in via] == ["1.2.50.1"]
    # a retrieval recorded at the center (from a front-end) reaches the index, once
    rid = str(uuid.uuid4())
    body = {
        "record_id": rid,
        "at": "2025-11-20T10:00:00+08:00",
        "person_key": PERSON,
        "study_uid": "1.2.50.1",
        "institution": "H2",
        "doctor": "D1",
        "action": "retrieve",
        "result": "denied",
        "reason": "no grant",
        "node": "urn:ybyx:frontend:H2",
    }
    assert httpx.post(f"{center.url}/api/v1/retrievals", json=body, headers=h).status_code == 201
    assert httpx.post(f"{center.url}/api/v1/retrievals", json=body, headers=h).status_code == 200
    at_index = wait_for(
        lambda: httpx.get(f"{idx.url}/api/v1/retrievals", params={"person": PERSON}, headers=ih).json()
    )
    assert [(r["record_id"], r["result"], r["reason"]) for r in at_index] == [(rid, "denied", "no grant")]
