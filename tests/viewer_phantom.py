"""Synthetic phantoms for the viewer tests (issue 7): known geometry, so measurements made through
the UI can be checked against truth.

The CT phantom (every slice alike, 256 x 256, PixelSpacing 0.5 mm, RescaleIntercept -1024):

- air (-1000 HU) outside a water disc (0 HU) of radius 120 px centred at (128, 128);
- two 3 x 3 px markers (1000 HU) centred at column 28 and column 228 of row 128: 200 px =
  **100.0 mm** apart;
- a 40 HU insert: a disc of radius 25 px centred at row 180, column 128;
- an asymmetric marker (2000 HU): the square rows 40-59, columns 60-79, in the **top-left**
  quadrant, so rotations and mirrors move it to a known quadrant.

The volume phantom (for MPR/MIP): 64 x 64 x 48 slices of 1 mm cubes, water, with one bright
sphere (1000 HU, radius 5) centred at column 32, row 16, slice 12: on the central sagittal plane
(anterior and inferior there), but on neither the central axial nor the central coronal plane —
so MPR shows it only in the sagittal view, and a thick-slab MIP brings it into the axial view.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    PositronEmissionTomographyImageStorage,
    generate_uid,
)

SPACING = 0.5  # mm per pixel
MARKERS = ((128, 28), (128, 228))  # (row, column) centres, 100.0 mm apart
INSERT = (180, 128, 25)  # row, column, radius (px) of the 40 HU disc
INSERT_HU = 40
SQUARE = (40, 60, 20)  # top row, left column, size of the asymmetric marker
PATIENT = {"PatientName": "VIEWER^PHANTOM", "PatientID": "PH001", "PatientSex": "O", "PatientAge": "040Y"}
SPHERE = (12, 16, 32, 5)  # slice, row, column, radius (voxels) in the volume phantom


def ct_phantom() -> np.ndarray:
    """HU values of one slice of the CT phantom."""
    rr, cc = np.mgrid[0:256, 0:256]
    hu = np.full((256, 256), -1000, np.int32)
    hu[(rr - 128) ** 2 + (cc - 128) ** 2 <= 120**2] = 0
    r, c, rad = INSERT
    hu[(rr - r) ** 2 + (cc - c) ** 2 <= rad**2] = INSERT_HU
    for r, c in MARKERS:
        hu[r - 1 : r + 2, c - 1 : c + 2] = 1000
    top, left, size = SQUARE
    hu[top : top + size, left : left + size] = 2000
    return hu


def volume_phantom() -> np.ndarray:
    """HU values (slice, row, column) of the MPR/MIP phantom."""
    zz, rr, cc = np.mgrid[0:48, 0:64, 0:64]
    hu = np.zeros((48, 64, 64), np.int32)
    z, r, c, rad = SPHERE
    hu[(zz - z) ** 2 + (rr - r) ** 2 + (cc - c) ** 2 <= rad**2] = 1000
    return hu


def _dataset(
    study: str,
    series: str,
    number: int,
    hu: np.ndarray,
    z: float,
    spacing: float,
    thickness: float,
    **extra: str,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.1" + series[-20:].replace(".", "")[:20]
    for k, v in {**PATIENT, **extra}.items():
        setattr(ds, k, v)
    ds.Modality = "CT"
    ds.InstitutionName = extra.get("InstitutionName", "TEST_HOSPITAL")
    ds.StudyDate, ds.StudyTime = extra.get("StudyDate", "20260101"), "093000"
    ds.StudyID, ds.AccessionNumber = "1", "A1"
    ds.SeriesNumber, ds.InstanceNumber = 1, number
    ds.SeriesDescription = "phantom"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    rows, cols = hu.shape
    ds.ImagePositionPatient = [-cols * spacing / 2, -rows * spacing / 2, z]
    ds.SliceLocation = z
    ds.SliceThickness = thickness
    ds.PixelSpacing = [spacing, spacing]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = (hu + 1024).astype("<u2").tobytes()
    return ds


def write_ct_phantom(
    out: Path, *, slices: int = 6, study: str | None = None, **extra: str
) -> tuple[str, list[Path]]:
    """Write the CT phantom series; return (study UID, files)."""
    out.mkdir(parents=True, exist_ok=True)
    study = study or generate_uid()
    series = generate_uid()
    hu = ct_phantom()
    paths = []
    for i in range(slices):
        ds = _dataset(study, series, i + 1, hu, -2.0 * i, SPACING, 2.0, **extra)
        path = out / f"ct{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study, paths


def write_volume_phantom(out: Path, study: str, frame_of_reference: str | None = None) -> list[Path]:
    """Write the volume phantom as a second series of ``study``."""
    out.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    vol = volume_phantom()
    paths = []
    for k in range(vol.shape[0]):
        # ascending z = slice index, so the sphere's slice is known in patient space too
        ds = _dataset(study, series, k + 1, vol[k], float(k), 1.0, 1.0)
        ds.SeriesNumber, ds.SeriesDescription = 2, "volume phantom"
        if frame_of_reference:
            ds.FrameOfReferenceUID = frame_of_reference
        path = out / f"vol{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


PET_HOT = (24, 32, 48, 6)  # slice, row, column, radius of the PET hot sphere (volume grid)
PET_HOT_BQML = 5000  # activity concentration in the hot sphere (Bq/ml; 100 elsewhere)
# the SUV header (R-VW-1): 370 MBq of F-18 injected at 09:00, the series starts at 10:00, 75 kg
PET_DOSE_BQ = 370e6
PET_HALF_LIFE_S = 6586.2
PET_DELAY_S = 3600.0
PET_WEIGHT_KG = 75.0


def suv_bw(bqml: float, weight_kg: float = PET_WEIGHT_KG) -> float:
    """Body-weight SUV of ``bqml`` under the phantom's header (the viewer's formula, by hand)."""
    decayed: float = PET_DOSE_BQ * 0.5 ** (PET_DELAY_S / PET_HALF_LIFE_S)
    return bqml * weight_kg * 1000 / decayed


def write_pet_phantom(
    out: Path, study: str, frame_of_reference: str, weight: float | None = PET_WEIGHT_KG
) -> list[Path]:
    """A PET series on the volume phantom's grid and frame of reference: 100 Bq/ml everywhere, a
    hot sphere (:data:`PET_HOT_BQML`) at :data:`PET_HOT` — on the central axial plane, on the
    patient's left — with the header SUVbw needs (Units BQML, DecayCorrection START, the
    radiopharmaceutical's dose, half-life and start, the series time and, unless ``weight`` is
    None, PatientWeight)."""
    out.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    zz, rr, cc = np.mgrid[0:48, 0:64, 0:64]
    z, r, c, rad = PET_HOT
    counts = np.full((48, 64, 64), 100, np.int32)
    counts[(zz - z) ** 2 + (rr - r) ** 2 + (cc - c) ** 2 <= rad**2] = PET_HOT_BQML
    paths = []
    for k in range(48):
        ds = _dataset(study, series, k + 1, counts[k] - 1024, float(k), 1.0, 1.0)  # stored = counts
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = PositronEmissionTomographyImageStorage
        ds.Modality, ds.SeriesNumber, ds.SeriesDescription = "PT", 3, "PET phantom"
        ds.FrameOfReferenceUID = frame_of_reference
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        del ds.RescaleType
        ds.Units, ds.DecayCorrection = "BQML", "START"
        ds.SeriesDate = ds.AcquisitionDate = "20260101"
        ds.SeriesTime = ds.AcquisitionTime = "100000"
        drug = Dataset()
        drug.Radiopharmaceutical = "Fluorodeoxyglucose"
        drug.RadionuclideTotalDose = f"{PET_DOSE_BQ:.0f}"
        drug.RadionuclideHalfLife = f"{PET_HALF_LIFE_S}"
        drug.RadiopharmaceuticalStartTime = "090000"
        drug.RadiopharmaceuticalStartDateTime = "20260101090000"
        ds.RadiopharmaceuticalInformationSequence = [drug]
        if weight is not None:
            ds.PatientWeight = f"{weight}"
        ds.WindowCenter, ds.WindowWidth = 2500, 5000
        path = out / f"pet{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
