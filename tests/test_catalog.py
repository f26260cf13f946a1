"""The catalog on SQLite and PostgreSQL: upserts, versions, matching, migrations (issue 2 §4)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from gateway.archive import migrations
from gateway.archive.catalog import AddOutcome, Catalog
from gateway.archive.query import Level, QueryError
from gateway.archive.record import InstanceRecord
from gateway.archive.schema import metadata

MIGRATIONS = Path(migrations.__file__).parent / "versions"


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Catalog]:
    url = (
        f"sqlite:///{tmp_path / 'c.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("fresh_pg_url")
    )
    cat = Catalog.open(url)
    yield cat
    cat.close()


def rec(
    sop: str, *, study: str = "1.2.3", series: str = "1.2.3.1", sha: str = "a" * 64, **kw: object
) -> InstanceRecord:
    base = dict(
        patient_id="P1",
        issuer="",
        patient_name="Zhang^San=张^三",
        birth_date="19800101",
        sex="M",
        study_uid=study,
        study_date="20240315",
        study_time="101500",
        accession_number="ACC1",
        study_id="S1",
        referring_physician="Li^Si",
        study_description="胸部CT",
        institution_name="重庆医院",
        series_uid=series,
        modality="CT",
        series_number=1,
        series_description="axial",
        body_part="CHEST",
        pps_start_date="20240315",
        pps_start_time="101500",
        sop_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        instance_number=1,
        transfer_syntax="1.2.840.10008.1.2.1",
        rows=512,
        columns=512,
        bits_allocated=16,
        number_of_frames=None,
        metadata_json="{}",
        size=10,
        sha256=sha,
        blob_key=f"k/{sop}/{sha[:4]}",
        received_at=datetime.now(UTC),
        source_ae="CT1",
    )
    base.update(kw)
    return InstanceRecord(**base)  # type: ignore[arg-type]


def test_migrations_match_schema(catalog: Catalog) -> None:
    with catalog.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_a_populated_sqlite_catalog_upgrades_across_table_rebuilds(tmp_path: Path) -> None:
    """An existing database with rows that other tables reference upgrades to head: SQLite batch
    migrations rebuild tables (0016 rebuilds ``users``, referenced by ``user_sessions``), which
    failed with "FOREIGN KEY constraint failed" while foreign keys were enforced."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    from gateway.archive.catalog import make_engine

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0015")
        now = "2026-12-01 00:00:00"
        conn.execute(
            text(
                "INSERT INTO users (id, username, role, institution, password_hash, password_set_at,"
                " totp_secret, failed_logins, created_at)"
                " VALUES (1, 'dr', 'doctor', 'H1', 'x', :t, 'S', 0, :t)"
            ),
            {"t": now},
        )
        conn.execute(
            text(
                "INSERT INTO user_sessions (session_id, secret_hash, csrf_hash, user_pk, source, mfa,"
                " created_at, last_seen_at, expires_at)"
                " VALUES ('s1', 'h', 'c', 1, '127.0.0.1', 0, :t, :t, :t)"
            ),
            {"t": now},
        )
    engine.dispose()
    cat = Catalog.open(url)  # migrates to head
    try:
        with cat.engine.connect() as conn:
            assert conn.execute(text("SELECT totp_secret FROM users WHERE id = 1")).scalar_one() == "S"
            assert conn.execute(text("SELECT user_pk FROM user_sessions")).scalar_one() == 1
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1  # enforced again
            head = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
        assert head == sorted(p.stem.split("_")[0] for p in MIGRATIONS.glob("0*.py"))[-1]
    finally:
        cat.close()


