"""``ybyx export`` and ``ybyx consent record``: data for secondary use (R-SE-9; issue 6 §9).

``ybyx export STUDY_UID… --out DIR -c CONFIG --anonymize`` writes the studies de-identified by the
PS3.15 Basic Profile; without ``--anonymize`` it writes them identified only when every study has a
recorded consent to the purpose (``ybyx consent record STUDY_UID --evidence REF -c CONFIG``), and
refuses otherwise. Both are audited (R-SE-4).
"""

from __future__ import annotations

import argparse
import getpass
from pathlib import Path
from typing import Any

from rich.console import Console

from gateway.config import CenterConfig, FrontendConfig

console = Console(stderr=True)


def _node(args: argparse.Namespace) -> FrontendConfig | CenterConfig:
    from gateway.audit_cli import _role_config

    return _role_config(args.config, getattr(args, "role", None))


def _who(cfg: FrontendConfig | CenterConfig) -> Any:
    from gateway.audit import Actor

    institution = cfg.institution if isinstance(cfg, FrontendConfig) else cfg.province
    return Actor(f"cli:{getpass.getuser()}", "system-admin", institution, "local")


def cmd_export(args: argparse.Namespace) -> int:
    from gateway.archive import Archive
    from gateway.audit import AuditLog
    from gateway.export import ExportRefused, export_studies

    cfg = _node(args)
    archive = Archive.open(cfg.storage, cfg.database, encryption=cfg.encryption)
    try:
        who = _who(cfg)
        audit = AuditLog.open(cfg.audit, archive.catalog, system=who)
        try:
            report = export_studies(
                archive,
                args.studies,
                Path(args.out),
                purpose=args.purpose,
                anonymize=args.anonymize,
                who=who,
                audit=audit,
            )
        except ExportRefused as exc:
            console.print(f"export refused: {exc}")
            return 2
    finally:
        archive.close()
    for sop, reason in report.refused.items():
        console.print(f"[yellow]left out[/yellow] {sop}: {reason}")
    kind = "anonymised (PS3.15 Basic Profile)" if report.anonymized else "identified, with consent"
    print(f"exported {len(report.written)} instances of {report.studies} studies to {report.out}: {kind}")
    return 0 if not report.refused else 1


def cmd_consent_record(args: argparse.Namespace) -> int:
    from gateway.archive.catalog import Catalog
    from gateway.audit import AuditLog, EventType, Result
    from gateway.export import ConsentBook, ExportRefused

    cfg = _node(args)
    catalog = Catalog.open(cfg.database.url)
    try:
        who = _who(cfg)
        try:
            ids = [
                ConsentBook(catalog).record(s, args.purpose, args.evidence, who.actor) for s in args.studies
            ]
        except (ValueError, ExportRefused) as exc:
            console.print(str(exc))
            return 2
        AuditLog.open(cfg.audit, catalog, system=who).record(
            EventType.CONFIG_CHANGE,
            actor=who.actor,
            role=who.role,
            institution=who.institution,
            resource=f"consent:{args.purpose}",
            result=Result.SUCCESS,
            source=who.source,
            detail={"consent": args.purpose, "study_instance_uids": args.studies, "evidence": args.evidence},
        )
    finally:
        catalog.close()
    print(f"recorded consent {', '.join(map(str, ids))} to {args.purpose} use of {len(ids)} studies")
    return 0


def add_parsers(sub: Any) -> None:
    """``export`` and ``consent`` under ``ybyx``."""
    from gateway.export import PURPOSES

    p = sub.add_parser(
        "export", help="studies for research/AI/analytics: anonymised, or identified with consent"
    )
    p.add_argument("studies", nargs="+", metavar="STUDY_UID")
    p.add_argument("--out", required=True, help="a new or empty folder")
    p.add_argument("--anonymize", action="store_true", help="apply the PS3.15 Basic Profile (irreversible)")
    p.add_argument("--purpose", choices=PURPOSES, default="research")
    p.add_argument("-c", "--config", required=True, help="the node's TOML file")
    p.add_argument("--role", choices=["frontend", "center"], help="which node of a demo config")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("consent", help="consents to identified secondary use")
    csub = p.add_subparsers(dest="consent_command", required=True)
    c = csub.add_parser("record", help="record patients' consent to identified use of studies")
    c.add_argument("studies", nargs="+", metavar="STUDY_UID")
    c.add_argument("--purpose", choices=PURPOSES, default="research")
    c.add_argument("--evidence", required=True, help="reference of the signed consent (never the scan)")
    c.add_argument("-c", "--config", required=True, help="the node's TOML file")
    c.add_argument("--role", choices=["frontend", "center"], help="which node of a demo config")
    c.set_defaults(func=cmd_consent_record)
