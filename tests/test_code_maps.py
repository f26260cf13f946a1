"""Editing the exam-item code maps over HTTP (R-CE-4; issue 5 §8): an institution admin maps,
re-maps and unmaps a hospital's code; the same-exam reminder (R-RT-2) follows at once; the change
is written back to the hospital's TOML file and audited with before/after (R-SE-4); only the
front-end's own institution admins, the system admin and clients with ``api:codes:write`` may edit
(R-SE-2). One federation on loopback (index → center 50 → front-end H50010300001) for the module."""

from __future__ import annotations

import json
import time
import tomllib
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import select

from gateway.archive.schema import audit_log
from gateway.security.permissions import Role
from tests.conftest import auth
from tests.federation import center_starter, frontend_starter, index_starter
from tests.peers.ports import free_port
from tests.test_authz import bearer, user_token
from tests.test_doctor import HOSPITAL, OTHER, PERSON, Federation, index_record

ORDER, OURS_INSURANCE = "MR020", "260500002"  # our cervical-spine MR and its insurance code
THEIRS = "GZ-MR-5"  # the other hospital's code for the same exam: not mapped at first


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Federation, Path]]:
    tmp = tmp_path_factory.mktemp("codemaps")
    indexes, centers, frontends = (
        index_starter(tmp / "i"),
        center_starter(tmp / "c"),
        frontend_starter(tmp / "f"),
    )
    start_index, start_center, start_frontend = next(indexes), next(centers), next(frontends)
    port = free_port()
    index = start_index(
        provinces=[
            {"code": "50", "center_url": f"http://127.0.0.1:{port}"},
            {"code": "52", "center_url": "http://127.0.0.1:9"},
        ]
    )
    center = start_center("50", index=index, port=port)
    codes = tmp / "codes"
    codes.mkdir()
    (codes / "ours.toml").write_text(
        f'hospital = "{HOSPITAL}"\n[codes]\n"CT001" = "250301001"   # 胸部CT平扫\n'
        f'"{ORDER}" = "{OURS_INSURANCE}"   # 颈椎MR增强\n',
        encoding="utf-8",
    )
    (codes / "gz.toml").write_text(f'hospital = "{OTHER}"\n[codes]\n"GZ-CT-9" = "250301001"\n')
    platform = Ed25519PrivateKey.generate()
    pem = tmp / "insurance-platform.pub"
    pem.write_bytes(platform.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    fe = start_frontend(
        HOSPITAL,
        center=center,
        doctor={"codes_dir": str(codes)},
        grants={"insurance_qr_public_keys": [str(pem)]},
    )
    rec = index_record("1.2.52.90", date(2025, 11, 10), exam_item_code=THEIRS, qc_grade="甲")
    r = httpx.post(f"{index.url}/api/v1/index-records", json=rec, headers=auth(index))  # type: ignore[arg-type]
    assert r.status_code == 201, r.text
    f = Federation(index, center, fe, platform)
    assert f.grant().status_code == 201
    yield f, codes
    for starter in (frontends, centers, indexes):
        next(starter, None)  # each starter stops what it started


@pytest.fixture(scope="module")
def admin(fed: tuple[Federation, Path]) -> dict[str, str]:
    return bearer(user_token(fed[0].fe, "admin.h50", Role.INSTITUTION_ADMIN, HOSPITAL))


def _url(f: Federation, path: str = "") -> str:
    return f"{f.fe_url}/api/v1/code-maps{path}"


def _same_exams(f: Federation) -> dict[str, Any]:
    r = httpx.get(
        f"{f.fe_url}/api/v1/patients/{PERSON}/same-exams",
        params={"order": ORDER, "date": "2025-11-20"},
        headers=auth(f.fe),
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _reminded(f: Federation) -> list[str]:
    return [s["study_uid"] for s in _same_exams(f)["same_exams"]]


def _unmapped(f: Federation, headers: dict[str, str]) -> list[dict[str, str]]:
    r = httpx.get(_url(f, "/unmapped"), headers=headers)
    assert r.status_code == 200, r.text
    out: list[dict[str, str]] = r.json()["unmapped"]
    return out


def _audit(f: Federation, resource: str) -> list[dict[str, Any]]:
    """The audit records of one mapping (the audit thread chains within a second)."""
    deadline = time.monotonic() + 10
    while True:
        with f.fe.archive.catalog.engine.connect() as conn:
            rows = conn.execute(
                select(audit_log.c.event_type, audit_log.c.actor, audit_log.c.detail)
                .where(audit_log.c.resource == resource)
                .order_by(audit_log.c.seq)
            ).all()
        if rows or time.monotonic() > deadline:
            return [{"event": e, "actor": a, **json.loads(d)} for e, a, d in rows]
        time.sleep(0.2)


def test_map_edit_delete_drive_the_same_exam_reminder_the_file_and_the_audit(
    fed: tuple[Federation, Path], admin: dict[str, str]
) -> None:
    f, codes = fed
    theirs = {"hospital": OTHER, "code": THEIRS}
    # not mapped: the other hospital's MR is listed, not reminded
    assert _reminded(f) == [] and theirs in _same_exams(f)["unmapped"]
    assert theirs in _unmapped(f, admin)

    # map it → reminded at once; written to the hospital's file; no longer unmapped
    r = httpx.put(_url(f, f"/{OTHER}/{THEIRS}"), json={"insurance_code": OURS_INSURANCE}, headers=admin)
    assert r.status_code == 201, r.text
    assert r.json() == {"hospital": OTHER, "code": THEIRS, "insurance_code": OURS_INSURANCE, "before": None}
    assert _reminded(f) == ["1.2.52.90"]
    on_disk = tomllib.loads((codes / "gz.toml").read_text(encoding="utf-8"))
    assert on_disk == {"hospital": OTHER, "codes": {"GZ-CT-9": "250301001", THEIRS: OURS_INSURANCE}}
    assert theirs not in _unmapped(f, admin)
    maps = httpx.get(_url(f), headers=admin).json()["maps"]
    assert maps[OTHER][THEIRS] == OURS_INSURANCE

    # edit ours away → no longer the same exam; edit theirs to follow → reminded again
    r = httpx.put(_url(f, f"/{HOSPITAL}/{ORDER}"), json={"insurance_code": "260500009"}, headers=admin)
    assert r.status_code == 200 and r.json()["before"] == OURS_INSURANCE, r.text
    assert _reminded(f) == []
    ours = (codes / "ours.toml").read_text(encoding="utf-8")
    assert f'"{ORDER}" = "260500009"   # 颈椎MR增强' in ours and "# 胸部CT平扫" in ours  # comments stay
    r = httpx.put(_url(f, f"/{OTHER}/{THEIRS}"), json={"insurance_code": "260500009"}, headers=admin)
    assert r.status_code == 200 and r.json()["before"] == OURS_INSURANCE, r.text
    assert _reminded(f) == ["1.2.52.90"]

    # delete → listed as unmapped again, not reminded; the file no longer has it; a second is 404
    r = httpx.delete(_url(f, f"/{OTHER}/{THEIRS}"), headers=admin)
    assert r.status_code == 200 and r.json()["before"] == "260500009", r.text
    assert theirs in _unmapped(f, admin)
    assert _reminded(f) == [] and theirs in _same_exams(f)["unmapped"]
    assert THEIRS not in tomllib.loads((codes / "gz.toml").read_text(encoding="utf-8"))["codes"]
    assert httpx.delete(_url(f, f"/{OTHER}/{THEIRS}"), headers=admin).status_code == 404

    # every change audited, by whom, with before and after
    trail = _audit(f, f"code-map:{OTHER}/{THEIRS}")
    assert [(t["event"], t["before"], t["after"]) for t in trail] == [
        ("config-change", None, OURS_INSURANCE),
        ("config-change", OURS_INSURANCE, "260500009"),
        ("config-change", "260500009", None),
    ]
    assert all("admin.h50" in t["actor"] for t in trail), trail
    # the edits are what a restart reads (the files are the one source of truth)
    from gateway.codes import CodeMap

    assert CodeMap.load(codes).maps[HOSPITAL][ORDER] == "260500009"


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (f"/H99999999999/{THEIRS}", {"insurance_code": "1"}, "hospital_code"),  # no map for it
        (f"/{OTHER}/bad%20code", {"insurance_code": "1"}, "item_code"),
        (f"/{OTHER}/{THEIRS}", {"insurance_code": "25 03"}, "insurance_code"),
        (f"/{OTHER}/{THEIRS}", {"insurance_code": '1"]\nx = "'}, "insurance_code"),
        (f"/{OTHER}/{THEIRS}", {}, "insurance_code"),
        (f"/{OTHER}/{THEIRS}", {"insurance_code": "1", "modality": "MR"}, "modality"),
    ],
)
def test_bad_edits_are_422_naming_the_field_and_change_nothing(
    fed: tuple[Federation, Path], admin: dict[str, str], path: str, body: dict[str, str], field: str
) -> None:
    f, codes = fed
    before = {p.name: p.read_bytes() for p in codes.iterdir()}
    r = httpx.put(_url(f, path), json=body, headers=admin)
    assert r.status_code == 422, r.text
    assert field in [e["field"] for e in r.json()["errors"]], r.text
    assert {p.name: p.read_bytes() for p in codes.iterdir()} == before


def test_only_our_admins_and_write_scoped_clients_may_edit(
    fed: tuple[Federation, Path], admin: dict[str, str]
) -> None:
    f, _ = fed
    url, body = _url(f, f"/{OTHER}/GZ-DR-1"), {"insurance_code": "210100003"}
    doctor = bearer(user_token(f.fe, "dr.h50", Role.DOCTOR, HOSPITAL))
    stranger = bearer(user_token(f.fe, "admin.h52", Role.INSTITUTION_ADMIN, OTHER))
    reader = auth(f.fe, "api:codes")
    for who in (doctor, stranger, reader):
        assert httpx.put(url, json=body, headers=who).status_code == 403
        assert httpx.delete(_url(f, f"/{HOSPITAL}/CT001"), headers=who).status_code == 403
    assert httpx.get(_url(f, "/unmapped"), headers=stranger).status_code == 403  # not even reading
    assert httpx.get(_url(f, "/unmapped"), headers=reader).status_code == 200
    writer = auth(f.fe, "api:codes api:codes:write")
    r = httpx.put(url, json=body, headers=writer)
    assert r.status_code == 201, r.text
    assert httpx.delete(url, headers=admin).status_code == 200
