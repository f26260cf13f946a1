"""Export for secondary use: research, AI training, analytics (R-SE-9, R-SE-12; issue 6 §9).

Two ways out, and no third:

* **anonymised** — every instance goes through the PS3.15 Basic Application Level Confidentiality
  Profile (``gateway/anonymize.py``): irreversible, UIDs remapped consistently within the export;
* **identified** — only for studies with a recorded, unexpired, unrevoked consent to that purpose
  (:class:`ConsentBook`, ``ybyx consent record``); otherwise the whole export is refused before a
  byte is written, naming the studies without consent.

Every export is audited (R-SE-4): who, purpose, anonymised or not, how many studies and instances.
Files are written as ``OUT/<study>/<series>/<sop>.dcm`` under UIDs checked against the UID syntax,
so no value from a data set can steer a path outside ``OUT``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import insert, or_, select

from gateway.anonymize import Anonymizer, NotAnonymizable
from gateway.archive import Archive
from gateway.archive.catalog import Catalog
from gateway.archive.schema import secondary_use_consents
from gateway.audit import Actor, AuditLog, EventType, Result

PURPOSES = ("research", "ai-training", "analytics")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class ExportRefused(Exception):
    """The export cannot be made; the message says why and what to do instead."""


def safe_uid(value: object, what: str) -> str:
    """A UID fit to be a file or folder name: digits and dots only, at most 64 characters."""
    uid = str(value).strip()
    if len(uid) > 64 or not _UID.match(uid):
        raise ExportRefused(f"{what} {uid[:80]!r} is not a valid UID")
    return uid


class ConsentBook:
    """Consents to identified secondary use, per study (table ``secondary_use_consents``)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def record(
        self,
        study_uid: str,
        purpose: str,
        evidence: str,
        recorded_by: str,
        *,
        expires_at: datetime | None = None,
    ) -> int:
        if purpose not in PURPOSES:
            raise ValueError(f"purpose {purpose!r} is not one of {', '.join(PURPOSES)}")
        if not evidence.strip():
            raise ValueError("evidence: name the signed consent (form number, document reference)")
        with self.catalog.write() as conn:
            result = conn.execute(
                insert(secondary_use_consents).values(
                    study_uid=safe_uid(study_uid, "study"),
                    purpose=purpose,
                    evidence=evidence.strip()[:256],
                    recorded_by=recorded_by[:128],
                    recorded_at=datetime.now(UTC),
                    expires_at=expires_at,
                )
            )
            pk = result.inserted_primary_key
        assert pk is not None
        return int(pk[0])

    def consented(self, study_uids: Sequence[str], purpose: str, *, now: datetime | None = None) -> set[str]:
        """The studies among ``study_uids`` with a live consent to ``purpose``."""
        now = now or datetime.now(UTC)
        c = secondary_use_consents.c
        with self.catalog.engine.connect() as conn:
            rows = conn.execute(
                select(c.study_uid).where(
                    c.study_uid.in_(list(study_uids)),
                    c.purpose == purpose,
                    c.revoked_at.is_(None),
                    or_(c.expires_at.is_(None), c.expires_at > now),
                )
            ).all()
        return {str(r[0]) for r in rows}


@dataclass
class ExportReport:
    """What an export wrote (paths) and refused (SOP Instance UID → reason)."""

    out: Path
    anonymized: bool
    written: list[Path] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    studies: int = 0


def export_studies(
    archive: Archive,
    study_uids: Sequence[str],
    out: Path,
    *,
    purpose: str,
    anonymize: bool,
    who: Actor,
    audit: AuditLog | None = None,
) -> ExportReport:
    """Write the studies to ``out`` (a new or empty folder) for ``purpose`` (see the module
    docstring). Raises :class:`ExportRefused` before writing anything when the export is not
    allowed or a study is not held here."""
    if purpose not in PURPOSES:
        raise ExportRefused(f"purpose {purpose!r} is not one of {', '.join(PURPOSES)}")
    studies = [safe_uid(s, "study") for s in study_uids]
    if not studies:
        raise ExportRefused("no study given")
    if out.exists() and any(out.iterdir()):
        raise ExportRefused(f"{out} is not empty: each export goes to a folder of its own")
    if not anonymize:
        consented = ConsentBook(archive.catalog).consented(studies, purpose)
        missing = [s for s in studies if s not in consented]
        if missing:
            _audit(audit, who, studies, purpose, anonymize, 0, Result.FAILURE, "no consent")
            raise ExportRefused(
                f"no recorded consent to identified {purpose} use of {len(missing)} studies "
                f"({', '.join(missing[:5])}{'…' if len(missing) > 5 else ''}): export them with "
                "--anonymize, or record the patients' consent first (ybyx consent record)"
            )
    held = {s: archive.catalog.locate({"StudyInstanceUID": s}) for s in studies}
    absent = [s for s, items in held.items() if not items]
    if absent:
        raise ExportRefused(f"not held here: {', '.join(absent)}")
    report = ExportReport(out, anonymize, studies=len(studies))
    anonymizer = Anonymizer() if anonymize else None
    for instances in held.values():
        for inst in instances:
            ds = dcmread(BytesIO(b"".join(archive.store.get(inst.blob_key))))
            if anonymizer is not None:
                try:
                    anonymizer.apply(ds)
                except NotAnonymizable as exc:
                    report.refused[inst.sop_uid] = str(exc)
                    continue
            folder = out / safe_uid(ds.StudyInstanceUID, "study") / safe_uid(ds.SeriesInstanceUID, "series")
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{safe_uid(ds.SOPInstanceUID, 'instance')}.dcm"
            ds.save_as(path, enforce_file_format=True)
            report.written.append(path)
    _audit(audit, who, studies, purpose, anonymize, len(report.written), Result.SUCCESS, "")
    return report


def _audit(
    audit: AuditLog | None,
    who: Actor,
    studies: list[str],
    purpose: str,
    anonymized: bool,
    instances: int,
    result: Result,
    reason: str,
) -> None:
    if audit is None:
        return
    audit.record(
        EventType.RETRIEVAL,
        actor=who.actor,
        role=who.role,
        institution=who.institution,
        resource=f"export:{purpose}",
        result=result,
        source=who.source,
        detail={
            "export": purpose,
            "anonymized": anonymized,
            "studies": len(studies),
            "study_instance_uids": studies[:100],
            "instances": instances,
            **({"reason": reason} if reason else {}),
        },
    )
