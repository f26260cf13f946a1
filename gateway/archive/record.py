"""What the catalog keeps of one instance, read from its DICOM header.

``InstanceRecord.from_dataset`` is the one place that turns a pydicom header into catalog values;
DIMSE ingest and STOW-RS both go through it, so both catalogue the same things.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID

# Attributes whose values are pixel or other bulk data: never inlined in the metadata JSON.
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
BULK_THRESHOLD = 1024


class InvalidInstance(ValueError):
    """The header lacks or garbles what an instance must have; the message names the attribute."""


def fold_name(value: str) -> str:
    """Case- and accent-insensitive form of a person name, for matching (NFKD, accents dropped)."""
    decomposed = unicodedata.normalize("NFKD", value)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def _text(ds: Dataset, keyword: str, limit: int = 400) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)[:limit]
    return str(value)[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _uid(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if not value:
        raise InvalidInstance(f"{keyword} is missing")
    uid = UID(str(value).strip())
    if not uid.is_valid:
        raise InvalidInstance(f"{keyword} {str(value)!r} is not a valid UID")
    return str(uid)


def metadata_json(ds: Dataset, *, study: str, series: str, sop: str, has_pixels: bool) -> str:
    """The instance's DICOM JSON (PS3.18 F.2) with bulk data as BulkDataURI.

    URIs are relative to the DICOMweb root (``studies/…/bulk/{tag}``); the WADO-RS layer makes
    them absolute for the request's base URL.
    """
    base = f"studies/{study}/series/{series}/instances/{sop}/bulk"

    def bulk(elem: DataElement) -> str:
        return f"{base}/{elem.tag:08X}"

    doc: dict[str, Any] = ds.to_json_dict(bulk_data_threshold=BULK_THRESHOLD, bulk_data_element_handler=bulk)
    if has_pixels and "7FE00010" not in doc:
        vr = "OW" if ds.get("BitsAllocated", 8) > 8 else "OB"
        doc["7FE00010"] = {"vr": vr, "BulkDataURI": f"{base}/7FE00010"}
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class InstanceRecord:
    """One instance as the catalog stores it (patient, study, series and instance attributes)."""

    # patient
    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str
    sex: str
    # study
    study_uid: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    referring_physician: str
    study_description: str
    institution_name: str
    # series
    series_uid: str
    modality: str
    series_number: int | None
    series_description: str
    body_part: str
    pps_start_date: str
    pps_start_time: str
    # instance
    sop_uid: str
    sop_class_uid: str
    instance_number: int | None
    transfer_syntax: str
    rows: int | None
    columns: int | None
    bits_allocated: int | None
    number_of_frames: int | None
    metadata_json: str
    # storage
    size: int
    sha256: str
    blob_key: str
    received_at: datetime
    source_ae: str

    @staticmethod
    def identify(ds: Dataset) -> tuple[str, str, str, str]:
        """(study, series, SOP instance, SOP class) UIDs, validated; raises InvalidInstance."""
        return (
            _uid(ds, "StudyInstanceUID"),
            _uid(ds, "SeriesInstanceUID"),
            _uid(ds, "SOPInstanceUID"),
            _uid(ds, "SOPClassUID"),
        )

    @classmethod
    def from_dataset(
        cls,
        ds: Dataset,
        *,
        transfer_syntax: str,
        has_pixels: bool,
        size: int,
        sha256: str,
        blob_key: str,
        received_at: datetime,
        source_ae: str,
    ) -> InstanceRecord:
        study, series, sop, sop_class = cls.identify(ds)
        return cls(
            patient_id=_text(ds, "PatientID", 64),
            issuer=_text(ds, "IssuerOfPatientID", 64),
            patient_name=_text(ds, "PatientName"),
            birth_date=_text(ds, "PatientBirthDate", 8),
            sex=_text(ds, "PatientSex", 16),
            study_uid=study,
            study_date=_text(ds, "StudyDate", 8),
            study_time=_text(ds, "StudyTime", 16),
            accession_number=_text(ds, "AccessionNumber", 64),
            study_id=_text(ds, "StudyID", 16),
            referring_physician=_text(ds, "ReferringPhysicianName"),
            study_description=_text(ds, "StudyDescription"),
            institution_name=_text(ds, "InstitutionName"),
            series_uid=series,
            modality=_text(ds, "Modality", 16),
            series_number=_int(ds, "SeriesNumber"),
            series_description=_text(ds, "SeriesDescription"),
            body_part=_text(ds, "BodyPartExamined", 64),
            pps_start_date=_text(ds, "PerformedProcedureStepStartDate", 8),
            pps_start_time=_text(ds, "PerformedProcedureStepStartTime", 16),
            sop_uid=sop,
            sop_class_uid=sop_class,
            instance_number=_int(ds, "InstanceNumber"),
            transfer_syntax=transfer_syntax,
            rows=_int(ds, "Rows"),
            columns=_int(ds, "Columns"),
            bits_allocated=_int(ds, "BitsAllocated"),
            number_of_frames=_int(ds, "NumberOfFrames"),
            metadata_json=metadata_json(ds, study=study, series=series, sop=sop, has_pixels=has_pixels),
            size=size,
            sha256=sha256,
            blob_key=blob_key,
            received_at=received_at,
            source_ae=source_ae,
        )
