"""``ybyx keys generate|rotate|destroy|list -c CONFIG``: the KEK lifecycle of a node (R-SE-14).

Issue 6 §5. The commands act on the node's ``[encryption]`` KMS and its catalog's ``data_keys``:

* ``generate`` makes the key file with a first KEK (a node also does this on first start);
* ``rotate`` makes a new active KEK and re-wraps every data key under it — objects are not
  rewritten, so it takes seconds per hundred thousand objects whatever their size;
* ``destroy KEK_ID`` removes a KEK's material: objects whose data keys are still wrapped by it
  become unreadable for good (crypto-shredding). It refuses while data keys depend on the KEK
  unless ``--yes`` is given (rotate first to keep them);
* ``list`` shows the KEKs and how many data keys each wraps.

With ``--purpose token-signing|audit-checkpoint|pseudonym`` the same commands act on the node's
*managed keys* in its KMS (``gateway/security/managed.py``): ``generate`` makes the first one,
``rotate`` makes a new active key (the retired one still verifies until destroyed), ``destroy``
removes a key's secret half, ``import --from FILE`` takes a key made elsewhere into the KMS (the
national pseudonym key, distributed to every front-end; or a PEM signing key being migrated).
The pseudonym key is refused by ``rotate`` (:data:`~gateway.security.kms.NOT_ROTATABLE`).

Every operation is audited (``key-operation``, R-SE-4) with the key id, never the material.
"""

from __future__ import annotations

import argparse
import getpass
from typing import Any

from rich.console import Console

from gateway.config import DEMO_TABLES, CenterConfig, ConfigError, DemoConfig, FrontendConfig, IndexConfig
from gateway.security.kms import NOT_ROTATABLE, PURPOSES

console = Console(stderr=True)
NodeConfig = FrontendConfig | CenterConfig | IndexConfig
KEK = "kek"
TRANSFER = "transfer"  # an institution's transfer key (gateway/security/transfer_keys.py)


def _node(args: argparse.Namespace) -> NodeConfig:
    from gateway.config import load_config

    cfg = load_config(args.config)
    if isinstance(cfg, DemoConfig):
        role = getattr(args, "role", None)
        if role is None:
            raise ConfigError([f"{args.config}: role: a demo config holds several nodes: give --role"])
        return cfg.node(role)
    return cfg


def _purpose(args: argparse.Namespace) -> str:
    return str(getattr(args, "purpose", None) or KEK)


def _audit(cfg: NodeConfig, catalog: Any, operation: str, key_id: str, **detail: Any) -> None:
    from gateway.audit import Actor, AuditLog, EventType, Result

    if isinstance(cfg, FrontendConfig):
        institution = cfg.institution
    else:
        institution = cfg.province if isinstance(cfg, CenterConfig) else "national"
    who = Actor(f"cli:{getpass.getuser()}", "system-admin", institution, "local")
    kms = None
    if cfg.audit.signing_key_source == "kms":
        from gateway.archive import open_kms

        kms = open_kms(cfg.encryption, catalog)
    audit = AuditLog.open(cfg.audit, catalog, system=who, kms=kms)
    purpose = detail.pop("purpose", KEK)
    audit.record(
        EventType.KEY_OPERATION,
        actor=who.actor,
        role=who.role,
        institution=who.institution,
        resource=f"{purpose}:{key_id}",
        result=Result.SUCCESS,
        source=who.source,
        detail={
            "operation": operation,
            "key_id": key_id,
            **({"purpose": purpose} if purpose != KEK else {}),
            **detail,
        },
    )


def generate_kek(args: argparse.Namespace) -> int:
    """``ybyx keys generate -c CONFIG``: the node's key file with its first KEK (or, with
    ``--purpose``, the first managed key of that purpose)."""
    from gateway.archive.catalog import Catalog
    from gateway.security.kms import LocalKms

    cfg = _node(args)
    if _purpose(args) != KEK:
        return _managed(cfg, args, "generate")
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
    if _purpose(args) != KEK:
        return _managed(cfg, args, "rotate")
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
    if _purpose(args) != TRANSFER and not args.key_id:
        console.print("destroy: give the KEY_ID (`ybyx keys list` shows them)")
        return 2
    if _purpose(args) != KEK:
        return _managed(cfg, args, "destroy")
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
    if isinstance(cfg, IndexConfig):
        console.print(f"{args.config}: an index seals its records' report text at every start")
        return 2
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
        for purpose in PURPOSES:
            for key in kms.managed_keys(purpose):
                print(f"{key.key_id}\t{key.state}\t{key.created}\t{purpose}")
        for t in DataKeys(catalog, kms).transfer.list():
            created = f"{t.created:%Y-%m-%dT%H:%M:%SZ}"
            print(f"{t.key_id}\t{t.state}\t{created}\ttransfer {t.institution}\t{t.objects} data keys")
    finally:
        catalog.close()
    return 0


