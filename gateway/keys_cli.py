"""``ybyx keys generate|rotate|destroy|list -c CONFIG``: the KEK lifecycle of a node (R-SE-14).

Issue 6 §5. The commands act on the node's ``[encryption]`` KMS and its catalog's ``data_keys``:

* ``generate`` makes the key file with a first KEK (a node also does this on first start);
* ``rotate`` makes a new active KEK and re-wraps every data key under it — objects are not
  rewritten, so it takes seconds per hundred thousand objects whatever their size;
* ``destroy KEK_ID`` removes a KEK's material: objects whose data keys are still wrapped by it
  become unreadable for good (crypto-shredding). It refuses while data keys depend on the KEK
  unless ``--yes`` is given (rotate first to keep them);
* ``list`` shows the KEKs and how many data keys each wraps.

Every operation is audited (``key-operation``, R-SE-4) with the key id, never the material.
"""

from __future__ import annotations

import argparse
import getpass
from typing import Any

from rich.console import Console

from gateway.config import DEMO_NODES, CenterConfig, FrontendConfig

console = Console(stderr=True)


def _node(args: argparse.Namespace) -> FrontendConfig | CenterConfig:
    from gateway.audit_cli import _role_config

    return _role_config(args.config, getattr(args, "role", None))


def _audit(
    cfg: FrontendConfig | CenterConfig, catalog: Any, operation: str, key_id: str, **detail: Any
) -> None:
    from gateway.audit import Actor, AuditLog, EventType, Result

    institution = cfg.institution if isinstance(cfg, FrontendConfig) else cfg.province
    who = Actor(f"cli:{getpass.getuser()}", "system-admin", institution, "local")
    audit = AuditLog.open(cfg.audit, catalog, system=who)
    audit.record(
        EventType.KEY_OPERATION,
        actor=who.actor,
        role=who.role,
        institution=who.institution,
        resource=f"kek:{key_id}",
        result=Result.SUCCESS,
        source=who.source,
        detail={"operation": operation, "key_id": key_id, **detail},
    )


def generate_kek(args: argparse.Namespace) -> int:
    """``ybyx keys generate -c CONFIG``: the node's key file with its first KEK."""
    from gateway.archive.catalog import Catalog
    from gateway.security.kms import LocalKms

    cfg = _node(args)
    path = cfg.encryption.key_file
    if path.exists():
        console.print(f"{path}: exists; use `ybyx keys rotate` for a new KEK")
        return 2
    catalog = Catalog.open(cfg.database.url)
    try:
        kms = LocalKms(path, create=True)
        assert kms.created is not None
        _audit(cfg, catalog, "generate", kms.created.key_id)
    finally:
        catalog.close()
    console.print(f"wrote {path} (mode 600) with KEK {kms.created.key_id}; back it up apart from the data")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    from gateway.archive import open_kms
    from gateway.archive.catalog import Catalog
    from gateway.archive.encrypted import DataKeys

    cfg = _node(args)
    catalog = Catalog.open(cfg.database.url)
    try:
        kms = open_kms(cfg.encryption)
        old = kms.active()
        new = kms.generate()
        result = DataKeys(catalog, kms).rewrap(new.key_id)
        _audit(
            cfg,
            catalog,
            "rotate",
            new.key_id,
            previous=old,
            rewrapped=result.rewrapped,
            unreadable=result.unreadable,
        )
    finally:
        catalog.close()
    print(f"new active KEK {new.key_id} (was {old}); re-wrapped {result.rewrapped} data keys")
    if result.unreadable:
        console.print(f"{result.unreadable} data keys were under destroyed KEKs and stay unreadable")
    console.print(f"{old} is retired: keep it until backups sealed under it have expired, then destroy it")
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    from gateway.archive import open_kms
    from gateway.archive.catalog import Catalog
    from gateway.archive.encrypted import DataKeys
    from gateway.security.kms import KmsError

    cfg = _node(args)
    catalog = Catalog.open(cfg.database.url)
    try:
        kms = open_kms(cfg.encryption)
        depending = DataKeys(catalog, kms).counts().get(args.key_id, 0)
        if depending and not args.yes:
            console.print(
                f"{depending} stored objects have data keys wrapped by {args.key_id}: destroying it makes "
                "them unreadable for good. Run `ybyx keys rotate` first to keep them, or pass --yes."
            )
            return 2
        try:
            info = kms.destroy(args.key_id)
        except KmsError as exc:
            console.print(str(exc))
            return 2
        _audit(cfg, catalog, "destroy", args.key_id, unreadable=depending)
    finally:
        catalog.close()
    print(f"destroyed KEK {info.key_id}; {depending} objects wrapped by it are now unreadable")
    return 0


