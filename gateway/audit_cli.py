"""``ybyx audit verify | export``: check the audit chain, export it for an ATNA repository.

R-SE-4, issue 6 §4. ``verify`` exits 0 with a summary, or 1 naming the first bad record (seq and
what is wrong: edited, deleted/gap, reordered, checkpoint mismatch). Both read the role's catalog
database and ``[audit]`` section; neither writes to the database.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gateway.config import DEMO_NODES, CenterConfig, ConfigError, DemoConfig, FrontendConfig, load_config


def _role_config(path: str, role: str | None = None) -> FrontendConfig | CenterConfig:
    cfg = load_config(path)
    if isinstance(cfg, DemoConfig):
        if role is None:
            raise ConfigError(
                [f"{path}: role: a demo config holds several nodes: give --role " + "|".join(DEMO_NODES)]
            )
        cfg = cfg.node(role)
    if not isinstance(cfg, FrontendConfig | CenterConfig):
        raise ConfigError(
            [f"{path}: role: audit commands need a frontend or center config (got {cfg.role!r})"]
        )
    return cfg


def _open_engine(cfg: FrontendConfig | CenterConfig, source: str) -> Any:
    from sqlalchemy import inspect

    from gateway.archive.catalog import make_engine

    engine = make_engine(cfg.database.url)
    if not inspect(engine).has_table("audit_log"):
        engine.dispose()
        raise ConfigError([f"{source}: database.url: no audit log in this database (start the role once)"])
    return engine


def _exports(
    cfg: FrontendConfig | CenterConfig, against: str, source: str
) -> tuple[list[tuple[str, Any]], list[str]]:
    """The export copies to compare with, each with a label, and notes on those left out."""
    from gateway.audit import FolderExport

    found: list[tuple[str, Any]] = []
    notes: list[str] = []
    if against in ("all", "folder"):
        if cfg.audit.export_path.is_dir():
            found.append((f"folder {cfg.audit.export_path}", FolderExport(cfg.audit.export_path)))
        else:
            notes.append(f"no export folder at {cfg.audit.export_path}: exported checkpoints not compared")
    if against in ("all", "s3"):
        if cfg.audit.s3 is None:
            if against == "s3":
                raise ConfigError([f"{source}: audit.s3: --against-export s3 needs an [audit.s3] section"])
        else:
            from gateway.audit_s3 import ObjectLockExport

            s3 = ObjectLockExport.from_config(cfg.audit.s3)
            found.append((f"object-locked copy {s3}", s3))
    return found, notes


def cmd_verify(args: argparse.Namespace) -> int:
    from gateway.audit import trusted_keys, verify

    cfg = _role_config(args.config, args.role)
    if args.public_key:  # an auditor's own copy of the public key replaces the configured ones
        keys = trusted_keys(None, [Path(p) for p in args.public_key])
    else:
        signing = cfg.audit.signing_key if cfg.audit.signing_key.exists() else None
        kms = None
        if cfg.audit.signing_key_source == "kms":  # every checkpoint key the KMS has held (R-SE-14)
            from gateway.security.kms import LocalKms

            kms = LocalKms(cfg.encryption.key_file)
        keys = trusted_keys(signing, cfg.audit.verify_keys, kms)
    exports, notes = _exports(cfg, args.against_export, args.config)
    if not keys:
        notes.append("no public key: checkpoint signatures cannot be checked")
    engine = _open_engine(cfg, args.config)
    try:  # the chain once per export copy (or once alone); the first broken one decides
        reports = [(label, verify(engine, keys, export)) for label, export in exports] or [
            ("", verify(engine, keys, None))
        ]
    finally:
        engine.dispose()
    for label, report in reports:
        notes += [f"{label}: {n}" if label else n for n in report.notes]
    for line in notes:
        print(f"note: {line}", file=sys.stderr)
    broken = [(label, r) for label, r in reports if not r.ok]
    if not broken:
        for label, report in reports:
            print(report.summary() + (f" (against the {label})" if label else ""))
        return 0
    for label, report in broken:
        print(report.summary() + (f" (against the {label})" if label else ""), file=sys.stderr)
    return 1


def cmd_export(args: argparse.Namespace) -> int:
    from gateway.audit import system_actor
    from gateway.audit_dicom import export_dicom

    cfg = _role_config(args.config, args.role)
    engine = _open_engine(cfg, args.config)
    try:
        n = export_dicom(engine, Path(args.out), system_actor(cfg), first=args.from_seq, last=args.to_seq)
    finally:
        engine.dispose()
    print(f"wrote {n} DICOM audit messages (PS3.15 A.5) to {args.out}")
    return 0


def add_parser(sub: Any) -> None:
    """Add ``audit verify`` and ``audit export`` to the ``ybyx`` sub-command parser."""
    p = sub.add_parser("audit", help="the audit trail: verify the chain, export DICOM audit messages")
    asub = p.add_subparsers(dest="audit_command", required=True)
    v = asub.add_parser(
        "verify", help="walk the hash chain and checkpoints; exit 1 naming the first bad record"
    )
    v.add_argument("-c", "--config", required=True, help="front-end or center TOML file")
    v.add_argument("--role", choices=DEMO_NODES, help="which role of a demo config")
    v.add_argument(
        "--public-key",
        action="append",
        metavar="PEM",
        help="trust only this public key (repeatable) instead of the configured signing key",
    )
    v.add_argument(
        "--against-export",
        choices=["all", "folder", "s3"],
        default="all",
        help="which exported copies to compare the database with: the folder, the [audit.s3] "
        "object-locked bucket, or every configured one (default)",
    )
    v.set_defaults(func=cmd_verify)
    e = asub.add_parser("export", help="write the records as DICOM audit messages, one XML file each")
    e.add_argument("-c", "--config", required=True, help="front-end or center TOML file")
    e.add_argument("--role", choices=DEMO_NODES, help="which role of a demo config")
    e.add_argument("--format", choices=["dicom"], default="dicom", help="PS3.15 A.5 audit messages")
    e.add_argument("--out", required=True, help="folder for audit-<seq>.xml files")
    e.add_argument("--from-seq", type=int, default=1)
    e.add_argument("--to-seq", type=int, default=None)
    e.set_defaults(func=cmd_export)
