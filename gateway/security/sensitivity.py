"""Sensitivity labels and what each role may do with labelled data (R-SE-3, R-SE-8; issue 6 §3).

Every piece of data a route can return carries a :class:`Label`: the image itself (pixel data,
encapsulated documents), report text, personal information (name, birth date, address, phone),
identifiers (resident ID and other ID numbers) and the audit trail. :data:`POLICY` says, per role,
whether a label is read as is, masked, or denied; :func:`label_access` answers for one role and
label, :func:`redact` applies the policy to a DICOM JSON data set (QIDO-RS results, WADO-RS
metadata) for a user. Node clients (other ybyx nodes, the HIS) are not users and are not masked:
they hold the data under the node agreements and need it whole to archive and forward it.

ID numbers are **always** masked for people, whatever the role (R-SE-8): a Patient ID that is a
resident ID number shows its first and last four characters only (``gateway.identity.mask``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from gateway.identity import mask as mask_id
from gateway.security.permissions import Role


class Label(StrEnum):
    IMAGE = "image"  # the pixels and whole instances (WADO-RS retrieve, frames, rendered)
    REPORT = "report"  # diagnosis, findings, SR content, comments
    PERSONAL = "personal"  # name, birth date, sex, age, address, telephone
    IDENTIFIER = "identifier"  # ID numbers (resident ID, permits, passport, insurance)
    AUDIT = "audit"  # the audit trail (R-SE-4: auditors only)


class Access(StrEnum):
    READ = "read"
    MASK = "mask"
    DENY = "deny"


_R, _A, _L = Role, Access, Label
#: The one table (role × label → access); a role or label missing here is denied.
POLICY: dict[Role, dict[Label, Access]] = {
    _R.DOCTOR: {_L.IMAGE: _A.READ, _L.REPORT: _A.READ, _L.PERSONAL: _A.READ, _L.IDENTIFIER: _A.MASK},
    _R.PATIENT: {_L.IMAGE: _A.READ, _L.REPORT: _A.READ, _L.PERSONAL: _A.READ, _L.IDENTIFIER: _A.MASK},
    _R.INSTITUTION_ADMIN: {_L.PERSONAL: _A.MASK, _L.IDENTIFIER: _A.MASK},
    _R.SYSTEM_ADMIN: {_L.PERSONAL: _A.MASK, _L.IDENTIFIER: _A.MASK},
    _R.AUDITOR: {_L.AUDIT: _A.READ, _L.PERSONAL: _A.MASK, _L.IDENTIFIER: _A.MASK},
}

#: What a guarded action returns, by label: a role may perform the action only if it may read
#: (or at least see masked) that label. Actions not listed return no labelled data.
ACTION_LABELS: dict[str, tuple[Label, Access]] = {
    "wado": (Label.IMAGE, Access.READ),
    "qido": (Label.PERSONAL, Access.MASK),
    "api:exams": (Label.PERSONAL, Access.READ),
    "api:doctor": (Label.REPORT, Access.READ),  # history with reports, same-exam reminders
    "audit:read": (Label.AUDIT, Access.READ),
}

#: DICOM attributes (tag, 8 hex digits upper case) by label; untagged attributes are not labelled.
TAG_LABELS: dict[str, Label] = {
    "7FE00010": Label.IMAGE,  # Pixel Data
    "7FE00008": Label.IMAGE,  # Float Pixel Data
    "7FE00009": Label.IMAGE,  # Double Float Pixel Data
    "00420011": Label.IMAGE,  # Encapsulated Document
    "0040A730": Label.REPORT,  # Content Sequence (SR)
    "0040A160": Label.REPORT,  # Text Value
    "00324000": Label.REPORT,  # Study Comments
    "00204000": Label.REPORT,  # Image Comments
    "00081080": Label.REPORT,  # Admitting Diagnoses Description
    "00100010": Label.PERSONAL,  # Patient's Name
    "00100030": Label.PERSONAL,  # Patient's Birth Date
    "00100032": Label.PERSONAL,  # Patient's Birth Time
    "00101001": Label.PERSONAL,  # Other Patient Names
    "00101005": Label.PERSONAL,  # Patient's Birth Name
    "00101060": Label.PERSONAL,  # Patient's Mother's Birth Name
    "00101040": Label.PERSONAL,  # Patient's Address
    "00102154": Label.PERSONAL,  # Patient's Telephone Numbers
    "00102155": Label.PERSONAL,  # Patient's Telecom Information
    "00101000": Label.IDENTIFIER,  # Other Patient IDs (retired)
    "00101002": Label.IDENTIFIER,  # Other Patient IDs Sequence
    "00101050": Label.IDENTIFIER,  # Insurance Plan Identification (retired)
}
PATIENT_ID = "00100020"
# A Patient ID that is a resident ID number (18 characters, or the old 15 digits): an identifier.
_ID_NUMBER = re.compile(r"^(\d{17}[\dXx]|\d{15})$")


def label_access(role: Role | str, label: Label) -> Access:
    try:
        return POLICY.get(Role(role), {}).get(label, Access.DENY)
    except ValueError:
        return Access.DENY


def may(role: Role | str, action: str) -> bool:
    """Whether ``role`` may perform ``action`` as far as labels go (the permission table decides
    first; this keeps the two tables from contradicting each other: tested)."""
    need = ACTION_LABELS.get(action)
    if need is None:
        return True
    label, least = need
    got = label_access(role, label)
    return got is Access.READ or (got is Access.MASK and least is Access.MASK)


def looks_like_id_number(value: str) -> bool:
    return bool(_ID_NUMBER.match(value.strip()))


def _mask_value(value: Any, vr: str) -> Any:
    if isinstance(value, dict):  # PN: {"Alphabetic": …, "Ideographic": …}
        return {k: _mask_value(v, vr) for k, v in value.items()}
    if isinstance(value, str):
        if vr == "DA" and len(value) >= 4:
            return value[:4] + "0101"  # the year stays (age matters clinically), the day does not
        if vr == "PN":
            return "^".join((part[:1] + "*") if part else "" for part in value.split("^"))
        return mask_id(value) if len(value) > 8 else "*" * len(value)
    return value


def _masked_element(element: Mapping[str, Any]) -> dict[str, Any]:
    vr = str(element.get("vr", ""))
    out = {k: v for k, v in element.items() if k not in ("Value", "InlineBinary", "BulkDataURI")}
    if "Value" in element and vr != "SQ":
        out["Value"] = [_mask_value(v, vr) for v in element["Value"]]
    return out


def redact(doc: Mapping[str, Any], role: Role | str) -> dict[str, Any]:
    """A copy of a DICOM JSON data set (PS3.18 F.2) as ``role`` may see it: denied labels removed,
    masked labels masked, a Patient ID that is an ID number masked; sequences recursively."""
    out: dict[str, Any] = {}
    for tag, element in doc.items():
        label = TAG_LABELS.get(tag.upper())
        if tag.upper() == PATIENT_ID:
            values = element.get("Value") if isinstance(element, dict) else None
            if values and any(isinstance(v, str) and looks_like_id_number(v) for v in values):
                label = Label.IDENTIFIER
        access = Access.READ if label is None else label_access(role, label)
        if access is Access.DENY:
            continue
        if not isinstance(element, dict):
            out[tag] = element
            continue
        if access is Access.MASK:
            out[tag] = _masked_element(element)
        elif element.get("vr") == "SQ" and isinstance(element.get("Value"), list):
            out[tag] = {
                **element,
                "Value": [
                    redact(item, role) if isinstance(item, dict) else item for item in element["Value"]
                ],
            }
        else:
            out[tag] = element
    return out
