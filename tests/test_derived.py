"""3D post-processed series (R-UP-2, issue 4 §2): recognised, and a study whose derived series
arrived without its source series is flagged in the center's upload monitoring."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from gateway.archive.blobstore import FolderBlobStore
from gateway.archive.catalog import Catalog
from gateway.derived import derived_series, is_derived
from gateway.ingest import Accepted, Ingest
from gateway.monitoring import check_manifest, monitoring_record
from gateway.sample import ct_series


def test_image_types_that_mark_post_processing() -> None:
    assert not is_derived(("ORIGINAL", "PRIMARY", "AXIAL"))
    assert not is_derived(("DERIVED", "PRIMARY"))  # a processed DX "for presentation" is the scan
    assert is_derived(("DERIVED", "PRIMARY"), has_sources=True)
    assert is_derived(("DERIVED", "SECONDARY", "OTHER"))
    assert is_derived(("DERIVED", "PRIMARY", "MPR"))
    assert is_derived(("DERIVED", "SECONDARY", "VOLUME", "VR"))
    assert is_derived(("ORIGINAL", "PRIMARY", "MIP"))


def _reconstruction(source: list[Path], out: Path, *, study_uid: str | None, refs: bool, kind: str) -> Path:
    """A 3D reconstruction made on a workstation from ``source`` (a rib VR beside the chest CT)."""
    ds = dcmread(source[0])
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesNumber = 901
    ds.SeriesDescription = f"Ribs {kind}"
    ds.ImageType = ["DERIVED", "SECONDARY", kind]
    if study_uid is not None:
        ds.StudyInstanceUID = study_uid
    if refs:
        items = []
        for path in source:
            src = dcmread(path, stop_before_pixels=True)
            item = Dataset()
            item.ReferencedSOPClassUID = src.SOPClassUID
            item.ReferencedSOPInstanceUID = src.SOPInstanceUID
            items.append(item)
        ds.SourceImageSequence = items
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.fixture
def archive(tmp_path: Path) -> tuple[Catalog, Ingest]:
    catalog = Catalog.open(f"sqlite:///{tmp_path / 'catalog.db'}")
    ingest = Ingest(catalog, FolderBlobStore(tmp_path / "blobs"), quarantine=tmp_path / "q")
    return catalog, ingest


def _store(ingest: Ingest, paths: list[Path]) -> dict[str, str]:
    manifest = {}
    for path in paths:
        result = ingest.accept_file(path, source="CT_ROOM1")
        assert isinstance(result, Accepted), result
        manifest[result.sop_uid] = result.sha256
    return manifest


def test_a_reconstruction_with_its_scan_is_not_flagged(
    archive: tuple[Catalog, Ingest], tmp_path: Path
) -> None:
    catalog, ingest = archive
    ct = ct_series(tmp_path / "ct", slices=3)
    study = str(dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)
    vr = _reconstruction(ct, tmp_path / "vr" / "1.dcm", study_uid=None, refs=True, kind="VR")
    record = check_manifest(catalog, study, _store(ingest, [*ct, vr]))
    [derived] = record["derived_series"]
    assert derived["source_held"] and derived["image_type"] == ["DERIVED", "SECONDARY", "VR"]
    assert "3 of the 3 source images" in derived["reason"]
    assert record["derived_without_source"] == []
    assert record["state"] == "complete"


def test_a_reconstruction_without_its_scan_is_flagged(
    archive: tuple[Catalog, Ingest], tmp_path: Path
) -> None:
    """The workstation sent its rib VR; the chest CT it was made from never came."""
    catalog, ingest = archive
    ct = ct_series(tmp_path / "ct", slices=2)
    vr = _reconstruction(ct, tmp_path / "vr" / "1.dcm", study_uid=None, refs=True, kind="VR")
    study = str(dcmread(vr, stop_before_pixels=True).StudyInstanceUID)
    series_uid = str(dcmread(vr, stop_before_pixels=True).SeriesInstanceUID)
    record = check_manifest(catalog, study, _store(ingest, [vr]))
    assert record["derived_without_source"] == [series_uid]
    assert "none of the 2 source images" in record["derived_series"][0]["reason"]
    # readable later, and cleared once the scan arrives
    again = monitoring_record(catalog, study)
    assert again is not None and again["derived_without_source"] == [series_uid]
    _store(ingest, ct)
    assert [d.source_held for d in derived_series(catalog, study)] == [True]


def test_an_mpr_without_references_needs_an_original_of_its_frame_of_reference(
    archive: tuple[Catalog, Ingest], tmp_path: Path
) -> None:
    catalog, ingest = archive
    ct = ct_series(tmp_path / "ct", slices=2, seed=3)
    mpr = _reconstruction(ct, tmp_path / "mpr" / "1.dcm", study_uid=None, refs=False, kind="MPR")
    study = str(dcmread(mpr, stop_before_pixels=True).StudyInstanceUID)
    _store(ingest, [mpr])
    [alone] = derived_series(catalog, study)
    assert not alone.source_held and "frame of reference" in alone.reason
    _store(ingest, ct)
    [paired] = derived_series(catalog, study)
    assert paired.source_held
