"""Cache copies on a front-end (issue 5 × issue 6): another institution's study fetched into the
cache is not the hospital's own — a doctor sees it only through a live patient grant, by QIDO-RS
and by every WADO-RS route (R-RT-4, R-CQ-5, R-SE-2); each such read is a retrieval record at the
national index (R-RT-4); and a cache copy is never forwarded to the center, even after lossless
compression rewrote it (R-CE-7, R-UP-1).

A federation on loopback: the index, center 50 holding patient P's study (as its archive), and
front-end H50010300001 pulling that study into its cache through the real fetch path
(``POST /api/v1/fetches`` at the center, then WADO-RS into the front-end's archive)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless
from sqlalchemy import select

from gateway.archive.schema import audit_log, forward_jobs
from gateway.center import Center
from gateway.clock import NodeClock
from gateway.frontend import Frontend
from gateway.grants import GrantDenied, GrantMethod, RetrievalGrant, check_grant
from gateway.identity import IdType, person_key
from gateway.security.permissions import Role
from index.service import NationalIndex
from tests.conftest import auth
from tests.federation import store_study, tiny_study
from tests.peers.ports import free_port
from tests.test_authz import bearer, found_studies, study_paths, user_token
from tests.test_forwarding import all_confirmed, wait_until
from tests.test_security_routes import call

KEY = bytes(range(32))
HOSPITAL = "H50010300001"
PERSON = person_key(IdType.RESIDENT_ID, "11010519491231002X", KEY)
CACHED = "1.2.52.4242"  # patient P's study from another hospital (StudyDate 20251101)


@dataclass
class Site:
    index: NationalIndex
    center: Center
    fe: Frontend
    own: str  # a study the front-end received itself
    center_manifest: dict[str, str]  # the cached study's instances at the center: SOP → SHA-256

    @property
    def clock(self) -> NodeClock:
        ws = self.fe.workstation
        assert ws is not None and isinstance(ws.clock, NodeClock)
        return ws.clock

    def grant(self, institution: str = HOSPITAL, **kw: Any) -> RetrievalGrant:
        ws = self.fe.workstation
        assert ws is not None
        now = self.clock()
        evidence = kw.pop("evidence", f"scan:{kw}")
        g = RetrievalGrant(
            PERSON, institution, now, now + timedelta(hours=1), GrantMethod.WRITTEN, evidence, **kw
        )
        return ws.grants.add(g)


def site(
    tmp_path: Path,
    start_index: Callable[..., NationalIndex],
    start_fed_center: Callable[..., Center],
    start_fed_frontend: Callable[..., Frontend],
    **frontend: Any,
) -> Site:
    port = free_port()
    index = start_index(provinces=[{"code": "50", "center_url": f"http://127.0.0.1:{port}"}])
    center = start_fed_center("50", index=index, port=port)
    manifest = store_study(center, tiny_study(tmp_path / "theirs", CACHED, count=2))
    fe = start_fed_frontend(HOSPITAL, center=center, **frontend)
    own = "1.2.50.1001"
    store_study(fe, tiny_study(tmp_path / "ours", own, count=1))
    cache = fe.workstation.cache if fe.workstation is not None else None
    assert cache is not None
    assert cache.pull_study(CACHED, PERSON) == "center"  # the real fetch: center → front-end cache
    assert len(fe.archive.catalog.locate({"StudyInstanceUID": CACHED})) == 2
    return Site(index, center, fe, own, manifest)


@pytest.fixture
def fed(
    tmp_path: Path,
    start_index: Callable[..., NationalIndex],
    start_fed_center: Callable[..., Center],
    start_fed_frontend: Callable[..., Frontend],
) -> Site:
    return site(tmp_path, start_index, start_fed_center, start_fed_frontend)


def uids(fe: Frontend, study: str) -> tuple[str, str, str]:
    inst = fe.archive.catalog.locate({"StudyInstanceUID": study})[0]
    return inst.study_uid, inst.series_uid, inst.sop_uid


def hidden(fe: Frontend, tok: str, own: str) -> None:
    assert found_studies(fe, tok) == {own}
    assert found_studies(fe, tok, f"studies?StudyInstanceUID={CACHED}") == set()
    for path in study_paths(uids(fe, CACHED)):
        assert call(fe, "GET", path, bearer(tok)).status_code == 404, path


def test_a_cache_copy_is_seen_by_a_doctor_only_through_a_live_grant_of_their_institution(fed: Site) -> None:
    """R-RT-4, R-CQ-5, R-SE-2: QIDO-RS (one SQL statement) and every WADO-RS route obey the grant."""
    fe = fed.fe
    doctor = user_token(fe, "dr.a", Role.DOCTOR, HOSPITAL)
    assert len(call(fe, "GET", "/dicom-web/studies", auth(fe)).json()) == 2  # a node client: both
    hidden(fe, doctor, fed.own)  # no grant: the copy is not the hospital's study
    fed.grant("H99")  # another institution's grant
    fed.grant(HOSPITAL, doctor="dr.other")  # a grant naming another doctor
    fed.grant(HOSPITAL, window_from=date(2025, 1, 1), window_to=date(2025, 10, 31))  # study outside
    fed.grant(HOSPITAL, studies=frozenset({"1.2.52.9999"}))  # another listed study
    hidden(fe, doctor, fed.own)

    mine = fed.grant(HOSPITAL, doctor="dr.a", studies=frozenset({CACHED}))  # this doctor, this study
    assert found_studies(fe, doctor) == {fed.own, CACHED}
    # the patient withdraws it (the HIS on their behalf): hidden at once; a new grant shows it again
    url = f"http://127.0.0.1:{fe.http_port}/api/v1/grants"
    r = httpx.delete(f"{url}/{mine.grant_id}", headers=auth(fe))
    assert r.status_code == 200 and r.json()["revoked_at"], r.text
    assert httpx.delete(f"{url}/{'0' * 8}-0000-0000-0000-{'0' * 12}", headers=auth(fe)).status_code == 404
    hidden(fe, doctor, fed.own)
    fed.grant(HOSPITAL, doctor="dr.a", studies=frozenset({CACHED}), evidence="scan:again")
    for level in ("series", "instances"):
        assert CACHED in found_studies(fe, doctor, level)
    for path in study_paths(uids(fe, CACHED)):
        r = call(fe, "GET", path, bearer(doctor))
        assert r.status_code == 200, (path, r.status_code, r.text[:200])
    another = user_token(fe, "dr.b", Role.DOCTOR, HOSPITAL)  # the grant names dr.a only
    hidden(fe, another, fed.own)

    fed.clock.advance(timedelta(hours=2))  # the one clock, past every grant's expiry
    try:
        hidden(fe, doctor, fed.own)
    finally:
        fed.clock.set(None)
    # the policy's 404s are audited as denied retrievals by the one audit hook (R-SE-4)
    fe.audit.flush()
    with fe.archive.catalog.engine.connect() as conn:
        rows = conn.execute(
            select(audit_log.c.actor, audit_log.c.resource, audit_log.c.detail).where(
                audit_log.c.event_type == "retrieval", audit_log.c.result == "failure"
            )
        ).all()
    denied = [r.resource for r in rows if r.actor == "dr.a" and json.loads(r.detail)["status"] == 404]
    assert f"/dicom-web/studies/{CACHED}/metadata" in denied, denied


def test_a_doctors_reads_of_a_cache_copy_are_retrieval_records_at_the_index(fed: Site) -> None:
    """R-RT-4: every retrieval, allowed or not, recorded locally and sent to the index."""
    fe = fed.fe
    doctor = user_token(fe, "dr.rec", Role.DOCTOR, HOSPITAL)
    st, se, sop = uids(fe, CACHED)
    path = f"/dicom-web/studies/{st}/series/{se}/instances/{sop}"
    assert call(fe, "GET", f"{path}/metadata", bearer(doctor)).status_code == 404
    grant = fed.grant(HOSPITAL)
    for _ in range(3):  # a viewer's many requests: one record per doctor, study and outcome
        assert call(fe, "GET", path, bearer(doctor)).status_code == 200
        assert call(fe, "GET", f"{path}/frames/1", bearer(doctor)).status_code == 200
    assert call(fe, "GET", f"/dicom-web/studies/{fed.own}/metadata", bearer(doctor)).status_code == 200
    h = auth(fed.index)  # type: ignore[arg-type]  # the index takes the same test tokens

    def at_index() -> list[dict[str, Any]]:
        r = httpx.get(f"{fed.index.url}/api/v1/retrievals", params={"person": PERSON}, headers=h)
        assert r.status_code == 200, r.text
        rows: list[dict[str, Any]] = r.json()
        return [x for x in rows if x["action"] == "retrieve"]

    deadline = time.monotonic() + 20
    while len(at_index()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    got = sorted(at_index(), key=lambda x: x["result"])
    assert [(x["result"], x["study_uid"], x["doctor"], x["institution"]) for x in got] == [
        ("allowed", CACHED, "dr.rec", HOSPITAL),
        ("denied", CACHED, "dr.rec", HOSPITAL),
    ]
    assert got[0]["grant_id"] == grant.grant_id and got[0]["node"] == f"urn:ybyx:frontend:{HOSPITAL}"
    assert "no authorization" in got[1]["reason"] and got[1]["grant_id"] is None


def test_a_cache_copy_is_never_forwarded_even_after_compression(
    tmp_path: Path,
    start_index: Callable[..., NationalIndex],
    start_fed_center: Callable[..., Center],
    start_fed_frontend: Callable[..., Frontend],
) -> None:
    """R-CE-7, R-UP-1: compression re-queues a rewritten study through ``Catalog.queue_forward``;
    a cache copy is still not sent up, while the front-end's own study is."""
    s = site(
        tmp_path,
        start_index,
        start_fed_center,
        start_fed_frontend,
        compression={"transfer_syntax": "jpeg-ls", "delete_grace_seconds": 0},
    )
    fe, center = s.fe, s.center
    stage = fe.compression
    assert stage is not None
    wait_until(lambda: stage.backlog() == 0, what="compression of both studies")
    wait_until(lambda: all_confirmed(fe, 1), what="the front-end's own study confirmed")
    for inst in fe.archive.catalog.locate({"StudyInstanceUID": CACHED}):
        assert inst.transfer_syntax == JPEGLSLossless  # rewritten here: queue_forward was asked
    time.sleep(1.0)  # three times the settle time: a job, had one been queued, would have gone
    with fe.archive.catalog.engine.connect() as conn:
        jobs = conn.scalars(select(forward_jobs.c.study_uid)).all()
    assert jobs == [s.own]
    # the center has its own study, and the cache copy never came back as a new version
    assert len(center.archive.catalog.locate({"StudyInstanceUID": s.own})) == 1
    held = {i.sop_uid: i for i in center.archive.catalog.locate({"StudyInstanceUID": CACHED})}
    assert {sop: i.sha256 for sop, i in held.items()} == s.center_manifest
    for sop, inst in held.items():
        assert inst.transfer_syntax == ExplicitVRLittleEndian
        assert center.archive.catalog.versions(sop) == []


def test_a_revoked_grant_allows_nothing_and_says_so() -> None:
    """R-RT-4: ``check_grant`` names revocation before expiry; another live grant still allows."""
    now = datetime(2025, 11, 20, 2, tzinfo=UTC)
    g = RetrievalGrant(PERSON, HOSPITAL, now, now + timedelta(hours=1), GrantMethod.WRITTEN, "doc:1")
    kw: dict[str, Any] = {"person_key": PERSON, "institution": HOSPITAL, "doctor": None, "now": now}
    assert check_grant([g], **kw) is g
    revoked = replace(g, revoked_at=now)
    with pytest.raises(GrantDenied, match="revoked"):
        check_grant([revoked], **kw)
    other = replace(g, grant_id="other")
    assert check_grant([revoked, other], **kw) is other
