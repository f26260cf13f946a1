"""Tests for the synthetic DICOM generator in :mod:`gateway.sample`."""

from __future__ import annotations

import warnings
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import FileDataset
from pydicom.pixels import apply_rescale
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
    UltrasoundImageStorage,
    XRayAngiographicImageStorage,
)

from gateway.sample import Patient, ct_series, write_samples

CT_SLICES = 12
EXPECTED_COUNTS = {
    "01_CT_chest": CT_SLICES,
    "02_MR_brain": 20,
    "03_DX_chest": 1,
    "04_XA_coronary": 1,
    "05_US_carotid": 1,
}
SOP_CLASSES = {
    "01_CT_chest": CTImageStorage,
    "02_MR_brain": MRImageStorage,
    "03_DX_chest": DigitalXRayImageStorageForPresentation,
    "04_XA_coronary": XRayAngiographicImageStorage,
    "05_US_carotid": UltrasoundImageStorage,
}
REQUIRED = (
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "StudyDate", "StudyTime",
    "AccessionNumber", "StudyID", "ReferringPhysicianName", "InstitutionName", "Modality",
    "BodyPartExamined", "SeriesNumber", "SeriesDescription", "PatientID", "PatientName",
    "PatientBirthDate", "PatientSex", "InstanceNumber", "SpecificCharacterSet",
)  # fmt: skip
# (row, column) ROIs that the chest phantom keeps inside each tissue on every slice
LUNG, BODY, BONE = (245, 150), (245, 268), (375, 256)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """The demo set, grouped by study folder, each list sorted by file name."""
    root = tmp_path_factory.mktemp("samples")
    by_study: dict[str, list[Path]] = {}
    for path in write_samples(root, ct_slices=CT_SLICES, seed=7):
        assert path.parent.parent == root
        by_study.setdefault(path.parent.name, []).append(path)
    return {name: sorted(paths) for name, paths in by_study.items()}


def _one(demo: dict[str, list[Path]], study: str) -> FileDataset:
    return dcmread(demo[study][0])


def _roi(image: np.ndarray, centre: tuple[int, int], half: int = 5) -> float:
    row, col = centre
    return float(np.median(image[row - half : row + half + 1, col - half : col + half + 1]))


def test_every_file_reads_back_as_part10(demo: dict[str, list[Path]]) -> None:
    for study, paths in demo.items():
        for path in paths:
            assert path.read_bytes()[128:132] == b"DICM"
            ds = dcmread(path)  # no force=True: needs preamble + file meta
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == SOP_CLASSES[study]
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            for keyword in REQUIRED:
                assert keyword in ds, f"{path.name} lacks {keyword}"
            assert ds.pixel_array.size > 0


def test_counts_and_uids_per_study(demo: dict[str, list[Path]]) -> None:
    assert {name: len(paths) for name, paths in demo.items()} == EXPECTED_COUNTS
    study_uids, sop_uids = set(), []
    for paths in demo.values():
        headers = [dcmread(p, stop_before_pixels=True) for p in paths]
        assert len({ds.StudyInstanceUID for ds in headers}) == 1
        assert len({ds.SeriesInstanceUID for ds in headers}) == 1
        study_uids.add(headers[0].StudyInstanceUID)
        sop_uids += [ds.SOPInstanceUID for ds in headers]
    assert len(study_uids) == len(EXPECTED_COUNTS)
    assert len(set(sop_uids)) == len(sop_uids)


def test_study_dates_are_recent(demo: dict[str, list[Path]]) -> None:
    for paths in demo.values():
        ds = dcmread(paths[0], stop_before_pixels=True)
        study_date = date(int(ds.StudyDate[:4]), int(ds.StudyDate[4:6]), int(ds.StudyDate[6:]))
        assert date(2021, 1, 1) <= study_date <= date.today()
        assert len(ds.StudyTime) == 6 and ds.AccessionNumber and ds.StudyID


def test_ct_pixels_decode_to_expected_hu(demo: dict[str, list[Path]]) -> None:
    for path in demo["01_CT_chest"]:
        ds = dcmread(path)
        assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.PixelRepresentation) == (512, 512, 16, 1)
        pixels = ds.pixel_array
        assert pixels.shape == (512, 512) and pixels.dtype == np.int16
        hu = apply_rescale(pixels, ds)
        assert -850 <= _roi(hu, LUNG) <= -750, path.name
        assert 20 <= _roi(hu, BODY) <= 60, path.name
        assert 650 <= _roi(hu, BONE) <= 750, path.name
        assert hu[5, 5] < -950  # air outside the body


def test_ct_geometry_is_consistent(demo: dict[str, list[Path]]) -> None:
    headers = [dcmread(p, stop_before_pixels=True) for p in demo["01_CT_chest"]]
    headers.sort(key=lambda ds: int(ds.InstanceNumber))
    assert [int(ds.InstanceNumber) for ds in headers] == list(range(1, CT_SLICES + 1))
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in headers])
    assert np.allclose(z, [float(ds.SliceLocation) for ds in headers])
    steps = np.diff(z)
    assert np.allclose(steps, steps[0]) and steps[0] < 0
    assert np.isclose(-steps[0], float(headers[0].SliceThickness))
    for ds in headers:
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert float(ds.RescaleSlope) == 1 and float(ds.RescaleIntercept) == -1024
        assert ds.RescaleType == "HU" and "WindowCenter" in ds and "WindowWidth" in ds
    assert len({ds.FrameOfReferenceUID for ds in headers}) == 1


