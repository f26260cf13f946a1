"""Image QC across the forward path (issue 4 §4-5, R-QC-1, R-CE-5, R-RT-3), with a real front-end
and center: a reject is held back and listed for the hospital, its replacement releases the study,
the center grades what it receives, and its result reaches the front-end and every retriever.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import update

from dimse.scu import send
from gateway.archive import ArchiveUnavailable
from gateway.archive.schema import qc_queue
from gateway.center import Center
from gateway.config import CenterConfig, ConfigError, QcSection, parse_config
from gateway.frontend import Frontend
from gateway.qc.book import QcBook
from gateway.qc.dicom_json import PRIVATE_CREATOR
from gateway.sample import ct_series
from index.service import NationalIndex
from tests.conftest import auth, center_config, forward_to, frontend_config, node_url
from tests.federation import exam_body, store_study
from tests.peers.ports import free_port
from tests.qc_defects import stripe
from tests.test_forwarding import FAST, forwarding, wait_until
from tests.test_index import CST, PERSON

QC_ON = QcSection(enabled=True)


class Nodes:
    """Centers and front-ends with ``[qc] enabled``, stopped after the test (or when asked)."""

    def __init__(self) -> None:
        self.running: list[Frontend | Center] = []

    def __call__(self, kind: str, root: Path, **kw: Any) -> Any:
        if kind == "center":
            cfg: Any = center_config(root)
            node: Frontend | Center = Center.start(cfg.model_copy(update={"qc": QC_ON}))
        else:
            qc = kw.pop("qc", QC_ON)
            node = Frontend.start(frontend_config(root, **kw).model_copy(update={"qc": qc}))
        self.running.append(node)
        return node

    def stop(self, node: Frontend | Center) -> None:
        self.running.remove(node)
        node.stop()


@pytest.fixture
def nodes() -> Iterator[Nodes]:
    started = Nodes()
    yield started
    for node in reversed(started.running):
        node.stop()


def get(node: Frontend | Center, path: str) -> httpx.Response:
    return httpx.get(f"{node_url(node)}{path}", headers=auth(node), timeout=30)


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_reject_is_held_replacement_releases_study_and_center_qc_reaches_frontend(
    nodes: Nodes, tmp_path: Path
) -> None:
    center: Center = nodes("center", tmp_path / "center")
    fe: Frontend = nodes("frontend", tmp_path / "fe", forward=forward_to(center, **FAST))
    files = ct_series(tmp_path / "ct", slices=3, study_uid=generate_uid())
    bad = dcmread(files[1])
    write(stripe(bad, 32), files[1])  # stripe artifact: graded 废
    study = str(bad.StudyInstanceUID)
    assert send(files, "127.0.0.1", fe.dicom_port, "YBYX").ok

    # the hospital sees the reject with its reasons; the study is held, nothing reaches the center
    wait_until(lambda: len(get(fe, "/api/v1/qc/failures").json()) == 1, what="the reject listed")
    [failure] = get(fe, "/api/v1/qc/failures").json()
    assert failure["sop_uid"] == str(bad.SOPInstanceUID) and failure["grade"] == "废"
    assert any("伪影" in r and "stripe" in r for r in failure["reasons"]), failure["reasons"]
    wait_until(lambda: "held by QC" in forwarding(fe)[0]["last_error"], what="the study held")
    assert center.archive.catalog.counts()["instances"] == 0
    metrics = get(fe, "/metrics").text
    assert "ybyx_qc_backlog 0" in metrics and "ybyx_qc_open_rejects 1" in metrics

    # a replacement: a clean image, new SOP Instance UID, same series and instance number
    good = bad  # as read before the stripe was added
    good.SOPInstanceUID = good.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    replacement = write(good, tmp_path / "replacement.dcm")
    assert send([replacement], "127.0.0.1", fe.dicom_port, "YBYX").ok
    wait_until(lambda: forwarding(fe)[0]["state"] == "confirmed", what="the study confirmed")

    held = {i.sop_uid for i in center.archive.catalog.locate({"StudyInstanceUID": study})}
    assert held == {str(dcmread(f).SOPInstanceUID) for f in (files[0], files[2], replacement)}
    assert get(fe, "/api/v1/qc/failures").json() == []

    # the center graded on receipt; its QC came back in the upload-monitoring record (R-CE-5)
    mine = get(fe, f"/api/v1/studies/{study}/qc").json()
    assert mine["center_report"]["grade"] == "甲" and mine["center_report"]["instances"] == 3
    assert len(mine["instances"]) == 4  # the reject stays on record at the front-end
    theirs = get(center, f"/api/v1/studies/{study}/qc").json()
    assert theirs["graded_here"]["grade"] == "甲" and theirs["frontend_report"]["instances"] == 3
    assert theirs["graded_here"]["pending_instances"] == 0 and mine["center_report"]["pending_instances"] == 0
    dims = {d["name"] for d in theirs["graded_here"]["dimensions"]}
    assert {"coverage", "center_line", "positioning", "sharpness", "graininess", "snr", "artifacts"} <= dims

    # and any retriever gets it in the study's metadata, as the documented private block
    meta = get(center, f"/dicom-web/studies/{study}/metadata").json()
    assert len(meta) == 3
    for doc in meta:
        assert doc["00990010"]["Value"] == [PRIVATE_CREATOR]
        assert doc["00991001"]["Value"] == ["A"] and doc["00991002"]["Value"] == ["A"]
        assert json.loads(doc["00991003"]["Value"][0])["sop_uid"] == doc["00080018"]["Value"][0]


def test_grading_resumes_after_a_restart(nodes: Nodes, tmp_path: Path) -> None:
    """Instances stored while QC was off, and a row a dead run had claimed, are graded at start."""
    root = tmp_path / "fe"
    fe: Frontend = nodes("frontend", root, qc=QcSection(enabled=False))
    files = ct_series(tmp_path / "ct", slices=2, study_uid=generate_uid())
    assert send(files, "127.0.0.1", fe.dicom_port, "YBYX").ok
    nodes.stop(fe)
    fe2: Frontend = nodes("frontend", root)
    assert fe2.qc is not None
    wait_until(lambda: fe2.qc is not None and fe2.qc.book.waiting() == 0, what="graded")
    study = str(dcmread(files[0]).StudyInstanceUID)
    assert [r.grade.value for r in fe2.qc.book.results(study)] == ["甲", "甲"]
    # a claimed row (leased into the future by a worker that died) is taken back on start
    book: QcBook = fe2.qc.book
    with fe2.archive.catalog.write() as conn:
        conn.execute(
            qc_queue.insert().values(
                sop_uid=str(dcmread(files[0]).SOPInstanceUID),
                study_uid=study,
                attempts=0,
                next_attempt_at=book.clock(),
                last_error="",
                enqueued_at=book.clock(),
            )
        )
        conn.execute(update(qc_queue).values(next_attempt_at=book.clock().replace(year=2100)))
    nodes.stop(fe2)
    fe3: Frontend = nodes("frontend", root)
    wait_until(lambda: fe3.qc is not None and fe3.qc.book.waiting() == 0, what="the claimed row graded")


def test_qc_section_points_at_the_rules(tmp_path: Path) -> None:
    cfg = parse_config(
        {"role": "center", "province": "50", "qc": {"enabled": True, "rules": "qc.toml"}}, "c.toml", tmp_path
    )
    assert isinstance(cfg, CenterConfig) and cfg.qc.enabled and cfg.qc.rules == tmp_path / "qc.toml"
    with pytest.raises(ConfigError) as bad:
        parse_config({"role": "center", "province": "50", "qc": {"enabld": True}}, "c.toml")
    assert bad.value.problems == ["c.toml: qc.enabld: unknown key"]


def test_bad_rules_stop_the_node_naming_the_key(tmp_path: Path) -> None:
    rules = tmp_path / "qc.toml"
    rules.write_text('role = "qc"\n[modality.CT]\nsnr = [5, 10, 20]\n', encoding="utf-8")
    cfg = center_config(tmp_path / "c").model_copy(update={"qc": QcSection(enabled=True, rules=rules)})
    with pytest.raises(ArchiveUnavailable) as bad:
        Center.start(cfg)
    assert (
        bad.value.key == "qc.rules"
        and "modality.CT.snr" in bad.value.reason
        and "must not increase" in bad.value.reason
    )


def test_the_index_learns_the_centers_qc_grade(
    tmp_path: Path, start_index: Callable[..., NationalIndex], start_fed_center: Callable[..., Center]
) -> None:
    """R-CE-5 with issue 5: a study registered at the national index carries the center's grade."""
    port = free_port()
    idx = start_index(provinces=[{"code": "50", "center_url": f"http://127.0.0.1:{port}"}])
    center = start_fed_center("50", index=idx, port=port, qc={"enabled": True})
    files = ct_series(tmp_path / "ct", slices=2, study_uid=generate_uid())
    study = str(dcmread(files[0]).StudyInstanceUID)
    manifest = store_study(center, files)
    h = auth(center)
    exam = exam_body(study, PERSON, at=datetime(2025, 10, 1, 9, 30, tzinfo=CST))
    assert httpx.post(f"{center.url}/api/v1/exams", json=exam, headers=h).status_code == 200
    r = httpx.put(f"{center.url}/api/v1/studies/{study}/manifest", json={"instances": manifest}, headers=h)
    assert r.json()["state"] == "complete" and r.json()["qc"]["grade"] == "甲"
    ih = auth(idx)
    wait_until(
        lambda: (
            [
                x["qc_grade"]
                for x in httpx.get(
                    f"{idx.url}/api/v1/index-records", params={"person": PERSON}, headers=ih
                ).json()
            ]
            == ["甲"]
        ),
        what="the grade at the index",
    )