def cmd_seal_existing(args: argparse.Namespace) -> int:
    """``ybyx keys seal-existing -c CONFIG``: seal, in place, the objects stored before
    ``[encryption]`` was switched on (each checked against its catalogued SHA-256), and the
    sensitive column values stored plain until then (``gateway/security/columns.py``)."""
    from sqlalchemy import select

    from gateway.archive import Archive
    from gateway.archive.encrypted import EncryptedBlobStore
    from gateway.archive.schema import instance_versions, instances
    from gateway.security.columns import seal_existing as seal_columns

    cfg = _node(args)
    if not cfg.encryption.enabled:
        console.print(f"{args.config}: encryption.enabled is false: switch it on first")
        return 2
    archive = Archive.open(cfg.storage, cfg.database, encryption=cfg.encryption)
    sealed = skipped = 0
    mismatched: list[str] = []
    try:
        store = archive.store
        assert isinstance(store, EncryptedBlobStore)
        with archive.catalog.engine.connect() as conn:
            rows = [
                *conn.execute(select(instances.c.blob_key, instances.c.sha256)).all(),
                *conn.execute(select(instance_versions.c.blob_key, instance_versions.c.sha256)).all(),
            ]
        for key, sha in rows:
            done = store.seal_existing(key)
            if done is None:
                skipped += 1
                continue
            sealed += 1
            if done[1] != sha:
                mismatched.append(key)
        fields = seal_columns(archive.catalog)  # TOTP secrets, exam free text (R-SE-10)
        _audit(cfg, archive.catalog, "seal-existing", store.keys.kms.active(), sealed=sealed, fields=fields)
    finally:
        archive.close()
    print(f"sealed {sealed} objects in place, {skipped} were sealed already; sealed {fields} column values")
    for key in mismatched:
        console.print(f"[red]{key}: its bytes did not match the catalogued SHA-256 before sealing[/red]")
    return 1 if mismatched else 0


def cmd_list(args: argparse.Namespace) -> int:
    from gateway.archive import open_kms
    from gateway.archive.catalog import Catalog
    from gateway.archive.encrypted import DataKeys

    cfg = _node(args)
    catalog = Catalog.open(cfg.database.url)
    try:
        kms = open_kms(cfg.encryption)
        counts = DataKeys(catalog, kms).counts()
        for key in kms.list_keys():
            print(f"{key.key_id}\t{key.state}\t{key.created}\t{counts.get(key.key_id, 0)} data keys")
    finally:
        catalog.close()
    return 0


def add_parsers(ksub: Any) -> None:
    """``rotate``, ``destroy`` and ``list`` under ``ybyx keys`` (``generate -c`` is in gateway.cli)."""
    for name, text, func in (
        ("rotate", "new active KEK; re-wrap every data key under it (objects are not rewritten)", cmd_rotate),
        ("destroy", "destroy a KEK: what it still wraps becomes unreadable", cmd_destroy),
        ("list", "the KEKs and how many data keys each wraps", cmd_list),
        (
            "seal-existing",
            "seal in place the objects stored before encryption was switched on",
            cmd_seal_existing,
        ),
    ):
        k = ksub.add_parser(name, help=text)
        k.add_argument("-c", "--config", required=True, help="the node's TOML file ([encryption])")
        k.add_argument("--role", choices=DEMO_NODES, help="which node of a demo config")
        if name == "destroy":
            k.add_argument("key_id")
            k.add_argument("--yes", action="store_true", help="also when stored objects depend on it")
        k.set_defaults(func=func)