def test_gb18030_names_round_trip(demo: dict[str, list[Path]]) -> None:
    ct = dcmread(demo["01_CT_chest"][0], stop_before_pixels=True)
    assert ct.SpecificCharacterSet == "GB18030"
    assert ct.PatientName.alphabetic == "Zhang^San"
    assert ct.PatientName.ideographic == "张^三"
    assert str(ct.PatientName) == "Zhang^San=张^三"
    assert ct.InstitutionName == "北京协和医院"
    assert ct.ReferringPhysicianName.ideographic == "刘^伟"
    dx = _one(demo, "03_DX_chest")
    assert dx.SpecificCharacterSet == "GB18030"
    assert dx.PatientName.ideographic == "王^五"


def test_gb18030_file_holds_gb18030_bytes(demo: dict[str, list[Path]]) -> None:
    raw = demo["01_CT_chest"][0].read_bytes()
    assert "张".encode("gb18030") == b"\xd5\xc5"
    assert b"Zhang^San=" + "张^三".encode("gb18030") in raw
    assert "北京协和医院".encode("gb18030") in raw
    assert "张".encode() not in raw  # not UTF-8


def test_utf8_names_round_trip(demo: dict[str, list[Path]]) -> None:
    mr = dcmread(demo["02_MR_brain"][0], stop_before_pixels=True)
    assert mr.SpecificCharacterSet == "ISO_IR 192"
    assert str(mr.PatientName) == "Li^Si=李^四"
    assert mr.PatientName.ideographic == "李^四"
    assert "李^四".encode() in demo["02_MR_brain"][0].read_bytes()


def test_mr_series(demo: dict[str, list[Path]]) -> None:
    for path in demo["02_MR_brain"]:
        ds = dcmread(path)
        assert ds.pixel_array.shape == (256, 256) and ds.pixel_array.dtype == np.uint16
        assert ds.Modality == "MR" and ds.BodyPartExamined == "BRAIN"


def test_dx_is_12_bit_2500_by_2048(demo: dict[str, list[Path]]) -> None:
    ds = _one(demo, "03_DX_chest")
    assert (ds.Rows, ds.Columns) == (2500, 2048)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
    assert ds.PhotometricInterpretation in ("MONOCHROME1", "MONOCHROME2")
    assert ds.PresentationIntentType == "FOR PRESENTATION"
    pixels = ds.pixel_array
    assert pixels.shape == (2500, 2048) and int(pixels.max()) <= 4095
    assert int(pixels.min()) < 1000 < 3000 < int(pixels.max())  # real contrast, not a flat image


def test_multiframe_has_ten_frames(demo: dict[str, list[Path]]) -> None:
    ds = _one(demo, "04_XA_coronary")
    assert int(ds.NumberOfFrames) == 10
    assert ds.FrameIncrementPointer == 0x00181063
    frames = ds.pixel_array
    assert frames.shape == (10, 256, 256) and frames.dtype == np.uint8
    assert frames[6].mean() < frames[0].mean()  # contrast has filled the vessels


def test_rgb_ultrasound(demo: dict[str, list[Path]]) -> None:
    ds = _one(demo, "05_US_carotid")
    assert (ds.SamplesPerPixel, ds.PlanarConfiguration, ds.PhotometricInterpretation) == (3, 0, "RGB")
    rgb = ds.pixel_array
    assert rgb.shape == (int(ds.Rows), int(ds.Columns), 3) and rgb.dtype == np.uint8
    red = (rgb[..., 0].astype(int) - rgb[..., 2]) > 100
    assert red.any()  # colour-flow pixels exist


def test_ct_series_slices_are_526_kb(tmp_path: Path) -> None:
    paths = ct_series(tmp_path, slices=3)
    assert len(paths) == 3
    for path in paths:
        assert 520_000 <= path.stat().st_size <= 540_000


def test_generation_is_deterministic(tmp_path: Path) -> None:
    first = ct_series(tmp_path / "a", slices=2, seed=3)
    second = ct_series(tmp_path / "b", slices=2, seed=3)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    other = ct_series(tmp_path / "c", slices=2, seed=3, study_uid="1.2.826.0.1.3680043.8.498.42")
    uids = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in [*first, *other]}
    assert len(uids) == 4
    assert dcmread(other[0], stop_before_pixels=True).StudyInstanceUID == "1.2.826.0.1.3680043.8.498.42"


def test_unrepresentable_text_is_rejected(tmp_path: Path) -> None:
    latin1 = Patient("X1", "Zhang^San=张^三", date(1970, 1, 1), "M", "ISO_IR 100")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="read back as"):
            ct_series(tmp_path, slices=1, patient=latin1)
