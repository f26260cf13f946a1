"""``ybyx admin create-user | list-users | disable-user | reset-password | enroll-totp`` (issue 6 §2).

R-SE-1, R-SE-2.

There are no default accounts: the first system administrator is made here, on the node's own
machine, with a password typed twice (not echoed) or generated and shown once. Admin roles are
always enrolled in TOTP: the secret and its ``otpauth://`` URI are shown once, for an authenticator
app. Every change is an audit record (``config-change``) through the one audit call, as the
operating-system user who ran the command.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from gateway.config import DEMO_NODES, CenterConfig, ConfigError, DemoConfig, FrontendConfig, load_config


def _role_config(path: str, role: str | None) -> FrontendConfig | CenterConfig:
    cfg = load_config(path)
    if isinstance(cfg, DemoConfig):
        if role is None:
            raise ConfigError(
                [f"{path}: role: a demo config holds several nodes: give --node " + "|".join(DEMO_NODES)]
            )
        cfg = cfg.node(role)
    if not isinstance(cfg, FrontendConfig | CenterConfig):
        raise ConfigError([f"{path}: role: users live on a front-end or center, not {cfg.role!r}"])
    return cfg


def _password(args: argparse.Namespace, username: str) -> tuple[str, bool]:
    """(password, generated?) from --generate-password, --password-stdin or typed twice."""
    from gateway.security.passwords import WeakPassword, check_strength, generate

    if args.generate_password:
        return generate(), True
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n"), False
    for _ in range(3):
        first = getpass.getpass(f"password for {username}: ")
        try:
            check_strength(first, username=username)
        except WeakPassword as exc:
            print(f"refused: {exc}", file=sys.stderr)
            continue
        if getpass.getpass("again: ") == first:
            return first, False
        print("the two passwords differ", file=sys.stderr)
    raise SystemExit(2)


def _audit(
    cfg: FrontendConfig | CenterConfig, catalog: Any, action: str, username: str, **detail: Any
) -> None:
    from gateway.audit import Actor, AuditLog, EventType, Result, system_actor

    audit = AuditLog.open(cfg.audit, catalog, system=system_actor(cfg))
    who = Actor(f"cli:{getpass.getuser()}", "system", "", "local")
    audit.record_as(
        who,
        EventType.CONFIG_CHANGE,
        resource=f"user:{username}",
        result=Result.SUCCESS,
        detail={"action": action, **detail},
    )


def _show(username: str, password: str | None, secret: str | None) -> None:
    """What must be shown once: a generated password, a TOTP secret."""
    from gateway.security.totp import provisioning_uri

    print(f"user      {username}")
    if password is not None:
        print(f"password  {password}")
        print("The password is shown this once and stored only as a hash: keep it now.", file=sys.stderr)
    if secret is not None:
        print(f"totp      {secret}")
        print(f"otpauth   {provisioning_uri(secret, username)}")
        print("Add the TOTP secret to an authenticator app now; it is not shown again.", file=sys.stderr)


def _run(args: argparse.Namespace, cfg: FrontendConfig | CenterConfig, catalog: Any) -> int:
    from gateway.security.users import UserStore

    store = UserStore(catalog)
    command, name = args.admin_command, getattr(args, "username", "")
    if command == "list-users":
        for u in store.list():
            state = "disabled" if u.disabled else ("locked" if u.locked_until else "active")
            mfa = "totp" if u.totp_enrolled else "-"
            print(f"{u.username}\t{u.role}\t{u.institution or '-'}\t{mfa}\t{state}")
        return 0
    if command == "disable-user":
        if not store.disable(name):
            print(f"no active user {name!r}", file=sys.stderr)
            return 2
        _audit(cfg, catalog, "disable-user", name)
        print(f"disabled {name}: its sessions end at their next request")
        return 0
    if command == "enroll-totp":
        secret = store.enroll_totp(name)
        _audit(cfg, catalog, "enroll-totp", name)
        _show(name, None, secret)
        return 0
    password, generated = _password(args, name)
    if command == "reset-password":
        store.set_password(name, password)
        _audit(cfg, catalog, "reset-password", name)
        _show(name, password if generated else None, None)
        return 0
    user, totp_secret = store.create(
        name,
        args.role,
        password,
        institution=args.institution or "",
        person_key=args.person_key,
        with_totp=args.totp,
    )
    detail = {"role": user.role.value, "institution": user.institution, "totp": totp_secret is not None}
    _audit(cfg, catalog, "create-user", name, **detail)
    _show(name, password if generated else None, totp_secret)
    return 0


def cmd_admin(args: argparse.Namespace) -> int:
    from gateway.archive.catalog import Catalog
    from gateway.security.passwords import WeakPassword
    from gateway.security.users import UserError

    cfg = _role_config(args.config, args.node)
    catalog = Catalog.open(cfg.database.url)
    if cfg.encryption.enabled:  # TOTP secrets are stored sealed (R-SE-10)
        from gateway.archive import column_cipher

        catalog.columns = column_cipher(catalog, cfg.encryption)
    try:
        return _run(args, cfg, catalog)
    except (UserError, WeakPassword) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    finally:
        catalog.close()


def add_parser(sub: Any) -> None:
    """``ybyx admin …`` (called from ``gateway.cli.build_parser``)."""
    from gateway.security.permissions import Role

    p = sub.add_parser("admin", help="user accounts: create-user, list-users, disable-user, reset-password")
    asub = p.add_subparsers(dest="admin_command", required=True)
    for name, text in (
        ("create-user", "make an account (password typed twice, or generated and shown once)"),
        ("list-users", "list the accounts"),
        ("disable-user", "disable an account and end its sessions"),
        ("reset-password", "set a new password (typed twice, or generated) and unlock"),
        ("enroll-totp", "give an account a new TOTP secret (shown once), replacing any"),
    ):
        c = asub.add_parser(name, help=text)
        c.add_argument("-c", "--config", required=True, help="the node's TOML file")
        c.add_argument("--node", choices=DEMO_NODES, help="which node of a demo config")
        if name != "list-users":
            c.add_argument("username")
        if name == "create-user":
            c.add_argument("--role", required=True, choices=[r.value for r in Role])
            c.add_argument("--institution", help="institution code (institution-admin, doctor)")
            c.add_argument("--person-key", help="a patient's pseudonym (64 hex), to see their own studies")
            c.add_argument("--totp", action="store_true", help="enrol TOTP (always done for admin roles)")
        if name in ("create-user", "reset-password"):
            how = c.add_mutually_exclusive_group()
            how.add_argument("--generate-password", action="store_true", help="generate one, shown once")
            how.add_argument("--password-stdin", action="store_true", help="read it from standard input")
        c.set_defaults(func=cmd_admin)
