"""What the catalog keeps of one instance, read from its DICOM header.

``InstanceRecord.from_dataset`` is the one place that turns a pydicom header into catalog values;
DIMSE ingest and STOW-RS both go through it, so both catalogue the same things.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID

log = logging.getLogger(__name__)

# Attributes whose values are pixel or other bulk data: never inlined in the metadata JSON.
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
BULK_THRESHOLD = 1024


class InvalidInstance(ValueError):
    """The header lacks or garbles what an instance must have; the message names the attribute."""


def fold_name(value: str) -> str:
    """Case- and accent-insensitive form of a person name, for matching (NFKD, accents dropped)."""
    decomposed = unicodedata.normalize("NFKD", value)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


# ---- per-element memo ---------------------------------------------------------------------------
#
# Converting header elements (pydicom's raw bytes -> Python values -> DICOM JSON) was most of the
# CPU time of cataloguing an instance (~1.5 of ~6 ms). Within a series nearly every element repeats
# byte for byte (patient, study, series, geometry, ...), so the results are memoised per element,
# keyed by everything the conversion depends on: tag, VR, raw value bytes, byte order, explicit or
# implicit VR, and the data set's character set. A miss goes through pydicom itself, so a hit is
# exactly what pydicom would have produced. Only plain public elements whose VR is certain are
# memoised: sequences, bulk/binary VRs, ambiguous VRs (US or SS, ...), UN and private tags always
# take pydicom's path. The memo is bounded (cleared when full), so memory stays flat.

# VRs whose value depends on nothing but the element's own bytes and the character set.
_MEMO_VRS = frozenset(
    {"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "PN", "SH", "SL", "SS", "ST"}
    | {"SV", "TM", "UC", "UI", "UL", "UR", "US", "UT", "UV"}
)
_MEMO_MAX_VALUE = 512  # bytes; longer values are converted every time
_MEMO_MAX_ENTRIES = 4096  # ~2 MiB at most; per-instance values (UIDs, positions) churn through it
_memo: dict[tuple[Any, ...], Any] = {}
_MISSING = object()


def _memo_put(key: tuple[Any, ...], value: Any) -> None:
    if len(_memo) >= _MEMO_MAX_ENTRIES:
        _memo.clear()
    _memo[key] = value


def _charset_key(ds: Dataset) -> Any:
    """What pydicom decodes this data set's text with (``Dataset.__getitem__``), hashable."""
    cs = ds.original_character_set or ds._character_set
    return cs if isinstance(cs, str) else tuple(cs)


def _raw_key(ds: Dataset, tag: int, charset: Any) -> tuple[Any, ...] | None:
    """The memo key of element ``tag`` while still unconverted and memoisable, else None."""
    raw = ds.get_item(tag)
    if not isinstance(raw, RawDataElement) or tag & 0x10000 or tag == 0x00080005:
        return None  # converted already / private / the character set itself
    value = raw.value
    if value is None or len(value) > _MEMO_MAX_VALUE:
        return None  # deferred or long
    vr = raw.VR
    if vr is None:  # implicit VR: pydicom takes the dictionary's VR first
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return None
    if vr not in _MEMO_VRS:
        return None
    return (tag, vr, value, raw.is_little_endian, raw.is_implicit_VR, charset)


_KEYWORD_TAGS: dict[str, int] = {}


def _tag(keyword: str) -> int:
    tag = _KEYWORD_TAGS.get(keyword)
    if tag is None:
        found = tag_for_keyword(keyword)
        if found is None:
            raise ValueError(f"unknown DICOM keyword {keyword!r}")
        tag = _KEYWORD_TAGS[keyword] = found
    return tag


def _text_uncached(ds: Dataset, keyword: str, limit: int) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)[:limit]
    return str(value)[:limit]


