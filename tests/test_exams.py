"""Exam records, settlements, deadlines and upload monitoring (issue 3 §7–8, R-UP-3, R-UP-5, R-CE-9)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from dimse.scu import send
from gateway.center import Center
from gateway.frontend import Frontend
from gateway.identity import IdType, InvalidId, mask, normalise, person_key, resident_id_check, write_new_key
from tests.conftest import auth, center_client_before_start, forward_to
from tests.test_forwarding import FAST, all_confirmed, wait_until

BIRTH = "500103199003071"


def resident_id(serial: str = "23") -> str:
    first17 = f"{BIRTH}{serial}"
    return first17 + resident_id_check(first17)


def test_resident_id_check_character() -> None:
    good = "11010519491231002X"  # the example in GB 11643
    assert normalise(IdType.RESIDENT_ID, good.lower()) == good
    with pytest.raises(InvalidId, match="check character"):
        normalise(IdType.RESIDENT_ID, good[:-1] + "5")
    with pytest.raises(InvalidId, match="not a date"):
        normalise(IdType.RESIDENT_ID, "110105194913310021")
    with pytest.raises(InvalidId, match="17 digits"):
        normalise(IdType.RESIDENT_ID, "1101051949")


@pytest.mark.parametrize(
    "kind,value,ok",
    [
        (IdType.PASSPORT, "E12345678", True),
        (IdType.PASSPORT, "E1", False),
        (IdType.HK_MACAO_PERMIT, "H12345678", True),
        (IdType.HK_MACAO_PERMIT, "X12345678", False),
        (IdType.TAIWAN_PERMIT, "1234567890", True),
        (IdType.TAIWAN_PERMIT, "12345", False),
        (IdType.FOREIGNER_PERMANENT, "USA123456789012", True),
        (IdType.FOREIGNER_PERMANENT, "US1", False),
    ],
)
def test_other_id_types(kind: IdType, value: str, ok: bool) -> None:
    if ok:
        assert normalise(kind, value) == value
    else:
        with pytest.raises(InvalidId):
            normalise(kind, value)


def test_pseudonym_depends_on_the_key_and_mask_hides_the_middle() -> None:
    a, b = b"a" * 32, b"b" * 32
    n = resident_id()
    assert person_key(IdType.RESIDENT_ID, n, a) == person_key(IdType.RESIDENT_ID, n, a)
    assert person_key(IdType.RESIDENT_ID, n, a) != person_key(IdType.RESIDENT_ID, n, b)
    assert mask(n) == n[:4] + "*" * 10 + n[-4:]


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "key"
    write_new_key(path)
    return path


def exam_body(study_uid: str, **over: Any) -> dict[str, Any]:
    body = {
        "hospital_code": "H50010300001",
        "hospital_level": "三级甲等",
        "accession_number": "ACC-1",
        "study_uid": study_uid,
        "id_type": "resident-id",
        "id_number": resident_id(),
        "patient_name": "张三",
        "exam_item_code": "CT-CHEST-01",
        "exam_item_name": "胸部CT平扫",
        "body_part": "CHEST",
        "device": "CT01",
        "modality": "CT",
        "description": "双肺纹理清晰",
        "diagnosis": "未见异常",
        "report_time": datetime.now(UTC).isoformat(),
        "visit_type": "outpatient",
    }
    body.update(over)
    return body


def post(fe: Frontend, path: str, body: Any) -> httpx.Response:
    url = f"http://127.0.0.1:{fe.http_port}/api/v1/{path}"
    return httpx.post(url, json=body, headers=auth(fe), timeout=10)


def test_bad_exam_records_get_422_naming_the_field(
    start_frontend: Callable[..., Frontend], key_file: Path
) -> None:
    fe = _fe(start_frontend, key_file)
    bad_id = exam_body("1.2.3", id_number=resident_id()[:-1] + ("0" if resident_id()[-1] != "0" else "1"))
    r = post(fe, "exams", bad_id)
    assert r.status_code == 422
    assert r.json()["errors"] == [
        {"field": "id_number", "message": "check character does not match (ISO 7064 MOD 11-2)"}
    ]
    r = post(fe, "exams", {k: v for k, v in exam_body("1.2.3").items() if k != "report_time"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "report_time"
    r = post(fe, "exams", exam_body("1.2.3", visit_type="walk-in"))
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "visit_type"
    r = post(fe, "exams", exam_body("not-a-uid"))
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "study_uid"
    r = httpx.post(
        f"http://127.0.0.1:{fe.http_port}/api/v1/exams",
        content=b"{not json",
        headers={"Content-Type": "application/json", **auth(fe)},
        timeout=10,
    )
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    r = post(
        fe,
        "settlements",
        {
            "hospital_code": "H",
            "accession_number": "nope",
            "settlement_id": "S1",
            "settled_at": datetime.now(UTC).isoformat(),
        },
    )
    assert r.status_code == 404


def _fe(start_frontend: Callable[..., Frontend], key_file: Path, **kw: Any) -> Frontend:
    return start_frontend(identity={"key_file": str(key_file)}, **kw)


def test_exam_forwarded_with_pseudonym_only_and_monitoring_complete(
    start_center: Callable[..., Center],
    start_frontend: Callable[..., Frontend],
    key_file: Path,
    samples: Path,
) -> None:
    center = start_center()
    fe = _fe(start_frontend, key_file, forward=forward_to(center, **FAST))
    files = sorted((samples / "02_MR_brain").iterdir())
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    id_number = resident_id("77")
    r = post(fe, "exams", exam_body(study, id_number=id_number))
    assert r.status_code == 201 and r.json()["id_masked"] == mask(id_number)
    assert send(files, "127.0.0.1", fe.dicom_port, "YBYX").ok
    wait_until(lambda: all_confirmed(fe, 1), what="study confirmed")
    r = post(
        fe,
        "settlements",
        {
            "hospital_code": "H50010300001",
            "accession_number": "ACC-1",
            "settlement_id": "JS2025001",
            "settled_at": datetime.now(UTC).isoformat(),
        },
    )
    assert r.status_code == 200

    def center_has_settlement() -> bool:
        book = center.archive.catalog
        from sqlalchemy import select

        from gateway.archive.schema import exams

        with book.engine.connect() as conn:
            row = conn.execute(select(exams.c.settlement_id, exams.c.person_key)).first()
        return row is not None and row.settlement_id == "JS2025001"

    wait_until(center_has_settlement, what="exam and settlement at the center")
    key = bytes.fromhex(key_file.read_text().strip())
    from sqlalchemy import select

    from gateway.archive.schema import exams

    with center.archive.catalog.engine.connect() as conn:
        assert conn.execute(select(exams.c.person_key)).scalar_one() == person_key(
            IdType.RESIDENT_ID, id_number, key
        )
    # the raw ID number is in neither database
    for db in (fe.cfg.database.url, center.cfg.database.url):
        raw = Path(db.removeprefix("sqlite:///")).read_bytes()
        wal = Path(db.removeprefix("sqlite:///") + "-wal")
        raw += wal.read_bytes() if wal.exists() else b""
        assert id_number.encode() not in raw

    monitoring = httpx.get(
        f"{center.url}/api/v1/upload-monitoring/{study}", headers=auth(center), timeout=10
    ).json()
    assert monitoring["state"] == "complete" and monitoring["late"] is False
    assert monitoring["expected"] == monitoring["held"] == len(files)
    deadlines = httpx.get(
        f"http://127.0.0.1:{fe.http_port}/api/v1/upload-deadlines", headers=auth(fe), timeout=10
    ).json()
    [item] = deadlines
    assert item["images"]["state"] == "met" and item["settlement"]["state"] == "met"


def test_overdue_deadlines_are_listed(
    start_frontend: Callable[..., Frontend], key_file: Path, tmp_path: Path
) -> None:
    from tests.peers.ports import free_port

    nowhere = {"center_url": f"http://127.0.0.1:{free_port()}", **center_client_before_start(tmp_path / "c")}
    fe = _fe(start_frontend, key_file, forward={**nowhere, **FAST})
    old = (datetime.now(UTC) - timedelta(days=3)).isoformat()
    fresh = datetime.now(UTC).isoformat()
    assert (
        post(fe, "exams", exam_body("1.2.840.1", accession_number="OLD", report_time=old)).status_code == 201
    )
    assert (
        post(fe, "exams", exam_body("1.2.840.2", accession_number="NEW", report_time=fresh)).status_code
        == 201
    )
    # a naive local time is China Standard Time: 2 days ago in CST
    settled = (datetime.now(UTC) + timedelta(hours=8) - timedelta(days=2)).replace(tzinfo=None).isoformat()
    r = post(
        fe,
        "settlements",
        {
            "hospital_code": "H50010300001",
            "accession_number": "NEW",
            "settlement_id": "S9",
            "settled_at": settled,
        },
    )
    assert r.status_code == 200
    time.sleep(0.5)
    url = f"http://127.0.0.1:{fe.http_port}/api/v1/upload-deadlines"
    overdue = httpx.get(url, params={"state": "overdue"}, headers=auth(fe), timeout=10).json()
    assert {i["accession_number"] for i in overdue} == {"OLD", "NEW"}
    new = next(i for i in overdue if i["accession_number"] == "NEW")
    assert new["images"]["state"] == "pending" and new["settlement"]["state"] == "overdue"
    pending = httpx.get(url, params={"state": "pending"}, headers=auth(fe), timeout=10).json()
    assert [i["accession_number"] for i in pending] == ["NEW"]
    assert httpx.get(url, params={"state": "soon"}, headers=auth(fe), timeout=10).status_code == 400
