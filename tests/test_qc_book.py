"""QC results in the catalog, on SQLite and PostgreSQL (issue 4 §4, R-QC-1): the queue filled in
the storing transaction, results per instance version, rejects held until replaced (same
position, re-sent series, or new bytes), and the forward gate's answer.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import JPEGLSLossless
from sqlalchemy import update

from gateway.archive.blobstore import FolderBlobStore
from gateway.archive.catalog import Catalog
from gateway.archive.schema import instances
from gateway.qc.book import QcBook
from gateway.qc.engine import QcEngine
from gateway.qc.gate import QcGate
from gateway.qc.result import Dimension, Grade, QcResult
from gateway.qc.worker import QcWorker
from gateway.sample import ct_series
from tests.test_catalog import catalog, rec  # noqa: F401 - the two-database catalog fixture

STUDY = "1.2.3"


def result(
    sop: str, grade: Grade, *, series: str = "1.2.3.1", number: int = 1, instance: int = 1
) -> QcResult:
    dim = Dimension("snr", grade, 50.0 if grade is Grade.REJECT else 95.0, {"snr": 3.0}, ["信噪比: snr 3"])
    return QcResult(
        STUDY, series, sop, "CT", "CHEST", grade, [dim], series_number=number, instance_number=instance
    )


def grade_all(book: QcBook, grades: dict[str, QcResult]) -> None:
    for row in book.claim(limit=50):
        book.store(grades[row["sop_uid"]], version=row["version"], queue_id=row["id"])


def test_reject_held_until_a_replacement_at_the_same_position(catalog: Catalog) -> None:  # noqa: F811
    book = QcBook(catalog)
    book.install()
    gate = QcGate(book)
    catalog.add_instance(rec("1.9.1", instance_number=1))
    catalog.add_instance(rec("1.9.2", instance_number=2, sha="b" * 64))
    assert book.waiting() == 2 and book.ungraded(STUDY) == 2
    assert gate.check(STUDY).reason == "waiting for QC of 2 instances"
    grade_all(book, {"1.9.1": result("1.9.1", Grade.A), "1.9.2": result("1.9.2", Grade.REJECT, instance=2)})
    assert book.waiting() == 0 and book.ungraded(STUDY) == 0
    assert book.rejects(STUDY) == (["1.9.2"], [])
    assert "held by QC: 1 instances graded 废" in gate.check(STUDY).reason
    [failure] = book.failures()
    assert failure["sop_uid"] == "1.9.2" and failure["reasons"] == ["信噪比: snr 3"]

    catalog.add_instance(rec("1.9.3", instance_number=2, sha="c" * 64))  # the replacement
    assert gate.check(STUDY).reason == "waiting for QC of 1 instances"
    grade_all(book, {"1.9.3": result("1.9.3", Grade.B, instance=2)})
    assert book.rejects(STUDY) == ([], ["1.9.2"]) and book.failures() == []
    hold = gate.check(STUDY)
    assert hold.reason == "" and hold.exclude == {"1.9.2"}
    report = gate.report(STUDY)
    assert report is not None and report["grade"] == "乙" and report["instances"] == 2  # the reject left out


def test_a_resent_series_or_new_bytes_release_a_reject(catalog: Catalog) -> None:  # noqa: F811
    book = QcBook(catalog)
    book.install()
    catalog.add_instance(rec("1.9.1"))
    catalog.add_instance(rec("1.9.2", series="1.2.3.7", sha="b" * 64))
    grade_all(
        book,
        {
            "1.9.1": result("1.9.1", Grade.REJECT),
            "1.9.2": result("1.9.2", Grade.REJECT, series="1.2.3.7", number=7),
        },
    )
    assert sorted(book.rejects(STUDY)[0]) == ["1.9.1", "1.9.2"]
    # series 1 sent again under a new Series Instance UID
    catalog.add_instance(rec("1.9.5", series="1.2.3.9", sha="e" * 64))
    grade_all(book, {"1.9.5": result("1.9.5", Grade.A, series="1.2.3.9", number=1)})
    assert book.rejects(STUDY) == (["1.9.2"], ["1.9.1"])
    # new bytes for the same SOP Instance UID are graded again, and pass
    catalog.add_instance(rec("1.9.2", series="1.2.3.7", sha="f" * 64))
    assert book.ungraded(STUDY) == 1
    grade_all(book, {"1.9.2": result("1.9.2", Grade.C, series="1.2.3.7", number=7)})
    assert book.rejects(STUDY) == ([], ["1.9.1"])


def test_backfill_queues_what_was_stored_while_qc_was_off(catalog: Catalog) -> None:  # noqa: F811
    catalog.add_instance(rec("1.9.1"))
    book = QcBook(catalog)
    assert book.waiting() == 0
    assert book.backfill() == 1 and book.backfill() == 0
    [row] = book.claim()
    assert row["sop_uid"] == "1.9.1" and row["version"] == 1
    assert book.claim() == []  # leased
    book.failed(row["id"], "ValueError: unreadable")
    assert book.claim() == []  # backing off
    assert book.backfill() == 0 and len(book.claim()) == 1  # a start takes back leased rows


def test_worker_reads_the_bytes_the_compression_stage_put_in_place(catalog: Catalog, tmp_path: Path) -> None:  # noqa: F811
    """A row claimed before the codec replaced the blob (and deleted the old one) is graded from
    the new bytes, not failed (R-QC-1 with R-UP-1)."""
    [path] = ct_series(tmp_path / "ct", slices=1)
    raw = path.read_bytes()
    ds = dcmread(path)
    ds.compress(JPEGLSLossless)
    packed = io.BytesIO()
    ds.save_as(packed, enforce_file_format=True)
    store = FolderBlobStore(tmp_path / "blobs")
    old_size, old_sha = store.put("k/old", io.BytesIO(raw))
    store.put("k/new", io.BytesIO(packed.getvalue()))
    book = QcBook(catalog)
    book.install()
    sop = str(ds.SOPInstanceUID)
    catalog.add_instance(rec(sop, sha=old_sha, blob_key="k/old", size=old_size))
    [row] = book.claim()
    new_sha = hashlib.sha256(packed.getvalue()).hexdigest()
    with catalog.write() as conn:  # what the compression stage commits, then the old blob goes
        conn.execute(
            update(instances).where(instances.c.sop_uid == sop).values(blob_key="k/new", sha256=new_sha)
        )
    store.delete("k/old")
    worker = QcWorker(book, QcEngine(), store)
    result = worker.grade(row)
    assert result is not None and result.grade is Grade.A
    assert book.waiting() == 0 and book.ungraded(STUDY) == 0


def test_grading_a_study_now_tries_each_row_once(catalog: Catalog, tmp_path: Path) -> None:  # noqa: F811
    """The center's manifest answer grades what is queued, but a row that fails (its blob is
    gone) is tried once and left for the worker's backoff: the request never loops."""
    book = QcBook(catalog)
    book.install()
    catalog.add_instance(rec("1.9.1", blob_key="k/missing"))
    worker = QcWorker(book, QcEngine(), FolderBlobStore(tmp_path / "blobs"))
    assert worker.grade_study(STUDY, budget_seconds=5) == 1
    assert book.results(STUDY) == [] and book.waiting() == 1
