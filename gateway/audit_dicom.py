"""Audit records as DICOM audit messages (PS3.15 A.5, RFC 3881-derived XML) for ATNA repositories.

R-SE-4, issue 6 §4: ``ybyx audit export --format dicom`` writes one ``AuditMessage`` document per
record. The subset produced (documented in ``docs/audit.md``):

=================  ==========================================  ======  ===============================
event type         EventID (DCM)                               action  EventTypeCode
=================  ==========================================  ======  ===============================
upload             110104 DICOM Instances Transferred          C       —  (exam records: 110110 Patient
                                                                        Record)
retrieval          110104 DICOM Instances Transferred          R       —  (metadata/rendered/thumbnail:
                                                                        110103 DICOM Instances Accessed)
query              110112 Query                                E       —
forward            110104 DICOM Instances Transferred          R       —
share              110106 Export                               R       —
login / logout     110114 User Authentication                  E       110122 Login / 110123 Logout
config-change      110113 Security Alert                       E       110131 Software Configuration
key-operation      110113 Security Alert                       E       110129 Security Configuration
access-denied      110113 Security Alert                       E       110132 Use of Restricted Function
                                                                       (association: 110126 Node
                                                                       Authentication)
anomaly            110113 Security Alert                       E       ANOMALY (99YBYX, local code)
application-start  110100 Application Activity                 E       110120 Application Start
application-stop   110100 Application Activity                 E       110121 Application Stop
=================  ==========================================  ======  ===============================

EventOutcomeIndicator: 0 on success, 4 for a denied access, 8 for other failures. Active
participants: the actor (``UserIsRequestor`` true, its address as ``NetworkAccessPointID``) and this
node (the audit source), with the DCM role codes 110153 Source / 110152 Destination for transfers
and queries. Participant objects: the study (110180 Study Instance UID, with ``SOPClass`` and
``Instance`` when known), its patient (RFC-3881 "2" Patient Number, looked up in the catalog; the
patient ID only, no name), the query (110181 SOP Class UID for C-FIND, a URI for QIDO, the query in
``ParticipantObjectQuery``), or the resource otherwise. Every message carries the record's chain
position and hash as ``ParticipantObjectDetail`` (``ybyx-audit-seq``, ``ybyx-audit-hash``).
"""

from __future__ import annotations

import base64
import ipaddress
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, select

from gateway.archive.schema import patients, studies
from gateway.audit import Actor, AuditRecord, EventType, Result, read_records


@dataclass(frozen=True)
class Code:
    code: str
    meaning: str
    system: str = "DCM"

    def element(self, parent: ET.Element, tag: str) -> ET.Element:
        return ET.SubElement(
            parent, tag, {"csd-code": self.code, "codeSystemName": self.system, "originalText": self.meaning}
        )


TRANSFERRED = Code("110104", "DICOM Instances Transferred")
ACCESSED = Code("110103", "DICOM Instances Accessed")
PATIENT_RECORD = Code("110110", "Patient Record")
SECURITY_ALERT = Code("110113", "Security Alert")
USER_AUTH = Code("110114", "User Authentication")
APP_ACTIVITY = Code("110100", "Application Activity")
SOURCE_ROLE = Code("110153", "Source Role ID")
DESTINATION_ROLE = Code("110152", "Destination Role ID")
APPLICATION_ROLE = Code("110150", "Application")
STUDY_UID = Code("110180", "Study Instance UID")
SOP_CLASS_UID = Code("110181", "SOP Class UID")
PATIENT_NUMBER = Code("2", "Patient Number", "RFC-3881")
URI = Code("12", "URI", "RFC-3881")
YBYX_RESOURCE = Code("resource", "ybyx audit resource", "99YBYX")
NODE_AUTH = Code("110126", "Node Authentication")

