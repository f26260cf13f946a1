"""Sampling the slices of a series for pixel measures (R-QC-1, docs/qc.md "Sampling"): header checks
on every instance, pixel measures on the first, last and evenly spaced slices of a CT/MR series
(``series_sample`` in config/qc.toml, 0 = every slice), on every single image of DX/CR/US...; a
defective sampled slice still rejects its series and holds the study until a replacement — which
is itself measured — releases it.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from gateway.archive.blobstore import FolderBlobStore
from gateway.archive.catalog import Catalog
from gateway.config import ConfigError
from gateway.ingest import Accepted, Ingest
from gateway.qc.book import QcBook
from gateway.qc.engine import QcEngine
from gateway.qc.gate import QcGate
from gateway.qc.result import Grade, StudyQc
from gateway.qc.rules import QcRules, parse_rules
from gateway.qc.sampling import sample
from gateway.qc.worker import QcWorker
from gateway.sample import ct_series, write_samples
from tests.qc_defects import stripe
from tests.test_catalog import catalog  # noqa: F401 - the two-database catalog fixture


def test_the_sample_is_first_last_and_evenly_spaced() -> None:
    # 300 slices, 9: index i·299//8 for i = 0..8
    assert sample(range(1, 301), 9) == {1, 38, 75, 113, 150, 187, 225, 262, 300}
    assert sample(range(1, 21), 9) == {1, 3, 5, 8, 10, 12, 15, 17, 20}
    assert sample(range(1, 301), 2) == {1, 300}
    assert sample(range(1, 302), 1) == {151}  # one: the middle
    assert sample(range(1, 8), 9) == set(range(1, 8))  # a short series: every slice
    assert sample(range(1, 301), 0) == set(range(1, 301))  # 0: every slice
    # instance numbers need not start at 1 nor be contiguous; arrival order does not matter
    numbers = list(range(101, 701, 2))
    shuffled = numbers[:]
    random.Random(4).shuffle(shuffled)
    picked = sample(shuffled, 9)
    assert picked == sample(numbers, 9) and len(picked) == 9
    assert {101, 699, numbers[(len(numbers) - 1) // 2]} <= picked and picked <= set(numbers)


def test_rules_say_which_modalities_are_sampled() -> None:
    rules = QcRules()
    assert rules.series_sample == 9
    assert [m for m in ("CT", "MR", "PT", "NM", "DX", "CR", "MG", "US", "XA") if rules.samples(m)] == [
        "CT",
        "MR",
        "PT",
        "NM",
    ]
    assert not parse_rules({"series_sample": 0}).samples("CT")
    with pytest.raises(ConfigError) as bad:
        parse_rules({"sampled_modalities": ["ct"]}, "qc.toml")
    assert any("sampled_modalities" in p and "upper case" in p for p in bad.value.problems)
    with pytest.raises(ConfigError) as negative:
        parse_rules({"series_sample": -1}, "qc.toml")
    assert any(p.startswith("qc.toml: series_sample:") for p in negative.value.problems)


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("samples")
    write_samples(out, ct_slices=3)
    return out


def _first(folder: Path) -> Dataset:
    return dcmread(sorted(folder.iterdir())[0])


def test_a_deferred_slice_gets_header_checks_only_and_single_images_are_always_measured(
    samples: Path,
) -> None:
    engine = QcEngine()
    ct = _first(samples / "01_CT_chest")
    deferred = engine.assess(ct, defer_pixels=True)
    assert deferred.pixels == "skipped" and [d.name for d in deferred.dimensions] == ["header"]
    full = engine.assess(ct)
    assert full.pixels == "measured"
    assert {"snr", "sharpness", "artifacts"} <= {d.name for d in full.dimensions}
    broken = _first(samples / "01_CT_chest")
    del broken.SOPClassUID  # a header error rejects a deferred slice too
    assert engine.assess(broken, defer_pixels=True).grade is Grade.REJECT
    for folder in ("03_DX_chest", "04_XA_coronary", "05_US_carotid"):
        single = engine.assess(_first(samples / folder), defer_pixels=True)
        assert single.pixels == "measured", folder
    ct.NumberOfFrames = 1
    del ct.InstanceNumber  # no position in its series: measured
    assert engine.assess(ct, defer_pixels=True).pixels == "measured"
    every = QcEngine(parse_rules({"series_sample": 0}))
    assert every.assess(_first(samples / "01_CT_chest"), defer_pixels=True).pixels == "measured"


def _ingest(tmp_path: Path, ingest: Ingest, files: list[Path]) -> None:
    for path in files:
        copy = tmp_path / f"in-{path.name}"
        copy.write_bytes(path.read_bytes())
        assert isinstance(ingest.accept_file(copy, source="TEST"), Accepted)
        copy.unlink(missing_ok=True)


def test_a_sampled_defective_slice_rejects_the_series_and_its_measured_replacement_releases_it(
    catalog: Catalog,  # noqa: F811
    tmp_path: Path,
) -> None:
    files = ct_series(tmp_path / "ct", slices=20, study_uid=generate_uid())
    by_number = {int(dcmread(f, stop_before_pixels=True).InstanceNumber): f for f in files}
    clean10 = dcmread(by_number[10])
    for n in (10, 2):  # 10 is in the sample of 20 slices; 2 is not
        stripe(dcmread(by_number[n]), 32).save_as(by_number[n], enforce_file_format=True)
    study = str(clean10.StudyInstanceUID)
    store = FolderBlobStore(tmp_path / "blobs")
    book = QcBook(catalog, series_sample=9)
    book.install()
    ingest = Ingest(catalog, store, quarantine=tmp_path / "q")
    _ingest(tmp_path, ingest, files)
    worker = QcWorker(book, QcEngine(), store)
    gate = QcGate(book)

    # first pass: every header, no pixels; nothing is released or forwarded yet
    while worker.run_once(limit=50):
        pass
    assert {r.pixels for r in book.results(study)} == {"skipped"}
    assert gate.check(study).reason == "waiting for QC pixel measures of 9 sampled instances"
    queued = {row["sop_uid"]: row for row in book.claim(limit=50)}
    sop_of = {n: str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for n, f in by_number.items()}
    assert set(queued) == {sop_of[n] for n in (1, 3, 5, 8, 10, 12, 15, 17, 20)}
    assert all(row["measure"] for row in queued.values())
    for row in queued.values():
        worker.grade(row)

    results = {r.instance_number: r for r in book.results(study)}
    measured = {n for n, r in results.items() if r.pixels == "measured"}
    assert measured == {1, 3, 5, 8, 10, 12, 15, 17, 20}
    assert results[10].grade is Grade.REJECT and any("stripe" in r for r in results[10].reasons)
    assert results[2].grade is Grade.A  # not sampled: its stripe goes unseen (the trade-off)
    [series] = StudyQc(study, book.results(study)).series
    assert series.grade is Grade.REJECT and series.to_json()["pixel_measured"] == 9
    assert "held by QC: 1 instances graded 废" in gate.check(study).reason
    assert book.queue_samples(study) == 0  # the sample is complete: nothing more to measure

    # a replacement at position 10: graded by header first (that releases nothing), then
    # measured because its position holds a reject, and then it releases the study
    clean10.SOPInstanceUID = clean10.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    replacement = tmp_path / "replacement.dcm"
    clean10.save_as(replacement, enforce_file_format=True)
    _ingest(tmp_path, ingest, [replacement])
    assert worker.run_once()
    first = book.result(str(clean10.SOPInstanceUID))
    assert first is not None and first.pixels == "skipped" and first.grade.passes
    assert book.rejects(study) == ([sop_of[10]], [])
    assert gate.check(study).reason == "waiting for QC pixel measures of 1 sampled instances"
    assert worker.run_once()
    again = book.result(str(clean10.SOPInstanceUID))
    assert again is not None and again.pixels == "measured" and again.grade.passes
    hold = gate.check(study)
    assert hold.reason == "" and hold.exclude == frozenset({sop_of[10]})
