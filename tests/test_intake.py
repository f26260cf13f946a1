"""The intake journal (gateway/intake.py): one flush per received instance, nothing acknowledged lost.

Real SQLite catalog and folder store on disk. A crash of the machine cannot be staged in a test;
what it can lose is staged instead: the catalog rows of instances whose journal names are still
there are deleted (what SQLite loses when its ``-wal`` tail never reached the disk), then a fresh
node's recovery must catalogue them again from the stored files (R-UP-3, issue 2 "nothing lost").
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydicom import dcmread
from sqlalchemy import delete, select

from gateway.archive.blobstore import FolderBlobStore
from gateway.archive.catalog import Catalog
from gateway.archive.schema import instances
from gateway.audit import AuditLog, EventType, read_records
from gateway.ingest import Accepted, Ingest
from gateway.intake import IntakeJournal, source_of
from gateway.sample import ct_series


class _CountingSync:
    """The catalog's flush, counted (and held back while ``gate`` is clear)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.calls = 0
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self) -> None:
        self.gate.wait(30)
        self.calls += 1
        self.catalog.sync()


def _node(root: Path, sync_interval: float = 0.05) -> tuple[Catalog, Ingest, IntakeJournal, _CountingSync]:
    catalog = Catalog.open(f"sqlite:///{root / 'catalog.db'}")
    store = FolderBlobStore(root / "blobs")
    sync = _CountingSync(catalog)
    journal = IntakeJournal(store.root / ".intake", sync, interval=sync_interval)
    ingest = Ingest(catalog, store, quarantine=root / "q", journal=journal)
    return catalog, ingest, journal, sync


def _accept(ingest: Ingest, files: list[Path], spool: Path, source: str = "CT_1") -> list[Accepted]:
    spool.mkdir(parents=True, exist_ok=True)
    done = []
    for i, src in enumerate(files):
        path = spool / f"{i}.dcm"
        shutil.copyfile(src, path)
        result = ingest.accept_file(path, source=source)
        assert isinstance(result, Accepted), result
        path.unlink()  # the receiver's own name goes at once
        done.append(result)
    return done


def test_rows_are_flushed_in_batches_and_the_names_then_removed(tmp_path: Path) -> None:
    catalog, ingest, journal, sync = _node(tmp_path, sync_interval=0.2)
    assert ingest.journal is journal  # folder store + SQLite file: the journal is used
    series = ct_series(tmp_path / "ct", slices=8)
    try:
        sync.gate.clear()  # the flush waits: every name must still be there
        accepted = _accept(ingest, series, tmp_path / "blobs" / ".spool")
        names = journal.leftovers()
        assert len(names) == len(series)
        for name in names:
            assert source_of(name) == "CT_1"
            assert os.stat(name).st_nlink == 2  # the journal's name and the blob's: one file
        assert {hashlib.sha256(n.read_bytes()).hexdigest() for n in names} == {a.sha256 for a in accepted}
        sync.gate.set()
        journal.close()
        assert journal.leftovers() == []
        assert 1 <= sync.calls < len(series)  # batched: fewer flushes than instances
        for src in series:
            sop = str(dcmread(src, stop_before_pixels=True).SOPInstanceUID)
            [inst] = catalog.locate({"SOPInstanceUID": sop})
            assert inst.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
            assert os.stat(ingest.store.local_path(inst.blob_key)).st_nlink == 1  # type: ignore[attr-defined]
    finally:
        sync.gate.set()
        ingest.close()
        catalog.close()


def test_recovery_catalogues_again_the_rows_a_crash_lost(tmp_path: Path) -> None:
    catalog, ingest, journal, sync = _node(tmp_path)
    series = ct_series(tmp_path / "ct", slices=5)
    sops = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in series]
    sync.gate.clear()  # the "machine" stops before the catalog's flush
    _accept(ingest, series, tmp_path / "blobs" / ".spool", source="MODALITY_7")
    # what the lost -wal tail held: the rows of three of them (the others' rows reached the disk)
    lost = sops[:3]
    with catalog.write() as conn:
        conn.execute(delete(instances).where(instances.c.sop_uid.in_(lost)))
    # a name left by an instance that was never acknowledged: its file never reached the disk
    garbage = journal.new_name("MODALITY_7")
    garbage.write_bytes(b"\0" * 4096)
    # the node is gone without closing (its thread holds no name any more: a new process starts)
    leftovers = journal.leftovers()
    assert len(leftovers) == len(series) + 1
    catalog.engine.dispose()

    catalog2 = Catalog.open(f"sqlite:///{tmp_path / 'catalog.db'}")
    store2 = FolderBlobStore(tmp_path / "blobs")
    audit = AuditLog(catalog2, signing_key=Ed25519PrivateKey.generate())
    ingest2 = Ingest(
        catalog2,
        store2,
        quarantine=tmp_path / "q",
        journal=IntakeJournal(store2.root / ".intake", catalog2.sync),
        audit=audit,
    )
    try:
        assert ingest2.recover() == 3
        assert not any((store2.root / ".intake").iterdir())
        for src, sop in zip(series, sops, strict=True):
            [inst] = catalog2.locate({"SOPInstanceUID": sop})
            data = b"".join(store2.get(inst.blob_key))
            assert (
                hashlib.sha256(data).hexdigest()
                == inst.sha256
                == hashlib.sha256(src.read_bytes()).hexdigest()
            )
        with catalog2.engine.connect() as conn:
            rows = dict(conn.execute(select(instances.c.sop_uid, instances.c.source_ae)).all())
        assert len(rows) == len(series)
        assert {rows[sop] for sop in lost} == {"MODALITY_7"}  # the source, from the journal's name
        details = [
            json.loads(r.detail) for r in read_records(catalog2.engine) if r.event_type == EventType.UPLOAD
        ]
        recovered = [d["sop_instance_uid"] for d in details if "recovered" in d]
        assert sorted(recovered) == sorted(lost)  # audited as recovered (R-SE-4)
        assert ingest2.recover() == 0  # nothing left to do
    finally:
        sync.gate.set()
        ingest2.close()
        catalog2.close()
        ingest.close()
        catalog.close()


def test_without_the_journal_commits_are_durable_at_once(
    tmp_path: Path, new_pg_db: Callable[[], str]
) -> None:
    """PostgreSQL (or S3, or an encrypted store): no journal; every commit is durable itself."""
    catalog = Catalog.open(new_pg_db())
    store = FolderBlobStore(tmp_path / "blobs")
    journal = IntakeJournal(store.root / ".intake", catalog.sync)
    ingest = Ingest(catalog, store, quarantine=tmp_path / "q", journal=journal)
    try:
        assert not catalog.can_defer and ingest.journal is None
        _accept(ingest, ct_series(tmp_path / "ct", slices=2), tmp_path / "blobs" / ".spool")
        assert journal.leftovers() == []
    finally:
        ingest.close()
        catalog.close()