def _text(ds: Dataset, keyword: str, limit: int = 400) -> str:
    tag = _tag(keyword)
    key = _raw_key(ds, tag, _charset_key(ds)) if tag in ds else None
    if key is None:
        return _text_uncached(ds, keyword, limit)
    memo_key = ("text", limit, *key)
    hit = _memo.get(memo_key, _MISSING)
    if hit is _MISSING:
        hit = _text_uncached(ds, keyword, limit)
        _memo_put(memo_key, hit)
    return cast(str, hit)


def _int_uncached(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _int(ds: Dataset, keyword: str) -> int | None:
    tag = _tag(keyword)
    key = _raw_key(ds, tag, _charset_key(ds)) if tag in ds else None
    if key is None:
        return _int_uncached(ds, keyword)
    memo_key = ("int", *key)
    hit = _memo.get(memo_key, _MISSING)
    if hit is _MISSING:
        hit = _int_uncached(ds, keyword)
        _memo_put(memo_key, hit)
    return cast("int | None", hit)


_VALID_UIDS: dict[str, bool] = {}  # pydicom's verdict per UID text (its regex: ~10 us a UID)
_VALID_UIDS_MAX = 4096


def _uid(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if not value:
        raise InvalidInstance(f"{keyword} is missing")
    text = str(value).strip()
    valid = _VALID_UIDS.get(text)
    if valid is None:
        if len(_VALID_UIDS) >= _VALID_UIDS_MAX:
            _VALID_UIDS.clear()
        valid = _VALID_UIDS[text] = UID(text).is_valid
    if not valid:
        raise InvalidInstance(f"{keyword} {str(value)!r} is not a valid UID")
    return text


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def metadata_json(ds: Dataset, *, study: str, series: str, sop: str, has_pixels: bool) -> str:
    """The instance's DICOM JSON (PS3.18 F.2) with bulk data as BulkDataURI.

    URIs are relative to the DICOMweb root (``studies/…/bulk/{tag}``); the WADO-RS layer makes
    them absolute for the request's base URL.

    The text is what ``json.dumps(ds.to_json_dict(...))`` gives, element by element in the same
    order; repeated elements come from the memo above instead of being converted again.
    """
    base = f"studies/{study}/series/{series}/instances/{sop}/bulk"

    def bulk(elem: DataElement) -> str:
        return f"{base}/{elem.tag:08X}"

    charset = _charset_key(ds)
    parts: list[str] = []
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset converts every element
        key = _raw_key(ds, tag, charset)
        part = None if key is None else _memo.get(key)  # '"ggggeeee":{...}', as below
        if part is None:
            elem = ds[tag]
            try:
                fragment = _dumps(
                    elem.to_json_dict(bulk_data_element_handler=bulk, bulk_data_threshold=BULK_THRESHOLD)
                )
            except Exception:
                log.error("Error while processing tag %08X", tag)  # as Dataset.to_json_dict does
                raise
            part = f'"{tag:08X}":{fragment}'
            if key is not None:
                _memo_put(key, part)
        parts.append(part)
    if has_pixels and 0x7FE00010 not in ds:
        vr = "OW" if ds.get("BitsAllocated", 8) > 8 else "OB"
        parts.append(f'"7FE00010":{_dumps({"vr": vr, "BulkDataURI": f"{base}/7FE00010"})}')
    return "{" + ",".join(parts) + "}"


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
    # pixel data location (catalog ``pixel_offset``/``pixel_length``; see schema.py): None when
    # unknown or when frames must be located by parsing the header
    pixel_offset: int | None = None
    pixel_length: int | None = None
    samples_per_pixel: int | None = None

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
        pixel_offset: int | None = None,
        pixel_length: int | None = None,
        identified: tuple[str, str, str, str] | None = None,
    ) -> InstanceRecord:
        """``identified``: what :meth:`identify` returned for ``ds``, if the caller has it."""
        study, series, sop, sop_class = identified or cls.identify(ds)
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
            pixel_offset=pixel_offset,
            pixel_length=pixel_length,
            samples_per_pixel=_int(ds, "SamplesPerPixel"),
        )
