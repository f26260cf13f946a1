"""Cross-province benchmark (issue 5 "Numbers"): national index lookup at scale, the first image of
an uncached out-of-province CT, and the center's nightly cache job.

In-process nodes on loopback (like the tests' federation): the index on a fresh PostgreSQL
database, Guizhou's center (52) holding the studies, Chongqing's center (50) with its client
credentials at 52. Helpers from ``tests/federation.py`` build the configs.

1. **Index lookup p50/p95** with ``--records`` (1,000,000) index records in PostgreSQL, generated
   by one ``INSERT … SELECT generate_series`` (5 studies per person over 6 years), then ANALYZE:
   ``IndexBook.lookup`` in-process (the SQL), and ``GET /api/v1/index-records`` over HTTP with a
   bearer token (the service), each for random persons with a 3-year window.
2. **Cross-province first image**: a ``--ct-slices`` (100) 512x512 CT held only by center 52; from
   ``POST /api/v1/fetches`` at center 50 (index lookup, WADO-RS retrieve of the study from 52,
   ingest, a copy kept) to the first frame (``/frames/1`` of the first instance) read from center
   50 — what a front-end relays to the doctor. Goal ≤ 1 s (the whole study is fetched first).
3. **Nightly cache job**: ``--cache-studies`` (20) studies of 20 slices at 52 for one person; one
   cache request at center 50; its next-day round; studies/minute.

    python bench/crossprovince.py [--records 1000000] [--quick]

Results: the terminal and ``bench/results/crossprovince-<timestamp>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.cache import next_run  # noqa: E402
from gateway.center import Center  # noqa: E402
from gateway.clock import NodeClock  # noqa: E402
from gateway.identity import IdType, person_key  # noqa: E402
from gateway.sample import ct_series  # noqa: E402
from index.records import Lookup  # noqa: E402
from index.service import NationalIndex  # noqa: E402
from tests.conftest import auth  # noqa: E402
from tests.federation import (  # noqa: E402
    CENTER_AT_CENTER,
    client_at,
    federated_center_config,
    index_config,
    store_study,
    tiny_study,
)
from tests.peers.ports import free_port  # noqa: E402

PG_ADMIN = os.environ.get("YBYX_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
KEY = bytes(range(32))
PERSON = person_key(IdType.RESIDENT_ID, "11010519491231002X", KEY)

FILL = """
INSERT INTO index_records (study_uid, person_key, person_code, record_key, id_type, exam_time, exam_date,
    modality, body_part, exam_item_code, exam_item_name, insurance_item_code, device, hospital_code,
    hospital_level, storing_unit, description, diagnosis, settlement_id, qc_grade, province, center,
    registered_at, updated_at)
SELECT '1.2.999.' || g,
       md5('p' || (g / 5)) || md5('q' || (g / 5)),
       NULL, NULL, 'resident-id',
       timestamptz '2020-01-01 02:00+00' + mod(g::bigint * 7919, 2190)::int * interval '1 day',
       to_char(date '2020-01-01' + mod(g::bigint * 7919, 2190)::int, 'YYYYMMDD'),
       (ARRAY['CT','MR','DX','US'])[1 + mod(g, 4)],
       (ARRAY['CHEST','HEAD','KNEE','ABDOMEN'])[1 + mod(g / 4, 4)],
       'X' || mod(g, 300), '检查项目', NULL, 'DEV', 'H' || mod(g, 5000), '三级甲等', NULL,
       '影像描述', '诊断结果', NULL, (ARRAY['甲','乙','丙'])[1 + mod(g, 3)],
       lpad((11 + mod(g, 32))::text, 2, '0'), 'urn:ybyx:center:' || lpad((11 + mod(g, 32))::text, 2, '0'),
       now(), now()