EVENTS: dict[EventType, tuple[Code, str, Code | None]] = {
    EventType.LOGIN: (USER_AUTH, "E", Code("110122", "Login")),
    EventType.LOGOUT: (USER_AUTH, "E", Code("110123", "Logout")),
    EventType.UPLOAD: (TRANSFERRED, "C", None),
    EventType.RETRIEVAL: (TRANSFERRED, "R", None),
    EventType.QUERY: (Code("110112", "Query"), "E", None),
    EventType.SHARE: (Code("110106", "Export"), "R", None),
    EventType.FORWARD: (TRANSFERRED, "R", None),
    EventType.CONFIG_CHANGE: (SECURITY_ALERT, "E", Code("110131", "Software Configuration")),
    EventType.KEY_OPERATION: (SECURITY_ALERT, "E", Code("110129", "Security Configuration")),
    EventType.ACCESS_DENIED: (SECURITY_ALERT, "E", Code("110132", "Use of Restricted Function")),
    EventType.ANOMALY: (SECURITY_ALERT, "E", Code("ANOMALY", "Anomaly", "99YBYX")),
    EventType.APPLICATION_START: (APP_ACTIVITY, "E", Code("110120", "Application Start")),
    EventType.APPLICATION_STOP: (APP_ACTIVITY, "E", Code("110121", "Application Stop")),
}

PatientLookup = Callable[[str], str | None]  # study UID -> patient ID


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _access_point(source: str) -> dict[str, str]:
    if not source or source == "local":
        return {}
    host = source.rsplit(":", 1)[0] if source.count(":") == 1 else source
    try:
        ipaddress.ip_address(host.strip("[]"))
        return {"NetworkAccessPointID": host.strip("[]"), "NetworkAccessPointTypeCode": "2"}
    except ValueError:
        return {"NetworkAccessPointID": host, "NetworkAccessPointTypeCode": "1"}


def _participant(msg: ET.Element, user: str, requestor: bool, source: str, roles: list[Code]) -> None:
    el = ET.SubElement(
        msg,
        "ActiveParticipant",
        {
            "UserID": user or "unknown",
            "UserIsRequestor": "true" if requestor else "false",
            **_access_point(source),
        },
    )
    # RoleIDCode elements come first (schema order); attributes are unordered
    for role in roles:
        role.element(el, "RoleIDCode")


def _event(rec: AuditRecord) -> tuple[Code, str, Code | None]:
    kind = EventType(rec.event_type)
    event_id, action, type_code = EVENTS[kind]
    if kind is EventType.UPLOAD and rec.resource.startswith("exam:"):
        return PATIENT_RECORD, "C", None
    if kind is EventType.RETRIEVAL and any(
        s in rec.resource for s in ("/metadata", "/rendered", "/thumbnail")
    ):
        return ACCESSED, "R", None
    if kind is EventType.ACCESS_DENIED and rec.details().get("service") == "association":
        return event_id, action, NODE_AUTH
    return event_id, action, type_code


def _roles(kind: EventType) -> tuple[list[Code], list[Code]]:
    """DCM role codes of (the actor, this node)."""
    if kind is EventType.UPLOAD:
        return [SOURCE_ROLE], [DESTINATION_ROLE]
    if kind is EventType.RETRIEVAL:
        return [DESTINATION_ROLE], [SOURCE_ROLE]
    if kind is EventType.QUERY:
        return [SOURCE_ROLE], [DESTINATION_ROLE]
    if kind is EventType.FORWARD:
        return [SOURCE_ROLE], [DESTINATION_ROLE]
    return [], [APPLICATION_ROLE]


def _object(
    msg: ET.Element,
    object_id: str,
    id_type: Code,
    *,
    type_code: str,
    role: str | None,
    name: str | None = None,
    query: str | None = None,
    details: list[tuple[str, str]] | None = None,
) -> ET.Element:
    attrs = {"ParticipantObjectID": object_id or "-", "ParticipantObjectTypeCode": type_code}
    if role:
        attrs["ParticipantObjectTypeCodeRole"] = role
    el = ET.SubElement(msg, "ParticipantObjectIdentification", attrs)
    id_type.element(el, "ParticipantObjectIDTypeCode")
    if query is not None:
        ET.SubElement(el, "ParticipantObjectQuery").text = _b64(query)
    else:
        ET.SubElement(el, "ParticipantObjectName").text = name or object_id or "-"
    for kind, value in details or []:
        ET.SubElement(el, "ParticipantObjectDetail", {"type": kind, "value": _b64(value)})
    return el


