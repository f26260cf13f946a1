"""What the DICOM SCP tells the audit trail (R-SE-4, issue 6 §4): queries, retrieves, rejected
associations. C-STORE is audited by ingest (one call site for DIMSE and STOW-RS).

The actor of a DIMSE event is the calling AE title; its institution comes from the configured
``[[dicom.peers]]`` entry, its source is the peer's IP address.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pynetdicom import evt

from gateway.archive.catalog import StoredInstance
from gateway.audit import Actor, AuditLog, EventType, Result
from gateway.config import DicomSection


def peer_actor(cfg: DicomSection, assoc: Any) -> Actor:
    """The calling AE of an association, as an audit actor."""
    req = assoc.requestor
    title = str(req.ae_title).strip()
    peer = next((p for p in cfg.peers if p.ae_title == title), None)
    return Actor(title, "dicom-peer", peer.institution if peer else "", str(req.address or ""))


def rejected(audit: AuditLog | None, cfg: DicomSection, event: evt.Event) -> None:
    if audit is None:
        return
    audit.record_as(
        peer_actor(cfg, event.assoc),
        EventType.ACCESS_DENIED,
        resource=f"ae:{cfg.ae_title}",
        result=Result.FAILURE,
        detail={"service": "association", "reason": "association rejected"},
    )


def query(
    audit: AuditLog | None,
    cfg: DicomSection,
    event: evt.Event,
    level: str,
    criteria: Mapping[str, str],
    matches: int | None,
    error: str = "",
) -> None:
    """A C-FIND: its level and keys (the query), how many matched, or why it was refused."""
    if audit is None:
        return
    sop_class = str(getattr(event.request, "AffectedSOPClassUID", "") or "")
    query_text = "&".join(f"{k}={v}" for k, v in criteria.items())
    detail: dict[str, Any] = {
        "service": "C-FIND",
        "level": level,
        "query": query_text,
        "sop_class_uid": sop_class,
    }
    if matches is not None:
        detail["matches"] = matches
    if error:
        detail["reason"] = error
    audit.record_as(
        peer_actor(cfg, event.assoc),
        EventType.QUERY,
        resource=f"C-FIND {level}",
        result=Result.FAILURE if error else Result.SUCCESS,
        detail=detail,
    )


def retrieve(
    audit: AuditLog | None,
    cfg: DicomSection,
    event: evt.Event,
    service: str,
    matched: Sequence[StoredInstance],
    *,
    destination: str = "",
    error: str = "",
) -> None:
    """A C-MOVE or C-GET: the studies sent (one record per study), or why it was refused."""
    if audit is None:
        return
    who = peer_actor(cfg, event.assoc)
    base: dict[str, Any] = {"service": service}
    if destination:
        base["destination"] = destination
    if error:
        audit.record_as(
            who,
            EventType.RETRIEVAL,
            resource=service,
            result=Result.FAILURE,
            detail={**base, "reason": error},
        )
        return
    by_study: dict[str, list[StoredInstance]] = {}
    for inst in matched:
        by_study.setdefault(inst.study_uid, []).append(inst)
    for study, items in by_study.items():
        classes = sorted({i.sop_class_uid for i in items})
        audit.record_as(
            who,
            EventType.RETRIEVAL,
            resource=f"study:{study}",
            result=Result.SUCCESS,
            detail={
                **base,
                "study_instance_uid": study,
                "instances": len(items),
                **({"sop_class_uid": classes[0]} if len(classes) == 1 else {"sop_classes": classes}),
            },
        )
    if not by_study:
        audit.record_as(
            who, EventType.RETRIEVAL, resource=service, result=Result.SUCCESS, detail={**base, "instances": 0}
        )
