"""Realistic synthetic DICOM studies for demos, tests and benchmarks.

Everything is generated locally with :mod:`pydicom` and :mod:`numpy` (vectorised phantoms,
no downloads).  The output is deterministic for a given ``seed``: UIDs, dates, accession
numbers and pixel noise are all derived from it.

The demo set written by :func:`write_samples` (one sub-folder per study):

1. ``01_CT_chest`` - CT chest, 512x512 int16 slices, patient 张三 (``GB18030``).
2. ``02_MR_brain`` - MR brain, 20 slices of 256x256 uint16, patient 李四 (``ISO_IR 192``).
3. ``03_DX_chest`` - DX chest PA, 2500x2048, 12 bits stored, patient 王五 (``GB18030``).
4. ``04_XA_coronary`` - XA coronary cine, 10 frames of 256x256 uint8, patient 赵六.
5. ``05_US_carotid`` - RGB colour-Doppler ultrasound (SamplesPerPixel 3), patient 孙七.

All files are Part-10 files with a full file meta header, Explicit VR Little Endian.  The
Chinese text (person names, institution, study description) is checked to round-trip
through pydicom after the first file of every series is written.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Final, TypeVar

import numpy as np
import numpy.typing as npt
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
    UltrasoundImageStorage,
    XRayAngiographicImageStorage,
    generate_uid,
)

__all__ = [
    "LI_SI",
    "SUN_QI",
    "WANG_WU",
    "ZHANG_SAN",
    "ZHAO_LIU",
    "Patient",
    "SampleSpec",
    "Study",
    "ct_series",
    "verify_text_roundtrip",
    "write_samples",
]

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]
Uint16Array = npt.NDArray[np.uint16]
_IntT = TypeVar("_IntT", bound=np.integer[Any])

#: pydicom's registered root; with ``entropy_srcs`` the UIDs are deterministic hashes.
UID_PREFIX: Final = "1.2.826.0.1.3680043.8.498."
#: Study dates are drawn from the three years before this (fixed, for determinism).
_DATE_ANCHOR: Final = date(2025, 6, 30)
#: Text elements whose Unicode value must survive a write/read cycle.
_TEXT_KEYWORDS: Final = (
    "PatientName",
    "ReferringPhysicianName",
    "InstitutionName",
    "StudyDescription",
    "SeriesDescription",
)


# --------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class Patient:
    """A synthetic patient; ``name`` is a DICOM PN string (``alphabetic=ideographic``)."""

    patient_id: str
    name: str
    birth_date: date
    sex: str
    charset: str = "GB18030"


@dataclass(frozen=True)
class Study:
    """Study-level attributes shared by every instance of one study."""

    uid: str
    study_date: date
    study_time: str
    accession: str
    study_id: str
    description: str
    institution: str
    referring_physician: str


@dataclass(frozen=True)
class SampleSpec:
    """Series-level header of one synthetic series (modality, SOP class, equipment)."""

    modality: str
    sop_class_uid: str
    body_part: str
    series_number: int
    series_description: str
    manufacturer: str
    model: str


ZHANG_SAN: Final = Patient("YB1100000001", "Zhang^San=张^三", date(1968, 3, 15), "M", "GB18030")
LI_SI: Final = Patient("YB3100000002", "Li^Si=李^四", date(1975, 11, 2), "F", "ISO_IR 192")
WANG_WU: Final = Patient("YB4400000003", "Wang^Wu=王^五", date(1959, 7, 21), "M", "GB18030")
ZHAO_LIU: Final = Patient("YB5100000004", "Zhao^Liu=赵^六", date(1962, 1, 9), "M", "GB18030")
SUN_QI: Final = Patient("YB3300000005", "Sun^Qi=孙^七", date(1988, 5, 30), "F", "ISO_IR 192")

_CT_SPEC: Final = SampleSpec("CT", CTImageStorage, "CHEST", 2, "胸部平扫 Chest 1.0 B30f", "UIH", "uCT 760")
_MR_SPEC: Final = SampleSpec("MR", MRImageStorage, "BRAIN", 3, "t1_se_tra 横断位T1", "SIEMENS", "Skyra")
_DX_SPEC: Final = SampleSpec(
    "DX", DigitalXRayImageStorageForPresentation, "CHEST", 1, "胸部正位 PA", "Carestream", "DRX-Evolution"
)
_XA_SPEC: Final = SampleSpec(
    "XA", XRayAngiographicImageStorage, "HEART", 1, "LCA RAO30 CAU20", "Philips", "FD20"
)
_US_SPEC: Final = SampleSpec("US", UltrasoundImageStorage, "NECK", 1, "右颈动脉 CDFI", "Mindray", "Resona 7")


def _key(*parts: object) -> int:
    """A stable (unsalted) integer for seeding numpy generators from strings."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def _rng(seed: int, *parts: object) -> np.random.Generator:
    return np.random.default_rng([seed, _key(*parts)])