def dicom_audit_message(rec: AuditRecord, *, system: Actor, patient_of: PatientLookup | None = None) -> bytes:
    """One PS3.15 A.5 ``AuditMessage`` (UTF-8 XML document) for a stored audit record."""
    kind = EventType(rec.event_type)
    detail = rec.details()
    event_id, action, type_code = _event(rec)
    failed = "4" if kind is EventType.ACCESS_DENIED else "8"  # denied: minor; else serious failure
    outcome = "0" if rec.result == Result.SUCCESS else failed

    msg = ET.Element("AuditMessage")
    ev = ET.SubElement(
        msg,
        "EventIdentification",
        {"EventActionCode": action, "EventDateTime": rec.time, "EventOutcomeIndicator": outcome},
    )
    event_id.element(ev, "EventID")
    if type_code is not None:
        type_code.element(ev, "EventTypeCode")
    reason = detail.get("reason") or detail.get("error")
    if reason:
        ET.SubElement(ev, "EventOutcomeDescription").text = str(reason)

    actor_roles, our_roles = _roles(kind)
    if rec.actor == system.actor:  # the node itself acted (forwarding, start/stop)
        _participant(msg, rec.actor, True, "", actor_roles or our_roles)
    else:
        _participant(msg, rec.actor, True, rec.source, actor_roles)
        _participant(msg, system.actor, False, "", our_roles)
    dest = detail.get("destination") or detail.get("center")
    if dest and kind in (EventType.RETRIEVAL, EventType.FORWARD):
        _participant(msg, str(dest), False, "", [DESTINATION_ROLE])

    src = ET.SubElement(msg, "AuditSourceIdentification", {"AuditSourceID": system.actor or "ybyx"})
    if system.institution:
        src.set("AuditEnterpriseSiteID", system.institution)
    ET.SubElement(src, "AuditSourceTypeCode", {"csd-code": "4"})  # application server process

    chain = [("ybyx-audit-seq", str(rec.seq)), ("ybyx-audit-hash", rec.hash)]
    study = str(detail.get("study_instance_uid") or "")
    if not study and rec.resource.startswith("study:"):
        study = rec.resource.removeprefix("study:")
    if kind is EventType.QUERY:
        sop_class = str(detail.get("sop_class_uid") or "")
        query = str(detail.get("query") or rec.resource)
        if sop_class:
            _object(msg, sop_class, SOP_CLASS_UID, type_code="2", role="3", query=query, details=chain)
        else:
            _object(msg, rec.resource, URI, type_code="2", role="24", query=query, details=chain)
    elif study:
        obj = _object(msg, study, STUDY_UID, type_code="2", role="3", details=chain)
        sop_class = str(detail.get("sop_class_uid") or "")
        count = detail.get("instances")
        if sop_class or count is not None:
            desc = ET.SubElement(obj, "ParticipantObjectDescription")
            sc = ET.SubElement(desc, "SOPClass", {"NumberOfInstances": str(int(count or 1))})
            if sop_class:
                sc.set("UID", sop_class)
            sop = str(detail.get("sop_instance_uid") or "")
            if sop:
                ET.SubElement(sc, "Instance", {"UID": sop})
        patient_id = patient_of(study) if patient_of is not None else None
        if patient_id:
            _object(msg, patient_id, PATIENT_NUMBER, type_code="1", role="1", name=patient_id)
    else:
        _object(msg, rec.resource, YBYX_RESOURCE, type_code="2", role=None, details=chain)

    data: bytes = ET.tostring(msg, encoding="utf-8", xml_declaration=True)
    return data


def catalog_patients(engine: Engine) -> PatientLookup:
    """Study UID → patient ID from the catalog (memoised per export)."""
    cache: dict[str, str | None] = {}

    def lookup(study_uid: str) -> str | None:
        if study_uid not in cache:
            with engine.connect() as conn:
                cache[study_uid] = conn.execute(
                    select(patients.c.patient_id)
                    .select_from(studies.join(patients, patients.c.id == studies.c.patient_pk))
                    .where(studies.c.study_uid == study_uid)
                ).scalar()
        return cache[study_uid]

    return lookup


def export_messages(
    engine: Engine, system: Actor, *, first: int = 1, last: int | None = None
) -> Iterator[tuple[AuditRecord, bytes]]:
    """Each record in ``first..last`` with its DICOM audit message."""
    lookup = catalog_patients(engine)
    for rec in read_records(engine, first, last):
        yield rec, dicom_audit_message(rec, system=system, patient_of=lookup)


def export_dicom(engine: Engine, out: Path, system: Actor, *, first: int = 1, last: int | None = None) -> int:
    """Write ``audit-<seq>.xml`` per record into ``out``; how many were written."""
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for rec, xml in export_messages(engine, system, first=first, last=last):
        (out / f"audit-{rec.seq:012d}.xml").write_bytes(xml)
        n += 1
    return n
