"""Header checks of image QC (R-QC-1): the attributes an image must carry to be usable.

Per instance, :func:`check_header` lists :class:`Problem` s, each an *error* (the image cannot be
used: a Type 1 attribute of its IOD missing or empty, a UID that is not a UID, pixel data whose
length does not match the Image Pixel module) or a *warning* (a Type 2 attribute absent, a date
that is not a date, non-ASCII text without Specific Character Set, body part or laterality
missing where the exam needs them). Instances without pixel data (SR, key objects, presentation
states) are checked for the patient, study, series and SOP attributes only. The attribute lists
are the parts of the IODs of PS3.3 that QC depends on, not a full IOD validation (``dciodvfy``
does that). Patient identity across a study is checked by :class:`gateway.qc.result.StudyQc`
from each result's ``identity`` hash.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import date

from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

# PS3.3 C.7.1.1, C.7.2.1, C.7.3.1, C.12.1 (patient, study, series, SOP common)
TYPE1_COMMON = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")
TYPE2_COMMON = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "SeriesNumber",
    "InstanceNumber",
)
# PS3.3 C.7.6.3 Image Pixel module
TYPE1_PIXEL = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PixelData",
)
# The modality-specific image modules (CT Image C.8.2.1, MR Image C.8.3.1, DX Image C.8.11.3,
# Image Plane C.7.6.2, CR Image C.8.1.2, X-Ray Acquisition C.8.7.2): (Type 1, Type 2)
BY_MODALITY: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "CT": (
        (
            "ImageType",
            "ImagePositionPatient",
            "ImageOrientationPatient",
            "PixelSpacing",
            "RescaleIntercept",
            "RescaleSlope",
        ),
        ("KVP", "SliceThickness", "AcquisitionNumber"),
    ),
    "MR": (
        (
            "ImageType",
            "ScanningSequence",
            "SequenceVariant",
            "ImagePositionPatient",
            "ImageOrientationPatient",
            "PixelSpacing",
        ),
        ("ScanOptions", "MRAcquisitionType", "EchoTime", "SliceThickness", "EchoTrainLength"),
    ),
    "DX": (("ImageType", "PresentationIntentType", "PixelIntensityRelationship"), ("PatientOrientation",)),
    "CR": ((), ("PatientOrientation",)),
    "MG": (("ImageType", "PresentationIntentType"), ("PatientOrientation",)),
    "XA": (("ImageType",), ("KVP",)),
    "RF": (("ImageType",), ("KVP",)),
}
# Projection radiography: what part of the body is it? (R-RT-3 "拍摄范围")
BODY_PART_MODALITIES = frozenset({"CR", "DX", "MG", "RF", "XA", "IO", "PX"})
# Paired parts: which side is it? (ImageLaterality / Laterality L, R or B)
PAIRED_BODY_PARTS = frozenset(
    {
        "BREAST",
        "HAND",
        "FOOT",
        "KNEE",
        "ELBOW",
        "SHOULDER",
        "HIP",
        "ANKLE",
        "WRIST",
        "ARM",
        "LEG",
        "FINGER",
        "TOE",
        "FOREARM",
        "HUMERUS",
        "FEMUR",
        "TIBIA",
        "CLAVICLE",
        "EAR",
        "EYE",
    }
)
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})
_DATES = ("StudyDate", "SeriesDate", "ContentDate", "AcquisitionDate", "PatientBirthDate")


@dataclass(frozen=True)
class Problem:
    severity: str  # error | warning
    text: str


def _present(ds: Dataset, keyword: str) -> bool:
    return keyword in ds


def _empty(ds: Dataset, keyword: str) -> bool:
    elem = ds.data_element(keyword)
    return elem is None or elem.value is None or elem.value == "" or elem.value == b""


def _raw_non_ascii(elem: DataElement | RawDataElement) -> bool:
    value = elem.value
    if isinstance(value, bytes | bytearray):
        return any(b > 0x7F for b in value)
    return any(ord(ch) > 0x7F for ch in str(value))


def body_part(ds: Dataset) -> str:
    """BodyPartExamined, else the Anatomic Region Sequence's code meaning, upper-case."""
    if str(ds.get("BodyPartExamined", "") or "").strip():
        return str(ds.BodyPartExamined).strip().upper()
    seq = ds.get("AnatomicRegionSequence")
    if seq:
        return str(seq[0].get("CodeMeaning", "") or "").strip().upper()
    return ""