def _uid(*parts: object) -> str:
    """A deterministic UID under :data:`UID_PREFIX` derived from ``parts``."""
    return str(generate_uid(UID_PREFIX, entropy_srcs=[str(p) for p in parts]))


def _make_study(
    patient: Patient,
    seed: int,
    key: str,
    description: str,
    institution: str,
    referring_physician: str,
    study_uid: str | None = None,
) -> Study:
    """Draw date, time, accession and study ID for one study from ``(seed, key)``."""
    rng = _rng(seed, "study", key, patient.patient_id)
    study_date = _DATE_ANCHOR - timedelta(days=int(rng.integers(0, 3 * 365)))
    hour, minute, second = int(rng.integers(8, 18)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
    return Study(
        uid=study_uid or _uid(seed, key, patient.patient_id, "study"),
        study_date=study_date,
        study_time=f"{hour:02d}{minute:02d}{second:02d}",
        accession=f"A{study_date:%Y%m%d}{int(rng.integers(0, 100_000)):05d}",
        study_id=str(int(rng.integers(1000, 100_000))),
        description=description,
        institution=institution,
        referring_physician=referring_physician,
    )


def _age(birth: date, on: date) -> str:
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    return f"{years:03d}Y"


def _file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "YBYX_SAMPLE_1"
    return meta


def _base_dataset(patient: Patient, study: Study, spec: SampleSpec, instance: int) -> Dataset:
    """Patient, study, series, equipment and SOP-common attributes of one instance."""
    series_uid = _uid(study.uid, "series", spec.series_number)
    sop_uid = _uid(series_uid, "instance", instance)
    study_date = f"{study.study_date:%Y%m%d}"

    ds = Dataset()
    ds.file_meta = _file_meta(spec.sop_class_uid, sop_uid)
    ds.SpecificCharacterSet = patient.charset
    ds.SOPClassUID = spec.sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.InstanceCreationTime = ds.StudyTime = ds.SeriesTime = ds.ContentTime = study.study_time
    ds.AccessionNumber = study.accession
    ds.Modality = spec.modality
    ds.Manufacturer = spec.manufacturer
    ds.ManufacturerModelName = spec.model
    ds.InstitutionName = study.institution
    ds.StationName = f"{spec.modality}01"
    ds.ReferringPhysicianName = study.referring_physician
    ds.StudyDescription = study.description
    ds.SeriesDescription = spec.series_description
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = f"{patient.birth_date:%Y%m%d}"
    ds.PatientSex = patient.sex
    ds.PatientAge = _age(patient.birth_date, study.study_date)
    ds.BodyPartExamined = spec.body_part
    ds.StudyInstanceUID = study.uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = spec.series_number
    ds.InstanceNumber = instance
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    return ds


def _set_axial_geometry(
    ds: Dataset, *, z: float, pixel_mm: float, columns: int, thickness: float, frame_uid: str
) -> None:
    """Head-first-supine axial plane geometry centred on the isocentre."""
    corner = round(-pixel_mm * columns / 2 + pixel_mm / 2, 6)
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [corner, corner, z]
    ds.SliceLocation = z
    ds.SliceThickness = thickness
    ds.PixelSpacing = [pixel_mm, pixel_mm]


# --------------------------------------------------------------------------- writing


def verify_text_roundtrip(path: Path, expected: Dataset) -> None:
    """Re-read ``path`` and check that its Unicode text equals ``expected``'s.

    Raises ``ValueError`` naming the first element whose decoded value differs, e.g. when the
    character set cannot represent the text (pydicom would silently substitute ``?``).
    """
    back = dcmread(path, stop_before_pixels=True)
    for keyword in _TEXT_KEYWORDS:
        want, got = str(expected.get(keyword, "")), str(back.get(keyword, ""))
        if want != got:
            charset = expected.get("SpecificCharacterSet")
            raise ValueError(f"{path}: {keyword} {want!r} read back as {got!r} ({charset})")


def _write_series(folder: Path, datasets: Iterable[Dataset]) -> list[Path]:
    """Write each dataset as a Part-10 file into ``folder``; verify text on the first."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for ds in datasets:
        path = folder / f"{ds.Modality}_{int(ds.SeriesNumber):03d}_{int(ds.InstanceNumber):04d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        if not paths:
            verify_text_roundtrip(path, ds)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- phantoms


def _quantise(values: npt.NDArray[Any], maximum: int, dtype: type[_IntT]) -> npt.NDArray[_IntT]:
    """Round and clip ``values`` to ``[0, maximum]`` and cast to the integer ``dtype``."""
    out: npt.NDArray[_IntT] = np.clip(np.rint(values), 0, maximum).astype(dtype)
    return out


def _grid(rows: int, columns: int) -> tuple[FloatArray, FloatArray]:
    """Broadcastable row (``y``, shape (rows, 1)) and column (``x``, (1, columns)) indices."""
    y = np.arange(rows, dtype=np.float32)[:, None]
    x = np.arange(columns, dtype=np.float32)[None, :]
    return y, x


def _radius(y: FloatArray, x: FloatArray, cy: float, cx: float, ry: float, rx: float) -> FloatArray:
    """Normalised elliptical radius: < 1 inside the ellipse, 1 on its border."""
    r: FloatArray = np.sqrt(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)
    return r


def _ellipse(y: FloatArray, x: FloatArray, cy: float, cx: float, ry: float, rx: float) -> BoolArray:
    """Mask of the pixels inside the axis-aligned ellipse centred on (``cy``, ``cx``)."""
    inside: BoolArray = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
    return inside


def _dome(r: FloatArray) -> FloatArray:
    """Path length through an ellipsoid at normalised radius ``r`` (0 outside)."""
    d: FloatArray = np.sqrt(np.clip(1.0 - r * r, 0.0, None))
    return d


class _ChestPhantom:
    """Axial chest CT phantom in HU; static anatomy is precomputed, lungs/ribs vary with z.

    Regions (row, column) usable as ROIs on every slice: right lung centre (245, 150) at
    about -800 HU, mediastinum (245, 268) at about 40 HU, vertebral body (375, 256) at 700 HU.
    """

    SIZE: Final = 512
    NOISE_HU: Final = 12.0

    def __init__(self) -> None:
        y, x = _grid(self.SIZE, self.SIZE)
        self._y, self._x = y, x
        body = _ellipse(y, x, 256, 256, 170, 230)
        inner = _ellipse(y, x, 256, 256, 155, 215)
        table = (y >= 440) & (y < 448) & (np.abs(x - 256) < 180)
        spine = _ellipse(y, x, 375, 256, 30, 30) | _ellipse(y, x, 420, 256, 25, 9)
        sternum = _ellipse(y, x, 112, 256, 10, 22)
        mediastinum = _ellipse(y, x, 245, 268, 70, 62)
        base = np.full((self.SIZE, self.SIZE), -1000.0, dtype=np.float32)
        base[body] = -90.0  # subcutaneous fat
        base[inner] = 40.0  # muscle / mediastinal soft tissue
        base[table] = 100.0
        base[spine | sternum] = 700.0
        self._base = base
        self._blocked = spine | sternum | mediastinum | ~inner
        # gravity-dependent lung density: posterior (larger row) lung is denser
        self._lung_hu = (-800.0 + 30.0 * (y - 245.0) / 115.0) * np.ones_like(x)
        r = _radius(y, x, 256, 256, 155, 215)
        band = (r > 0.86) & (r < 0.94) & ~(spine | sternum)
        self._rib_index = np.flatnonzero(band)
        self._rib_theta = np.arctan2(y - 256, x - 256)[band]

    def slice_hu(self, t: float, rng: np.random.Generator) -> FloatArray:
        """HU image at normalised cranio-caudal position ``t`` in [0, 1] (0 = apex)."""
        y, x = self._y, self._x
        s = 0.45 + 0.55 * float(np.sin(np.pi * (0.1 + 0.85 * t)))  # lungs grow then shrink
        lungs = _ellipse(y, x, 245, 150, 115 * s, 78 * s) | _ellipse(y, x, 245, 362, 115 * s, 72 * s)
        hu: FloatArray = np.where(lungs & ~self._blocked, self._lung_hu, self._base)
        ribs = np.cos(11.0 * self._rib_theta + 9.0 * t) > 0.55
        hu.flat[self._rib_index[ribs]] = 700.0
        hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(self.NOISE_HU)
        return hu


def _brain_slice(t: float, rng: np.random.Generator, size: int = 256) -> Uint16Array:
    """T1-weighted axial brain phantom (scalp fat, skull, grey/white matter, ventricles)."""
    y, x = _grid(size, size)
    c = size / 2
    s = float(np.sqrt(max(1.0 - ((t - 0.4) / 0.7) ** 2, 0.08)))  # head cross-section scale
    r_brain = _radius(y, x, c, c, 90 * s, 72 * s)
    theta = np.arctan2(y - c, x - c)
    signal = np.zeros((size, size), dtype=np.float32)
    signal[_ellipse(y, x, c, c, 104 * s, 86 * s)] = 1300.0  # scalp fat
    signal[_ellipse(y, x, c, c, 97 * s, 79 * s)] = 60.0  # skull
    signal[r_brain <= 1.0] = 620.0  # grey matter
    signal[r_brain < 0.72 + 0.07 * np.cos(9.0 * theta + 5.0 * t)] = 880.0  # white matter, gyral edge
    v = max(0.0, 1.0 - ((t - 0.55) / 0.22) ** 2)  # lateral ventricles, mid slices only
    if v > 0:
        for side in (-13, 13):
            signal[_ellipse(y, x, c - 8, c + side, 28 * v, 7 * v)] = 180.0
    signal *= 1.0 + 0.08 * (x - c) / c  # receive-coil bias field
    real = signal + rng.standard_normal(signal.shape, dtype=np.float32) * 15.0
    imag = rng.standard_normal(signal.shape, dtype=np.float32) * 15.0
    magnitude = np.hypot(real, imag)  # Rician noise, as in a magnitude image
    return _quantise(magnitude, 4095, np.uint16)


def _chest_radiograph(rng: np.random.Generator, rows: int = 2500, columns: int = 2048) -> Uint16Array:
    """PA chest radiograph, MONOCHROME2 (bright = attenuating), 12-bit values."""
    y, x = _grid(rows, columns)
    cx = columns / 2
    trunk = _dome(_radius(y, x, 1650, cx, 1600, 860))
    lungs = _dome(_radius(y, x, 1200, cx - 430, 780, 330)) + _dome(_radius(y, x, 1200, cx + 420, 780, 320))
    heart = _dome(_radius(y, x, 1650, cx + 110, 380, 420))
    spine = _dome(np.abs(x - cx) / 90.0) * np.ones_like(y)
    rib_phase = (y + 0.00035 * (x - cx) ** 2) / 150.0
    ribs = (np.cos(2 * np.pi * rib_phase) > 0.45) & (lungs > 0)
    clavicles = (np.abs(y - (380 + 0.00025 * (x - cx) ** 2)) < 30) & (np.abs(np.abs(x - cx) - 340) < 260)
    img = 150.0 + 2300.0 * trunk - 1300.0 * lungs + 900.0 * heart + 700.0 * spine
    img += 350.0 * ribs + 450.0 * clavicles
    border = 40
    img[:border, :] = img[-border:, :] = 3800.0  # collimated (unexposed) edges
    img[:, :border] = img[:, -border:] = 3800.0
    img += rng.standard_normal(img.shape, dtype=np.float32) * 25.0
    return _quantise(img, 4095, np.uint16)


def _angiogram(rng: np.random.Generator, frames: int = 10, size: int = 256) -> npt.NDArray[np.uint8]:
    """Coronary cine: contrast fills three tapering vessels, then washes out."""
    y, x = _grid(size, size)
    background = 175.0 - 35.0 * np.exp(-(((x - 190.0) / 35.0) ** 2)) - 0.08 * y  # spine shadow, gradient
    vessels = np.zeros((size, size), dtype=np.float32)
    for a, b, amp, period, width in ((40, 0.55, 18, 30, 6), (60, 0.95, 12, 22, 4.5), (30, 0.25, 10, 18, 3.5)):
        centre = a + b * x + amp * np.sin(x / period)
        w = width * (1.0 - 0.5 * x / size)
        vessels = np.maximum(vessels, _dome(np.abs(y - centre) / w))
    k = np.arange(frames, dtype=np.float32)[:, None, None]
    front = size * np.minimum(1.0, (k + 1) / 6)  # contrast front position per frame
    opacity = np.clip(1.0 - (k - 6) / 5, 0.2, 1.0)  # wash-out after frame 6
    cine = background - 95.0 * opacity * vessels * (x <= front)
    catheter = np.abs(y - (30 + 0.3 * x)) < 1.2
    cine = np.where(catheter & (x < 40), 40.0, cine)
    cine += rng.standard_normal(cine.shape, dtype=np.float32) * 4.0
    return _quantise(cine, 255, np.uint8)


def _doppler_frame(rng: np.random.Generator, rows: int = 480, columns: int = 640) -> npt.NDArray[np.uint8]:
    """Linear-probe carotid B-mode with a colour-flow box and colour bar, RGB uint8."""
    y, x = _grid(rows, columns)
    field = (y >= 40) & (y < 440) & (x >= 120) & (x < 520)
    r_lumen = np.abs(y - 250.0) / 45.0 * np.ones_like(x)
    echo = 0.45 + 0.08 * np.sin(y / 9.0) * np.exp(-(((y - 120) / 60) ** 2))  # muscle layers
    echo = echo * np.exp(-(y - 40) / 900.0)  # depth attenuation after TGC
    echo = np.where(y < 48, 0.95, echo)  # skin line
    echo = np.where(r_lumen < 1.0, 0.03, np.where(r_lumen < 1.12, 0.9, echo))  # lumen, intima-media
    grains = rng.rayleigh(1.0, (rows, columns + 3)).astype(np.float32)
    speckle = (grains[:, :-3] + grains[:, 1:-2] + grains[:, 2:-1] + grains[:, 3:]) / 4  # lateral blur
    gray = np.where(field, np.clip(255.0 * 0.55 * echo * speckle, 0, 255), 0.0)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    box = (y >= 150) & (y < 350) & (x >= 200) & (x < 440)
    flow = box & (r_lumen < 1.0)
    velocity = 1.0 - r_lumen**2  # laminar (parabolic) profile
    colour = np.stack([90 + 165 * velocity, 230 * np.clip(velocity - 0.75, 0, 1) * 4, 30 * velocity], axis=-1)
    rgb = np.where(flow[:, :, None], colour, rgb)
    outline = box & ~((y >= 152) & (y < 348) & (x >= 202) & (x < 438))
    rgb[outline] = (200, 200, 200)
    bar_y = np.arange(60, 260)
    level = 1.0 - 2.0 * (bar_y - 60) / 199.0  # +1 (red, toward probe) .. -1 (blue)
    bar = np.stack([255 * np.clip(level, 0, 1), 40 * np.abs(level), 255 * np.clip(-level, 0, 1)], axis=-1)
    rgb[60:260, 560:576] = bar[:, None, :]
    return _quantise(rgb, 255, np.uint8)


# --------------------------------------------------------------------------- series


def _ct_spacing(slices: int) -> float:
    """Slice spacing covering ~300 mm of chest, clamped to clinical 0.625-5 mm."""
    return round(min(5.0, max(0.625, 300.0 / slices)), 3)


def _ct_datasets(patient: Patient, study: Study, slices: int, seed: int) -> Iterator[Dataset]:
    phantom = _ChestPhantom()
    rng = _rng(seed, "ct-noise", study.uid)
    spacing = _ct_spacing(slices)
    frame_uid = _uid(study.uid, "frame-of-reference")
    for i in range(slices):
        ds = _base_dataset(patient, study, _CT_SPEC, i + 1)
        z = round(-spacing * i, 3)
        _set_axial_geometry(ds, z=z, pixel_mm=0.703125, columns=512, thickness=spacing, frame_uid=frame_uid)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ScanOptions = "HELICAL MODE"
        ds.KVP = 120
        ds.XRayTubeCurrent = 200
        ds.ExposureTime = 500
        ds.ConvolutionKernel = "B30f"
        ds.ReconstructionDiameter = 360
        ds.DataCollectionDiameter = 500
        ds.GantryDetectorTilt = 0
        ds.AcquisitionNumber = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = [-600, 40]
        ds.WindowWidth = [1500, 400]
        ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
        hu = phantom.slice_hu(i / max(slices - 1, 1), rng)
        stored = _quantise(hu + 1024, 4095, np.int16)  # stored = HU - RescaleIntercept
        ds.set_pixel_data(stored, "MONOCHROME2", 16, generate_instance_uid=False)
        yield ds


def _mr_datasets(patient: Patient, study: Study, seed: int, slices: int = 20) -> Iterator[Dataset]:
    rng = _rng(seed, "mr-noise", study.uid)
    frame_uid = _uid(study.uid, "frame-of-reference")
    for i in range(slices):
        ds = _base_dataset(patient, study, _MR_SPEC, i + 1)
        z = round(-57.0 + 6.0 * i, 1)
        _set_axial_geometry(ds, z=z, pixel_mm=0.9375, columns=256, thickness=5.0, frame_uid=frame_uid)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "SP"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SequenceName = "*se2d1"
        ds.RepetitionTime = 550
        ds.EchoTime = 11
        ds.EchoTrainLength = 1
        ds.FlipAngle = 90
        ds.NumberOfAverages = 1
        ds.ImagedNucleus = "1H"
        ds.ImagingFrequency = 123.25
        ds.MagneticFieldStrength = 3
        ds.SpacingBetweenSlices = 6
        ds.AcquisitionNumber = 1
        ds.WindowCenter = 600
        ds.WindowWidth = 1200
        ds.set_pixel_data(_brain_slice(i / (slices - 1), rng), "MONOCHROME2", 12, generate_instance_uid=False)
        yield ds


def _dx_dataset(patient: Patient, study: Study, seed: int) -> Dataset:
    ds = _base_dataset(patient, study, _DX_SPEC, 1)
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.ImageLaterality = "U"
    region = Dataset()
    region.CodeValue = "51185008"
    region.CodingSchemeDesignator = "SCT"
    region.CodeMeaning = "Chest"
    ds.AnatomicRegionSequence = [region]
    ds.KVP = 125
    ds.ExposureTime = 8
    ds.XRayTubeCurrent = 320
    ds.DistanceSourceToDetector = 1800
    ds.DetectorType = "SCINTILLATOR"
    ds.ImagerPixelSpacing = [0.175, 0.175]
    ds.PixelSpacing = [0.175, 0.175]
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = 2000
    ds.WindowWidth = 3500
    pixels = _chest_radiograph(_rng(seed, "dx", study.uid))
    ds.set_pixel_data(pixels, "MONOCHROME2", 12, generate_instance_uid=False)
    return ds


def _xa_dataset(patient: Patient, study: Study, seed: int) -> Dataset:
    ds = _base_dataset(patient, study, _XA_SPEC, 1)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE"]
    ds.PatientOrientation = ""
    ds.FrameIncrementPointer = 0x00181063  # -> (0018,1063) Frame Time
    ds.FrameTime = 66.7
    ds.CineRate = 15
    ds.RecommendedDisplayFrameRate = 15
    ds.PositionerMotion = "STATIC"
    ds.PositionerPrimaryAngle = -30  # RAO 30
    ds.PositionerSecondaryAngle = -20  # CAU 20
    ds.KVP = 80
    ds.XRayTubeCurrent = 600
    ds.ExposureTime = 8
    ds.RadiationSetting = "GR"
    ds.DistanceSourceToDetector = 1100
    ds.DistanceSourceToPatient = 750
    ds.IntensifierSize = 250
    ds.ImagerPixelSpacing = [0.96, 0.96]
    ds.PixelIntensityRelationship = "LOG"
    ds.set_pixel_data(_angiogram(_rng(seed, "xa", study.uid)), "MONOCHROME2", 8, generate_instance_uid=False)
    return ds


def _us_dataset(patient: Patient, study: Study, seed: int) -> Dataset:
    ds = _base_dataset(patient, study, _US_SPEC, 1)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VASCULAR"]
    ds.PatientOrientation = ""
    ds.Laterality = "R"
    ds.TransducerData = ["L14-5", "", ""]
    region = Dataset()
    region.RegionSpatialFormat = 1  # 2D tissue/flow
    region.RegionDataType = 2  # colour flow
    region.RegionFlags = 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 120, 40
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = 519, 439
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3  # cm
    region.PhysicalDeltaX = region.PhysicalDeltaY = 0.01
    ds.SequenceOfUltrasoundRegions = [region]
    ds.set_pixel_data(_doppler_frame(_rng(seed, "us", study.uid)), "RGB", 8, generate_instance_uid=False)
    return ds


# --------------------------------------------------------------------------- public API


def ct_series(
    out: Path,
    *,
    slices: int,
    patient: Patient | None = None,
    seed: int = 7,
    study_uid: str | None = None,
) -> list[Path]:
    """Write a chest CT series of ``slices`` 512x512 int16 slices into ``out``.

    Each file is ~526 KB (512*512*2 bytes of pixels plus header), Explicit VR Little Endian,
    with RescaleIntercept -1024 (stored = HU + 1024), lung and mediastinal windows, and
    consistent ImagePositionPatient / SliceLocation / InstanceNumber (instance 1 at the apex,
    z decreasing caudally).  UIDs derive from ``seed`` and ``study_uid``: pass a fresh
    ``study_uid`` to get a distinct study with otherwise identical content.
    """
    if slices < 1:
        raise ValueError(f"slices must be >= 1, not {slices}")
    patient = patient or ZHANG_SAN
    study = _make_study(patient, seed, "ct", "胸部CT平扫", "北京协和医院", "Liu^Wei=刘^伟", study_uid)
    return _write_series(Path(out), _ct_datasets(patient, study, slices, seed))


def write_samples(out: Path, *, ct_slices: int = 40, seed: int = 7) -> list[Path]:
    """Write the five-study demo set under ``out`` (one sub-folder per study); return file paths."""
    out = Path(out)
    paths = ct_series(out / "01_CT_chest", slices=ct_slices, patient=ZHANG_SAN, seed=seed)

    mr = _make_study(LI_SI, seed, "mr", "头颅MR平扫", "复旦大学附属华山医院", "Chen^Jing=陈^静")
    paths += _write_series(out / "02_MR_brain", _mr_datasets(LI_SI, mr, seed))

    dx = _make_study(WANG_WU, seed, "dx", "胸部正位DR", "中山大学附属第一医院", "Huang^Min=黄^敏")
    paths += _write_series(out / "03_DX_chest", [_dx_dataset(WANG_WU, dx, seed)])

    xa = _make_study(ZHAO_LIU, seed, "xa", "冠状动脉造影", "中国医学科学院阜外医院", "Zhou^Qiang=周^强")
    paths += _write_series(out / "04_XA_coronary", [_xa_dataset(ZHAO_LIU, xa, seed)])

    us = _make_study(
        SUN_QI, seed, "us", "颈部血管彩色多普勒超声", "浙江大学医学院附属第一医院", "Wu^Fang=吴^芳"
    )
    paths += _write_series(out / "05_US_carotid", [_us_dataset(SUN_QI, us, seed)])
    return paths


def _main(argv: list[str] | None = None) -> int:
    """``python -m gateway.sample OUT [--ct-slices N] [--seed S]``: write the demo set."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out", type=Path)
    parser.add_argument("--ct-slices", type=int, default=40)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    paths = write_samples(args.out, ct_slices=args.ct_slices, seed=args.seed)
    print(f"wrote {len(paths)} files under {args.out} in {time.perf_counter() - started:.2f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