FROM generate_series(1, {n}) AS g
"""


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def fresh_db() -> str:
    name = f"ybyx_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"


def drop_db(url: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def bench_lookup(index: NationalIndex, records: int, samples: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    with index.catalog.engine.begin() as conn:
        conn.exec_driver_sql(FILL.replace("{n}", str(int(records))))
        conn.exec_driver_sql("ANALYZE index_records")
    fill_s = time.perf_counter() - t0
    persons = records // 5
    rng = random.Random(5)

    def person(n: int) -> str:
        import hashlib

        return hashlib.md5(f"p{n}".encode()).hexdigest() + hashlib.md5(f"q{n}".encode()).hexdigest()

    sql_ms, http_ms, found = [], [], []
    visit = date(2025, 11, 20)
    for _ in range(samples):
        q = Lookup(person(rng.randrange(persons)), since=date(2022, 11, 20), until=visit)
        t = time.perf_counter()
        rows = index.book.lookup(q)
        sql_ms.append((time.perf_counter() - t) * 1000)
        found.append(len(rows))
    h = auth(index)  # type: ignore[arg-type]
    with httpx.Client(timeout=30) as http:
        for _ in range(samples):
            params = {"person": person(rng.randrange(persons)), "from": "2022-11-20", "to": "2025-11-20"}
            t = time.perf_counter()
            r = http.get(f"{index.url}/api/v1/index-records", params=params, headers=h)
            http_ms.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200, r.text
    return {
        "records": records,
        "fill_seconds": round(fill_s, 1),
        "samples": samples,
        "mean_records_found": round(statistics.mean(found), 2),
        "sql_p50_ms": round(pct(sql_ms, 50), 2),
        "sql_p95_ms": round(pct(sql_ms, 95), 2),
        "http_p50_ms": round(pct(http_ms, 50), 2),
        "http_p95_ms": round(pct(http_ms, 95), 2),
    }


def register(index: NationalIndex, study: str, at: datetime) -> None:
    body = {
        "study_uid": study,
        "person_key": PERSON,
        "id_type": "resident-id",
        "exam_time": at.isoformat(),
        "modality": "CT",
        "body_part": "CHEST",
        "exam_item_code": "CT001",
        "exam_item_name": "胸部CT平扫",
        "hospital_code": "H52000000001",
        "hospital_level": "三级甲等",
        "province": "52",
        "center": "urn:ybyx:center:52",
    }
    r = httpx.post(f"{index.url}/api/v1/index-records", json=body, headers=auth(index), timeout=30)  # type: ignore[arg-type]
    assert r.status_code in (200, 201), r.text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--ct-slices", type=int, default=100)
    ap.add_argument("--cache-studies", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="100k records, 50 slices, 8 studies")
    args = ap.parse_args()
    if args.quick:
        args.records, args.ct_slices, args.cache_studies, args.samples = 100_000, 50, 8, 200
    work = Path(tempfile.mkdtemp(prefix="ybyx-xprov-"))
    db = fresh_db()
    out: dict[str, Any] = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    index = c50 = c52 = None
    try:
        p50, p52 = free_port(), free_port()
        provinces = [
            {"code": "50", "center_url": f"http://127.0.0.1:{p50}"},
            {"code": "52", "center_url": f"http://127.0.0.1:{p52}"},
        ]
        index = NationalIndex.start(index_config(work / "index", db_url=db, provinces=provinces))
        if args.records:
            print(f"index lookup: filling {args.records:,} records …", flush=True)
            out["lookup"] = bench_lookup(index, args.records, args.samples)
            print(json.dumps(out["lookup"], ensure_ascii=False), flush=True)

        c52 = Center.start(federated_center_config(work / "c52", province="52", index=index, port=p52))
        cid, secret = client_at(c52, "center-50", CENTER_AT_CENTER, work)
        peers = [{"province": "52", "client_id": cid, "client_secret_file": str(secret)}]
        c50 = Center.start(
            federated_center_config(work / "c50", province="50", index=index, port=p50, center_peers=peers)
        )
        # 2. first image of an uncached out-of-province CT
        ct_uid = f"1.2.52.{uuid.uuid4().int % 10**12}"
        files = ct_series(work / "ct", slices=args.ct_slices, study_uid=ct_uid)
        store_study(c52, files)
        register(index, ct_uid, datetime.now(UTC) - timedelta(days=30))
        h50 = auth(c50)
        with httpx.Client(timeout=120) as http:
            http.get(f"{c50.url}/healthz")
            t0 = time.perf_counter()
            # the viewer's path: answered once the first instance is stored, the rest streams on
            r = http.post(
                f"{c50.url}/api/v1/fetches", json={"study_uid": ct_uid, "wait": "first"}, headers=h50
            )
            assert r.status_code == 200 and r.json()["source"] == "province:52", r.text
            fetched = time.perf_counter()
            inst = c50.archive.catalog.locate({"StudyInstanceUID": ct_uid})[0]
            frame = http.get(
                f"{c50.url}/dicom-web/studies/{ct_uid}/series/{inst.series_uid}/instances/{inst.sop_uid}/frames/1",
                headers={**h50, "Accept": 'multipart/related; type="application/octet-stream"'},
            )
            assert frame.status_code == 200
            done = time.perf_counter()
            whole = http.post(f"{c50.url}/api/v1/fetches", json={"study_uid": ct_uid}, headers=h50)
            assert whole.json()["source"] == "local", whole.text
            all_here = time.perf_counter()
        mb = sum(f.stat().st_size for f in files) / 1e6
        out["first_image"] = {
            "ct_slices": args.ct_slices,
            "study_mb": round(mb, 1),
            "fetch_seconds": round(fetched - t0, 3),
            "first_frame_seconds": round(done - t0, 3),
            "whole_study_seconds": round(all_here - t0, 3),
            "goal_seconds": 1.0,
        }
        print(json.dumps(out["first_image"]), flush=True)

        # 3. the nightly cache job
        for n in range(args.cache_studies):
            uid = f"1.2.52.7.{n}"
            store_study(c52, tiny_study(work / f"s{n}", uid, count=20))
            register(index, uid, datetime.now(UTC) - timedelta(days=60 + n))
        assert c50.cache is not None
        visit = datetime.now(UTC) + timedelta(days=3)
        body = {
            "request_id": str(uuid.uuid4()),
            "institution": "H50010300001",
            "person_key": PERSON,
            "id_type": "resident-id",
            "id_masked": "1101**********002X",
            "name_masked": "张**",
            "department": "呼吸内科",
            "visit_time": visit.isoformat(),
            "consent_at": datetime.now(UTC).isoformat(),
        }
        r = httpx.post(f"{c50.url}/api/v1/cache-requests", json=body, headers=h50, timeout=30)
        assert r.status_code == 201, r.text
        clock = c50.cache.book.clock
        assert isinstance(clock, NodeClock)
        clock.set(next_run(datetime.now(UTC), "01:00") + timedelta(minutes=1))
        t0 = time.perf_counter()
        states = c50.cache.run_once()
        elapsed = time.perf_counter() - t0
        [row] = c50.cache.book.search()
        assert list(states.values()) == ["completed"], (states, row["last_error"])
        fetched_studies = row["studies_done"] - 1  # the CT was already cached
        out["cache_job"] = {
            "studies": fetched_studies,
            "instances_per_study": 20,
            "seconds": round(elapsed, 2),
            "studies_per_minute": round(fetched_studies / elapsed * 60, 1),
        }
        print(json.dumps(out["cache_job"]), flush=True)
    finally:
        for node in (c50, c52, index):
            if node is not None:
                node.stop()
        drop_db(db)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"crossprovince-{stamp}.json").write_text(json.dumps(out, indent=2, ensure_ascii=False))
    lk, fi, cj = out.get("lookup"), out["first_image"], out["cache_job"]
    md = [
        f"# Cross-province benchmark {stamp}",
        "",
        f"{out['machine']}, {out['cpus']} CPUs, Python {out['python']}",
        "",
        "| measure | value | goal |",
        "|---|---|---|",
    ]
    if lk:
        md += [
            f"| index lookup, {lk['records']:,} records in PostgreSQL, SQL p50 / p95 "
            f"| {lk['sql_p50_ms']} / {lk['sql_p95_ms']} ms | p95 ≤ 20 ms |",
            f"| same over HTTP with a token, p50 / p95 | {lk['http_p50_ms']} / {lk['http_p95_ms']} ms | |",
        ]
    md += [
        f"| first frame of an uncached out-of-province CT ({fi['ct_slices']} slices, {fi['study_mb']} MB) "
        f"| {fi['first_frame_seconds']} s (first instance stored {fi['fetch_seconds']} s, "
        f"whole study {fi['whole_study_seconds']} s) | ≤ 1 s |",
        f"| nightly cache job | {cj['studies_per_minute']} studies/min "
        f"({cj['studies']} x {cj['instances_per_study']} instances in {cj['seconds']} s) | |",
    ]
    if lk:
        md += ["", f"Fill of {lk['records']:,} records by one INSERT … SELECT: {lk['fill_seconds']} s."]
    (results / f"crossprovince-{stamp}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
