"""The national index's copies of the report text are sealed at rest (issue 6 §5, R-SE-10): the
raw database row holds ciphertext bound to its Study Instance UID, rows stored before sealing was
switched on are sealed at the next start, and the API still returns plain text to callers holding
``index:lookup`` — on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from gateway.archive.catalog import make_engine
from gateway.archive.schema import audit_log, index_records
from gateway.config import IndexConfig, parse_config
from gateway.security.columns import PREFIX
from index.service import NationalIndex
from tests.conftest import TEST_SECURITY, auth, node_url
from tests.federation import CST, PERSON, index_record
from tests.peers.ports import free_port

DIAGNOSIS = "右肺上叶结节，建议随访"
DESCRIPTION = "右肺上叶见一约8mm磨玻璃结节"


def config(root: Path, db_url: str, *, sealed: bool) -> IndexConfig:
    data: dict[str, Any] = {
        "role": "index",
        "http": {"host": "127.0.0.1", "port": free_port()},
        "database": {"url": db_url},
        "security": dict(TEST_SECURITY),
        "encryption": {"enabled": sealed, "key_file": "keys/kek.json", "cache_seconds": 0},
        "provinces": [{"code": "52", "name": "贵州", "center_url": "http://127.0.0.1:9/"}],
    }
    cfg = parse_config(data, "index.toml", root)
    assert isinstance(cfg, IndexConfig)
    return cfg


def record(study: str, **kw: Any) -> dict[str, Any]:
    text = {"description": DESCRIPTION, "diagnosis": DIAGNOSIS, **kw}
    return index_record(study, datetime(2025, 3, 1, 9, 30, tzinfo=CST), **text)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("fresh_pg_url"))
    return f"sqlite:///{tmp_path / 'index.db'}"


@pytest.fixture
def started() -> Iterator[list[NationalIndex]]:
    nodes: list[NationalIndex] = []
    yield nodes
    for node in nodes:
        node.stop()


def raw_row(db_url: str, study: str) -> dict[str, Any]:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            return dict(
                conn.execute(select(index_records).where(index_records.c.study_uid == study)).one()._mapping
            )
    finally:
        engine.dispose()


def test_diagnosis_is_ciphertext_in_the_row_and_plain_through_the_api(
    db_url: str, tmp_path: Path, started: list[NationalIndex]
) -> None:
    idx = NationalIndex.start(config(tmp_path, db_url, sealed=True))
    started.append(idx)
    url, h = f"{node_url(idx)}/api/v1", auth(idx)
    r = httpx.post(f"{url}/index-records", json=record("1.2.3.1"), headers=h)
    assert r.status_code == 201, r.text
    assert r.json()["record"]["diagnosis"] == DIAGNOSIS

    row = raw_row(db_url, "1.2.3.1")
    for field, plain in (("diagnosis", DIAGNOSIS), ("description", DESCRIPTION)):
        assert row[field].startswith(PREFIX), row[field]
        assert plain not in row[field] and "结节" not in row[field]
    assert row["person_key"] == PERSON  # what lookups match on stays plain

    found = httpx.get(f"{url}/index-records", params={"person": PERSON}, headers=h).json()
    assert [(f["diagnosis"], f["description"]) for f in found] == [(DIAGNOSIS, DESCRIPTION)]
    one = httpx.get(f"{url}/index-records/1.2.3.1", headers=h).json()
    assert one["diagnosis"] == DIAGNOSIS
    # the same registration again is recognised as unchanged although the ciphertext differs
    again = httpx.post(f"{url}/index-records", json=record("1.2.3.1"), headers=h)
    assert again.json()["outcome"] == "unchanged"
    changed = httpx.post(f"{url}/index-records", json=record("1.2.3.1", diagnosis="未见异常"), headers=h)
    assert changed.json()["outcome"] == "updated"
    assert raw_row(db_url, "1.2.3.1")["diagnosis"].startswith(PREFIX)
    # without index:lookup the text is not served at all
    denied = httpx.get(f"{url}/index-records/1.2.3.1", headers=auth(idx, "index:register"))
    assert denied.status_code == 403


def test_a_sealed_diagnosis_moved_to_another_record_does_not_open(
    db_url: str, tmp_path: Path, started: list[NationalIndex]
) -> None:
    idx = NationalIndex.start(config(tmp_path, db_url, sealed=True))
    started.append(idx)
    url, h = f"{node_url(idx)}/api/v1", auth(idx)
    for study in ("1.2.3.1", "1.2.3.2"):
        assert httpx.post(f"{url}/index-records", json=record(study, diagnosis=study), headers=h).is_success
    moved = raw_row(db_url, "1.2.3.1")["diagnosis"]
    with idx.catalog.write() as conn:
        conn.execute(
            update(index_records).where(index_records.c.study_uid == "1.2.3.2").values(diagnosis=moved)
        )
    with pytest.raises(OSError, match=r"index_records\.diagnosis of 1\.2\.3\.2"):
        idx.book.get("1.2.3.2")


def test_rows_stored_before_sealing_are_sealed_at_the_next_start(
    db_url: str, tmp_path: Path, started: list[NationalIndex]
) -> None:
    plain = NationalIndex.start(config(tmp_path, db_url, sealed=False))
    h = auth(plain)
    for n in range(3):
        body = record(f"1.2.3.{n}", diagnosis=f"{DIAGNOSIS} {n}")
        assert httpx.post(f"{node_url(plain)}/api/v1/index-records", json=body, headers=h).is_success
    plain.stop()
    assert raw_row(db_url, "1.2.3.0")["diagnosis"] == f"{DIAGNOSIS} 0"  # before: in clear

    idx = NationalIndex.start(config(tmp_path, db_url, sealed=True))
    started.append(idx)
    for n in range(3):
        row = raw_row(db_url, f"1.2.3.{n}")
        assert row["diagnosis"].startswith(PREFIX) and DIAGNOSIS not in row["diagnosis"]
        assert row["description"].startswith(PREFIX)
    found = httpx.get(
        f"{node_url(idx)}/api/v1/index-records", params={"person": PERSON}, headers=auth(idx)
    ).json()
    assert sorted(f["diagnosis"] for f in found) == [f"{DIAGNOSIS} {n}" for n in range(3)]
    with idx.catalog.engine.connect() as conn:
        ops = [
            json.loads(d)
            for d in conn.execute(
                select(audit_log.c.detail).where(audit_log.c.event_type == "key-operation")
            ).scalars()
        ]
    assert {"operation": "seal-existing", "fields": 6} in ops, ops