def identity(ds: Dataset) -> str:
    """A hash of who the patient is (compared across a study; never the values themselves)."""
    parts = [str(ds.get(k, "") or "") for k in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex")]
    return hashlib.sha256("\x1f".join(parts).encode("utf-8", "replace")).hexdigest()[:16]


def _expected_pixel_bytes(ds: Dataset) -> int | None:
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        n = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * frames
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        return None
    return (n * bits + 7) // 8


def check_header(ds: Dataset, *, encapsulated: bool) -> list[Problem]:
    """Every header problem of one instance (module docstring)."""
    out: list[Problem] = []
    modality = str(ds.get("Modality", "") or "").upper()
    type1, type2 = BY_MODALITY.get(modality, ((), ()))
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        # not an image (SR, key objects, presentation states, …): only what every instance needs
        type1, type2 = (), ()
        pixel: tuple[str, ...] = ()
    else:
        pixel = TYPE1_PIXEL
    for kw in (*TYPE1_COMMON, *pixel, *type1):
        if not _present(ds, kw):
            out.append(Problem("error", f"{kw} (Type 1) is missing"))
        elif _empty(ds, kw):
            out.append(Problem("error", f"{kw} (Type 1) is empty"))
    for kw in (*TYPE2_COMMON, *type2):
        if not _present(ds, kw):
            out.append(Problem("warning", f"{kw} (Type 2) is missing"))
    for kw in (
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPClassUID",
        "FrameOfReferenceUID",
    ):
        value = str(ds.get(kw, "") or "")
        if value and (len(value) > 64 or not _UID.match(value)):
            out.append(Problem("error", f"{kw} {value[:70]!r} is not a valid UID"))
    for kw in _DATES:
        value = str(ds.get(kw, "") or "").strip()
        if value:
            try:
                day = date(int(value[0:4]), int(value[4:6]), int(value[6:8]))
                if len(value) != 8 or day.year < 1900:
                    raise ValueError
            except ValueError:
                out.append(Problem("warning", f"{kw} {value!r} is not a date (YYYYMMDD)"))
    if "PixelData" in ds and not encapsulated:
        expected = _expected_pixel_bytes(ds)
        got = len(ds.get_item("PixelData").value or b"")
        if expected is not None and got not in (expected, expected + expected % 2):  # even-padded
            out.append(
                Problem("error", f"Pixel Data has {got} bytes; the Image Pixel module describes {expected}")
            )
    if not str(ds.get("SpecificCharacterSet", "") or "").strip():
        for elem in _top_level(ds):
            if elem.VR in _TEXT_VRS and _raw_non_ascii(elem):
                name = keyword_for_tag(elem.tag) or str(Tag(elem.tag))
                out.append(
                    Problem(
                        "warning", f"{name} has non-ASCII text but Specific Character Set is not declared"
                    )
                )
                break
    if modality in BODY_PART_MODALITIES and not body_part(ds):
        out.append(Problem("warning", "body part is missing (BodyPartExamined or Anatomic Region Sequence)"))
    part = body_part(ds)
    if part in PAIRED_BODY_PARTS:
        side = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "") or "").strip().upper()
        if side not in ("L", "R", "B"):
            out.append(Problem("warning", f"laterality (L, R or B) is missing for {part}"))
    return out


def _top_level(ds: Dataset) -> list[DataElement | RawDataElement]:
    return [ds.get_item(tag) for tag in ds.keys()]  # noqa: SIM118 - get_item keeps raw bytes