def test_pixel_row_is_one_lookup_by_the_three_uids(catalog: Catalog) -> None:
    """WADO-RS frames' lookup (a precompiled statement on a DBAPI connection, both dialects)."""
    catalog.add_instance(rec("1.9.7", pixel_offset=1234, pixel_length=524288, samples_per_pixel=1))
    catalog.add_instance(rec("1.9.8", transfer_syntax="1.2.840.10008.1.2.4.80", pixel_offset=99))
    catalog.add_instance(rec("1.9.9"))  # stored without a pixel location (e.g. before 0007)
    row = catalog.pixel_row("1.2.3", "1.2.3.1", "1.9.7")
    assert row is not None
    assert (row.instance.sop_uid, row.instance.blob_key, row.instance.size) == ("1.9.7", "k/1.9.7/aaaa", 10)
    assert (row.pixel_offset, row.pixel_length, row.rows, row.columns) == (1234, 524288, 512, 512)
    assert (row.samples_per_pixel, row.bits_allocated, row.number_of_frames) == (1, 16, None)
    jls = catalog.pixel_row("1.2.3", "1.2.3.1", "1.9.8")
    assert jls is not None and (jls.pixel_offset, jls.pixel_length) == (99, None)
    old = catalog.pixel_row("1.2.3", "1.2.3.1", "1.9.9")
    assert old is not None and old.pixel_offset is None
    assert catalog.pixel_row("1.2.3", "1.2.3.2", "1.9.7") is None  # wrong series
    assert catalog.pixel_row("1.2.4", "1.2.3.1", "1.9.7") is None  # wrong study
    assert catalog.pixel_row("1.2.3", "1.2.3.1", "1.9.6") is None


def test_metadata_is_the_stored_json_as_utf8_bytes_in_instance_order(catalog: Catalog) -> None:
    """WADO-RS /metadata reads the documents as bytes (no str round trip), both dialects."""
    doc = '{"00100010":{"vr":"PN","Value":[{"Ideographic":"张^三"}]},"n":%d}'
    for n in (2, 1, 3):
        catalog.add_instance(rec(f"1.9.{n}", instance_number=n, metadata_json=doc % n))
    catalog.add_instance(rec("1.8.1", series="1.2.3.9", metadata_json=doc % 9))
    docs = catalog.metadata({"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.1"})
    assert docs == [(doc % n).encode("utf-8") for n in (1, 2, 3)]
    assert catalog.metadata({"StudyInstanceUID": "9.9"}) == []


def test_add_then_duplicate_then_new_bytes_makes_a_version(catalog: Catalog) -> None:
    assert catalog.add_instance(rec("1.9.1")) is AddOutcome.STORED
    assert catalog.add_instance(rec("1.9.1")) is AddOutcome.DUPLICATE
    assert catalog.add_instance(rec("1.9.1", sha="b" * 64)) is AddOutcome.REPLACED
    assert catalog.counts()["instances"] == 1
    [current] = catalog.locate({"SOPInstanceUID": "1.9.1"})
    assert current.sha256 == "b" * 64
    [old] = catalog.versions("1.9.1")
    assert old["sha256"] == "a" * 64 and old["version"] == 1


def test_keep_first_policy_keeps_the_newcomer_only_as_a_version(catalog: Catalog) -> None:
    catalog.add_instance(rec("1.9.2"))
    assert catalog.add_instance(rec("1.9.2", sha="c" * 64), "keep-first") is AddOutcome.VERSION_KEPT
    assert catalog.locate({"SOPInstanceUID": "1.9.2"})[0].sha256 == "a" * 64
    assert [v["sha256"] for v in catalog.versions("1.9.2")] == ["c" * 64]


def test_study_level_counts_and_modalities(catalog: Catalog) -> None:
    for i in range(3):
        catalog.add_instance(rec(f"1.9.3.{i}"))
    catalog.add_instance(rec("1.9.3.9", series="1.2.3.2", modality="SR"))
    [study] = catalog.find(Level.STUDY, {"StudyInstanceUID": "1.2.3"})
    assert study["NumberOfStudyRelatedSeries"] == 2
    assert study["NumberOfStudyRelatedInstances"] == 4
    assert study["ModalitiesInStudy"] == ["CT", "SR"]
    assert study["PatientName"] == "Zhang^San=张^三"
    series = catalog.find(Level.SERIES, {"StudyInstanceUID": "1.2.3", "Modality": "CT"})
    assert [s["NumberOfSeriesRelatedInstances"] for s in series] == [3]


