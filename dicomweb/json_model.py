"""DICOM JSON Model (PS3.18 Annex F) helpers shared by QIDO-RS and WADO-RS metadata.

Issue 3 §3. Attributes are addressed by keyword (``PatientID``) or tag (``0x00100020`` /
``"00100020"``); their VR comes from pydicom's data dictionary. Values are encoded as PS3.18 §F.2.3
requires: person names as ``{"Alphabetic", "Ideographic", "Phonetic"}`` objects split from the stored
``A=I=P`` string (§F.2.2), IS/DS and the binary numeric VRs (US, UL, SS, SL, FL, FD, UV, SV) as JSON
numbers, multi-valued strings as one array item per value, AT as ``"GGGGEEEE"``; an attribute without
a value is ``{"vr": …}`` with no ``Value`` (§F.2.5).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

#: One data set in the DICOM JSON Model: ``{"GGGGEEEE": {"vr": …, "Value": […]}}``.
JsonDataset = dict[str, dict[str, Any]]

PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
_HEX_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
# VRs whose value may legitimately contain a backslash: never split into several values (PS3.5 6.2).
_SINGLE_VALUED = frozenset({"LT", "ST", "UT", "UR", "OB", "OW", "OD", "OF", "OL", "OV", "UN"})
_INT_VRS = frozenset({"IS", "US", "UL", "SS", "SL", "UV", "SV"})
_FLOAT_VRS = frozenset({"DS", "FL", "FD"})


def tag_key(tag: int) -> str:
    """The JSON object key of ``tag`` (PS3.18 §F.2.1.1): eight upper-case hex digits."""
    return f"{tag:08X}"


def tag_of(name: str) -> int | None:
    """The tag named by a keyword (``PatientID``) or eight hex digits (``00100020``), else None."""
    name = name.strip()
    if _HEX_TAG.match(name):
        return int(name, 16)
    tag = tag_for_keyword(name)
    return int(tag) if tag is not None else None


def keyword_of(tag: int) -> str:
    """The dictionary keyword of ``tag`` ("" for private or unknown tags)."""
    return str(keyword_for_tag(tag))


def vr_of(tag: int) -> str:
    """The VR of ``tag`` from the data dictionary; ``US or SS`` style entries give their first VR
    (``OB or OW`` gives ``OW``), unknown and private tags ``UN``."""
    try:
        vr = str(dictionary_VR(tag))
    except KeyError:
        return "UN"
    if vr == "OB or OW":
        return "OW"
    return vr.split(" or ")[0]


def person_name(value: str) -> dict[str, str]:
    """A PN value ``Alphabetic=Ideographic=Phonetic`` as its PS3.18 §F.2.2 JSON object.

    Empty groups are left out (``Zhang^San=张^三`` → Alphabetic and Ideographic only; ``=张^三`` →
    Ideographic only), trailing component separators are kept as stored.
    """
    return {name: group for name, group in zip(PN_GROUPS, value.split("=")[:3], strict=False) if group}


def _number(vr: str, value: Any) -> int | float | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value
    text = str(value).strip()
    if not text:
        return None
    try:
        if vr in _INT_VRS:
            return int(text)
        number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() and not re.search(r"[.eE]", text) else number


def encode_values(vr: str, value: Any) -> list[Any]:
    """The JSON ``Value`` array of an attribute of ``vr`` holding ``value``.

    ``value`` may be None or "" (no value), a scalar, a ``\\``-separated DICOM string, or a list;
    empty values, and values that cannot be encoded in ``vr`` (e.g. ``IS`` "abc"), become null.
    """
    if value is None:
        return []
    items: Iterable[Any]
    if isinstance(value, list | tuple):
        items = value
    elif isinstance(value, str) and vr not in _SINGLE_VALUED:
        items = value.split("\\") if value else []
    else:
        items = [value]
    out: list[Any] = []
    for item in items:
        encoded: Any = None
        if item is None or item == "":
            pass
        elif vr == "PN":
            encoded = person_name(str(item)) or None
        elif vr in _INT_VRS or vr in _FLOAT_VRS:
            encoded = _number(vr, item)
        elif vr == "AT":
            encoded = f"{item:08X}" if isinstance(item, int) else str(item).upper()
        else:
            encoded = str(item)
        out.append(encoded)
    # An empty value among others is null (§F.2.5); no non-empty value at all means no Value.
    return out if any(v is not None for v in out) else []


def element(tag: int, value: Any, vr: str | None = None) -> dict[str, Any]:
    """One attribute as a DICOM JSON object: ``{"vr": …}`` plus ``"Value"`` when it has one."""
    vr = vr or vr_of(tag)
    values = encode_values(vr, value)
    return {"vr": vr, "Value": values} if values else {"vr": vr}


def dataset(attributes: Mapping[int, Any], vrs: Mapping[int, str] | None = None) -> JsonDataset:
    """A DICOM JSON data set from ``{tag: value}``, its keys in ascending tag order (§F.2.1.1)."""
    vrs = vrs or {}
    return {tag_key(t): element(t, attributes[t], vrs.get(t)) for t in sorted(attributes)}


def sort_dataset(doc: Mapping[str, dict[str, Any]]) -> JsonDataset:
    """``doc`` with its attributes in ascending tag order."""
    return {k: dict(doc[k]) for k in sorted(doc, key=lambda k: int(k, 16))}


def strip_bulk_data(doc: Mapping[str, dict[str, Any]]) -> JsonDataset:
    """``doc`` without the attributes whose value is bulk data (``BulkDataURI``), also in sequences.

    Search results (QIDO-RS) carry no bulk data; ``InlineBinary`` values (small, below the
    archive's bulk-data threshold) are kept.
    """
    out: JsonDataset = {}
    for key, attr in doc.items():
        if "BulkDataURI" in attr:
            continue
        if attr.get("vr") == "SQ" and "Value" in attr:
            attr = {**attr, "Value": [strip_bulk_data(item) for item in attr["Value"]]}
        out[key] = attr
    return out


def resolve_bulk_data_uris(doc: Mapping[str, dict[str, Any]], base: str) -> JsonDataset:
    """``doc`` with relative ``BulkDataURI`` values (as the catalog stores them, relative to the
    DICOMweb root) made absolute against ``base`` (the DICOMweb root URL), also in sequences."""
    root = base.rstrip("/") + "/"
    out: JsonDataset = {}
    for key, attr in doc.items():
        uri = attr.get("BulkDataURI")
        if isinstance(uri, str) and "://" not in uri:
            attr = {**attr, "BulkDataURI": root + uri.lstrip("/")}
        elif attr.get("vr") == "SQ" and "Value" in attr:
            attr = {**attr, "Value": [resolve_bulk_data_uris(item, base) for item in attr["Value"]]}
        out[key] = attr
    return out