def _managed(cfg: NodeConfig, args: argparse.Namespace, operation: str) -> int:
    """generate / rotate / destroy / import of a managed key (see the module docstring)."""
    from gateway.archive import open_kms
    from gateway.archive.catalog import Catalog
    from gateway.security.kms import KmsError

    purpose = _purpose(args)
    if purpose == TRANSFER:
        return _transfer(cfg, args, operation)
    if operation == "rotate" and purpose in NOT_ROTATABLE:
        console.print(f"refused: {NOT_ROTATABLE[purpose]}")
        return 2
    catalog = Catalog.open(cfg.database.url)
    try:
        kms = open_kms(cfg.encryption, catalog)
        keys = kms.managed_keys(purpose)
        active = next((k.key_id for k in keys if k.state == "active"), None)
        detail: dict[str, Any] = {"purpose": purpose}
        if operation in ("generate", "import") and active is not None:
            hint = NOT_ROTATABLE.get(
                purpose, "use `ybyx keys rotate --purpose " + purpose + "` for a new one"
            )
            console.print(f"refused: the KMS already holds an active {purpose} key {active}; {hint}")
            return 2
        if operation == "destroy":
            why = _destroy_refusal(cfg, kms, purpose, args.key_id, active)
            if why and not args.yes:
                console.print(f"refused: {why}; pass --yes to destroy it anyway")
                return 2
            try:
                info = kms.destroy_managed(purpose, args.key_id)
            except KmsError as exc:
                console.print(str(exc))
                return 2
            _audit(cfg, catalog, "destroy", info.key_id, **detail)
            print(f"destroyed {purpose} key {info.key_id}")
            return 0
        material = _import_material(purpose, args.source) if operation == "import" else None
        info = kms.create_managed(purpose, material)
        if active is not None:
            detail["previous"] = active
        _audit(cfg, catalog, operation, info.key_id, **detail)
    except (KmsError, ValueError) as exc:
        console.print(str(exc))
        return 2
    finally:
        catalog.close()
    print(f"new active {purpose} key {info.key_id}" + (f" (was {active})" if active else ""))
    if active and purpose == "token-signing":
        console.print(f"{active} is retired: it still verifies tokens it signed until you destroy it")
    if purpose == "pseudonym":
        console.print("back the key file up apart from the data: every pseudonym depends on this key")
    return 0


def _transfer(cfg: NodeConfig, args: argparse.Namespace, operation: str) -> int:
    """An institution's transfer key (R-CE-2, ``gateway/security/transfer_keys.py``)."""
    from gateway.archive import open_kms
    from gateway.archive.catalog import Catalog
    from gateway.archive.encrypted import DataKeys
    from gateway.security.kms import KmsError

    institution = getattr(args, "institution", None)
    if not institution:
        console.print("--purpose transfer needs --institution CODE")
        return 2
    if isinstance(cfg, IndexConfig) or not cfg.encryption.enabled:
        console.print(f"{args.config}: transfer keys seal stored objects: set [encryption] enabled = true")
        return 2
    catalog = Catalog.open(cfg.database.url)
    try:
        keys = DataKeys(catalog, open_kms(cfg.encryption, catalog)).transfer
        detail: dict[str, Any] = {"purpose": TRANSFER, "institution": institution}
        active = keys.active(institution)
        if operation == "generate":
            if active is not None:
                console.print(
                    f"refused: institution {institution} has transfer key {active}; "
                    "use `ybyx keys rotate --purpose transfer` for a new one"
                )
                return 2
            key_id = keys.generate(institution)
            _audit(cfg, catalog, "generate", key_id, **detail)
            print(f"transfer key {key_id} of institution {institution}: its uploads are sealed under it")
        elif operation == "rotate":
            key_id, rewrapped, pruned = keys.rotate(institution)
            _audit(cfg, catalog, "rotate", key_id, previous=active, rewrapped=rewrapped, **detail)
            print(
                f"new transfer key {key_id} of institution {institution} (was {active}); "
                f"re-wrapped {rewrapped} data keys; removed {pruned} unused retired keys"
            )
        else:
            depending = sum(k.objects for k in keys.list() if k.institution == institution)
            if depending and not args.yes:
                console.print(
                    f"{depending} stored objects of institution {institution} are sealed under its "
                    "transfer key: destroying it makes them unreadable for good. Pass --yes to do so."
                )
                return 2
            destroyed, lost = keys.destroy(institution)
            for key_id in destroyed:
                _audit(cfg, catalog, "destroy", key_id, unreadable=lost, **detail)
            print(f"destroyed the transfer keys of institution {institution}; {lost} objects are unreadable")
    except KmsError as exc:
        console.print(str(exc))
        return 2
    finally:
        catalog.close()
    return 0