def test_matching_rules(catalog: Catalog) -> None:
    dates = {"1.1": "20230101", "1.2": "20240315", "1.3": "20250620"}
    for study, date in dates.items():
        catalog.add_instance(
            rec(
                f"{study}.0.1",
                study=study,
                series=f"{study}.0",
                study_date=date,
                patient_id=f"P{study}",
                patient_name=f"Wang^Wu{study[-1]}=王^五{study[-1]}",
            )
        )

    def uids(**criteria: str) -> set[str]:
        return {r["StudyInstanceUID"] for r in catalog.find(Level.STUDY, criteria)}

    assert uids(StudyDate="20240101-20241231") == {"1.2"}
    assert uids(StudyDate="20240315-") == {"1.2", "1.3"}
    assert uids(StudyDate="-20240315") == {"1.1", "1.2"}
    assert uids(StudyInstanceUID="1.1\\1.3") == {"1.1", "1.3"}
    assert uids(PatientID="P1.?") == {"1.1", "1.2", "1.3"}
    assert uids(PatientName="wang^wu2") == {"1.2"}  # case-insensitive, alphabetic group
    assert uids(PatientName="王^五3") == {"1.3"}  # ideographic group
    assert uids(PatientName="王*") == {"1.1", "1.2", "1.3"}
    assert uids(ModalitiesInStudy="MR") == set()
    assert uids(StudyDate="", AccessionNumber="*") == {"1.1", "1.2", "1.3"}
    # paging is stable: date order, then insertion
    page = [r["StudyInstanceUID"] for r in catalog.find(Level.STUDY, {}, limit=2, offset=1)]
    assert page == ["1.2", "1.3"]


def test_bad_queries_are_refused_with_the_key(catalog: Catalog) -> None:
    with pytest.raises(QueryError, match="StudyDate"):
        catalog.find(Level.STUDY, {"StudyDate": "20250101-20240101"})
    with pytest.raises(QueryError, match="SOPInstanceUID: not a study-level"):
        catalog.find(Level.STUDY, {"SOPInstanceUID": "1.2"})
    with pytest.raises(QueryError, match="SeriesNumber"):
        catalog.find(Level.SERIES, {"SeriesNumber": "one"})


def test_wildcards_do_not_leak_sql_like_characters(catalog: Catalog) -> None:
    catalog.add_instance(rec("1.4.0.1", study="1.4", series="1.4.0", accession_number="A_1%"))
    catalog.add_instance(rec("1.5.0.1", study="1.5", series="1.5.0", accession_number="AB1x"))
    found = catalog.find(Level.STUDY, {"AccessionNumber": "A_1%"})
    assert [r["StudyInstanceUID"] for r in found] == ["1.4"]
    assert [r["StudyInstanceUID"] for r in catalog.find(Level.STUDY, {"AccessionNumber": "A?1*"})] == [
        "1.4",
        "1.5",
    ]


def test_parallel_writers_of_one_study_lose_nothing(catalog: Catalog) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(15):
                catalog.add_instance(rec(f"1.6.{n}.{i}", study="1.6", series=f"1.6.{i % 2}"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    [study] = catalog.find(Level.STUDY, {"StudyInstanceUID": "1.6"})
    assert study["NumberOfStudyRelatedInstances"] == 60
    assert study["NumberOfStudyRelatedSeries"] == 2


def test_patient_details_are_refreshed_by_newer_instances(catalog: Catalog) -> None:
    catalog.add_instance(
        rec("1.7.0.1", study="1.7", series="1.7.0", patient_id="P7", patient_name="Old^Name")
    )
    catalog.add_instance(
        dataclasses.replace(
            rec("1.7.0.2", study="1.7", series="1.7.0", patient_id="P7"), patient_name="New^Name"
        )
    )
    [study] = catalog.find(Level.STUDY, {"PatientID": "P7"})
    assert study["PatientName"] == "New^Name"