def _destroy_refusal(cfg: NodeConfig, kms: Any, purpose: str, key_id: str, active: str | None) -> str:
    """Why destroying a managed key needs ``--yes`` ("" when it does not)."""
    from datetime import UTC, datetime

    if purpose == "pseudonym":
        return "the pseudonym key links every person key: without it no new exam can be pseudonymised"
    if key_id == active:
        return f"{key_id} is the active {purpose} key (rotate first)"
    if purpose == "token-signing":
        retired = kms.retired_at(purpose, key_id) if hasattr(kms, "retired_at") else ""
        lifetime = max(cfg.security.token_lifetime_seconds, cfg.security.users.token_lifetime_seconds)
        if retired:
            age = datetime.now(UTC) - datetime.strptime(retired, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
            if age.total_seconds() < lifetime:
                ago = int(age.total_seconds())
                return f"{key_id} was retired {ago} s ago: tokens it signed live {lifetime} s"
    return ""


def _import_material(purpose: str, source: str | None) -> bytes:
    """The raw key of a file: a hex pseudonym key file, or an Ed25519 private key (PEM)."""
    from pathlib import Path

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if not source:
        raise ValueError("import: give --from FILE")
    path = Path(source)
    if PURPOSES[purpose] == "hmac-sha256":
        from gateway.identity import load_key

        return load_key(path)
    if path.stat().st_mode & 0o077:
        raise ValueError(f"{path}: key file is readable by others (chmod 600)")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def cmd_import(args: argparse.Namespace) -> int:
    """``ybyx keys import --purpose P --from FILE -c CONFIG``: a key made elsewhere into the KMS."""
    return _managed(_node(args), args, "import")


def add_parsers(ksub: Any) -> None:
    """``rotate``, ``destroy``, ``list``, ``import`` under ``ybyx keys`` (``generate`` is in gateway.cli)."""
    for name, text, func in (
        ("rotate", "new active KEK (re-wraps every data key) or managed key (--purpose)", cmd_rotate),
        ("destroy", "destroy a KEK (what it wraps becomes unreadable) or a managed key", cmd_destroy),
        ("list", "the KEKs (with how many data keys each wraps) and the managed keys", cmd_list),
        ("import", "take a key made elsewhere into the KMS (the national pseudonym key)", cmd_import),
        (
            "seal-existing",
            "seal in place the objects stored before encryption was switched on",
            cmd_seal_existing,
        ),
    ):
        k = ksub.add_parser(name, help=text)
        k.add_argument("-c", "--config", required=True, help="the node's TOML file ([encryption])")
        k.add_argument("--role", choices=list(DEMO_TABLES), help="which node of a demo config")
        if name in ("rotate", "destroy", "import"):
            add_purpose(k, required=name == "import")
        if name == "import":
            k.add_argument("--from", dest="source", required=True, help="the key file (hex or PEM)")
        if name == "destroy":
            k.add_argument("key_id", nargs="?", help="the key (not with --purpose transfer)")
            k.add_argument("--yes", action="store_true", help="also when stored objects depend on it")
        k.set_defaults(func=func)


def add_purpose(parser: Any, *, required: bool = False) -> None:
    """``--purpose``: the KEK (default), a managed key of the KMS, or an institution's transfer key
    (``--institution``)."""
    choices = list(PURPOSES) if required else [KEK, *PURPOSES, TRANSFER]
    parser.add_argument(
        "--purpose",
        choices=choices,
        required=required,
        default=None if required else KEK,
        help="which key: the KEK (default), a managed key of the KMS, or a transfer key",
    )
    if not required:
        parser.add_argument("--institution", help="with --purpose transfer: whose transfer key (R-CE-2)")
