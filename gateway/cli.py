"""``ybyx``: the one command (ARCHITECTURE "One product, three roles, one command")."""

from __future__ import annotations

import argparse
import logging
import re
import signal
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from gateway.config import (
    DEMO_NODES,
    DEMO_TABLES,
    CenterConfig,
    ConfigError,
    DemoConfig,
    FrontendConfig,
    IndexConfig,
    load_config,
)
from gateway.qc.rules import qc_rules_role

_C = TypeVar("_C")
_R = TypeVar("_R")

console = Console(stderr=True)
_TARGET = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        for noisy, level in (
            ("httpx", logging.WARNING),
            ("pynetdicom", logging.WARNING),
            ("alembic", logging.WARNING),
            ("urllib3", logging.ERROR),
        ):  # S3 retries are reported by us, once
            logging.getLogger(noisy).setLevel(level)


def _stop_on_signal() -> Callable[[], None]:
    """Catch SIGINT/SIGTERM from now on; returns a function that waits for one.

    The handler runs on the main thread, so it must not take a lock the main thread may hold
    (``Event.set()`` inside ``Event.wait()`` deadlocks now and then: a demo that ignored Ctrl-C).
    Installed before anything is printed, so a Ctrl-C right after "Press Ctrl-C" is not lost.
    """
    return _signals()[0]


def _signals() -> tuple[Callable[[], None], Callable[[], bool]]:
    """:func:`_stop_on_signal`'s wait, and a check whether a signal came (for long start-ups)."""
    stopped: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stopped.append(signum))

    def wait() -> None:
        while not stopped:
            time.sleep(0.2)

    return wait, lambda: bool(stopped)


def _wait_for_signal() -> None:
    _stop_on_signal()()


def cmd_config_check(args: argparse.Namespace) -> int:
    bad = 0
    for path in args.files:
        try:
            role = qc_rules_role(path) or load_config(path).role  # config/qc.toml: QC rules (issue 4)
        except ConfigError as exc:
            bad += 1
            for line in exc.problems:
                print(line, file=sys.stderr)
            continue
        print(f"{path}: ok ({role})")
    return 2 if bad else 0


def _frontend_config(path: str) -> FrontendConfig:
    cfg = load_config(path)
    if not isinstance(cfg, FrontendConfig):
        raise ConfigError([f'{path}: role: this command needs role = "frontend" (got {cfg.role!r})'])
    return cfg


def _start(starter: Callable[[_C], _R], cfg: _C, source: str) -> _R:
    """Start a role; a catalog or store that cannot be opened is reported as a config problem."""
    from gateway.archive import ArchiveUnavailable

    try:
        return starter(cfg)
    except ArchiveUnavailable as exc:
        raise ConfigError([f"{source}: {exc.key}: {exc.reason}"]) from exc


def cmd_frontend(args: argparse.Namespace) -> int:
    from gateway.frontend import Frontend

    cfg = _frontend_config(args.config)
    fe = _start(Frontend.start, cfg, args.config)
    if fe.ingest.helpers is not None:
        # a long-running node: start the ingest helpers now, not at the first parallel burst
        fe.ingest.helpers.start()
    console.print(
        f"front-end {cfg.dicom.ae_title}: DICOM on {cfg.dicom.host}:{fe.dicom_port}, "
        f"HTTP on {cfg.http.host}:{fe.http_port}"
    )
    try:
        _wait_for_signal()
    finally:
        fe.stop()
    return 0


def cmd_center(args: argparse.Namespace) -> int:
    from gateway.center import Center

    cfg = load_config(args.config)
    if not isinstance(cfg, CenterConfig):
        raise ConfigError([f'{args.config}: role: this command needs role = "center" (got {cfg.role!r})'])
    center = _start(Center.start, cfg, args.config)
    console.print(f"sharing center {cfg.province} serving DICOMweb at {center.url}/dicom-web")
    try:
        _wait_for_signal()
    finally:
        center.stop()
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    """``ybyx index -c FILE``: the national index (issue 5 §2)."""
    from index.service import NationalIndex

    cfg = load_config(args.config)
    if not isinstance(cfg, IndexConfig):
        raise ConfigError([f'{args.config}: role: this command needs role = "index" (got {cfg.role!r})'])
    index = _start(NationalIndex.start, cfg, args.config)
    console.print(f"national index serving {index.url}/api/v1 ({len(cfg.provinces)} provinces)")
    try:
        _wait_for_signal()
    finally:
        index.stop()
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from dimse.scu import dicom_files, send

    m = _TARGET.match(args.to)
    if not m:
        console.print(f"--to: {args.to!r} is not AE@HOST:PORT")
        return 2
    files = dicom_files(Path(p) for p in args.paths)
    if not files:
        console.print("nothing to send: no files found")
        return 2
    with Progress(
        TextColumn("[bold]sending"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=args.quiet,
    ) as bar:
        task = bar.add_task("send", total=len(files))
        report = send(
            files,
            m["host"],
            int(m["port"]),
            m["ae"],
            calling_ae=args.calling_ae,
            journal=Path(args.journal) if args.journal else None,
            progress=lambda _p, _ok: bar.advance(task),
            tls=_send_tls(args),
        )
    for path, reason in report.failed.items():
        console.print(f"[red]failed[/red] {path}: {reason}")
    console.print(
        f"sent {len(report.sent)}, skipped {len(report.skipped)} (journal), failed {len(report.failed)}"
    )
    return 0 if report.ok else 1


def _send_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """DICOM TLS for ``ybyx send`` (issue 6 §6): the peer checked against ``--tls-ca``."""
    if not (args.tls or args.tls_ca or args.tls_cert):
        return None
    from gateway.security.tls import client_context

    cert = Path(args.tls_cert) if args.tls_cert else None
    key = Path(args.tls_key) if args.tls_key else None
    return client_context(Path(args.tls_ca) if args.tls_ca else None, cert_file=cert, key_file=key)


def cmd_certs_dev(args: argparse.Namespace) -> int:
    """``ybyx certs dev --out DIR``: a development CA, server and client certificate (issue 6 §6)."""
    from gateway.security.tls import write_dev_certs

    try:
        made = write_dev_certs(Path(args.out), hosts=args.host or None, days=args.days)
    except FileExistsError as exc:
        console.print(str(exc))
        return 2
    for path in vars(made).values():
        print(path)
    console.print(
        f"development certificates in {args.out} (keys mode 600) — for tests and the demo only; "
        "production certificates come from the province's PKI"
    )
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from gateway.identity import write_new_key

    if args.config:  # the node's KEK file (issue 6 §5, gateway/keys_cli.py)
        from gateway.keys_cli import generate_kek

        return generate_kek(args)
    if not args.out:
        console.print("give --out FILE (a pseudonym key) or -c CONFIG (the node's encryption KEK)")
        return 2
    path = Path(args.out)
    if path.exists():
        console.print(
            f"{path}: exists; refusing to overwrite a key (data pseudonymised with it would be orphaned)"
        )
        return 2
    write_new_key(path)
    console.print(f"wrote a new 256-bit key to {path} (mode 600); back it up: pseudonyms depend on it")
    return 0


def cmd_keys_generate_signing(args: argparse.Namespace) -> int:
    from gateway.security.tokens import write_signing_key

    path = Path(args.out)
    if path.exists():
        console.print(f"{path}: exists; refusing to overwrite a signing key")
        return 2
    key = write_signing_key(path)
    console.print(
        f"wrote an Ed25519 signing key to {path} (mode 600), kid {key.kid}; public key {path}.pub.\n"
        "To rotate: point [security] signing_key_file at the new key and list the old one under "
        "previous_signing_keys until the tokens it signed have expired."
    )
    return 0


def _node_catalog(args: argparse.Namespace) -> tuple[str, str]:
    """(role, catalog URL) of the node whose clients ``ybyx clients`` manages."""
    cfg = load_config(args.config)
    if isinstance(cfg, DemoConfig):
        if args.role is None:
            raise ConfigError([f"{args.config}: role: a demo config holds several nodes: give --role"])
        cfg = cfg.node(args.role)
    if not isinstance(cfg, FrontendConfig | CenterConfig | IndexConfig):
        raise ConfigError(
            [f"{args.config}: role: clients live on a front-end, center or index, not {cfg.role!r}"]
        )
    return cfg.role, cfg.database.url


def cmd_clients(args: argparse.Namespace) -> int:
    """``ybyx clients add|list|reset-secret|revoke``: who may obtain tokens here (issue 6 §1)."""
    from gateway.archive.catalog import Catalog
    from gateway.security.clients import ClientError, ClientRegistry
    from gateway.security.credentials import write_secret
    from gateway.security.guard import ROLE_SCOPES

    role, url = _node_catalog(args)
    out = Path(args.secret_out) if getattr(args, "secret_out", None) else None
    if out is not None and out.exists():
        console.print(f"{out}: exists; refusing to overwrite")
        return 2
    catalog = Catalog.open(url)
    try:
        registry = ClientRegistry(catalog, ROLE_SCOPES[role])
        try:
            if args.clients_command == "list":
                for c in registry.list(include_revoked=args.all):
                    state = f"revoked {c.revoked_at:%Y-%m-%d %H:%M}" if c.revoked_at else "active"
                    print(f"{c.client_id}\t{c.name}\t{' '.join(sorted(c.scopes))}\t{state}")
                return 0
            if args.clients_command == "revoke":
                if not registry.revoke(args.client_id):
                    console.print(f"no active client {args.client_id!r}")
                    return 2
                console.print(f"revoked {args.client_id}: it gets no more tokens")
                return 0
            if args.clients_command == "add":
                client, secret = registry.add(
                    args.name, args.scopes, client_id=args.client_id, institution=args.institution
                )
                cid = client.client_id
            else:
                cid, secret = args.client_id, registry.reset_secret(args.client_id)
        except ClientError as exc:
            console.print(str(exc))
            return 2
    finally:
        catalog.close()
    print(f"client_id     {cid}")
    if out is not None:
        write_secret(out, secret)
        print(f"client_secret written to {out} (mode 600)")
    else:
        print(f"client_secret {secret}")
        console.print("The secret is shown this once and stored only as a hash: keep it now.")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from gateway.sample import write_samples

    paths = write_samples(Path(args.out), ct_slices=args.ct_slices)
    console.print(f"wrote {len(paths)} files under {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.center import Center
    from gateway.demo import Starters, run_demo
    from gateway.frontend import Frontend
    from index.service import NationalIndex

    cfg = load_config(args.config)
    if not isinstance(cfg, DemoConfig):
        raise ConfigError([f'{args.config}: role: this command needs role = "demo" (got {cfg.role!r})'])
    for fe in (cfg.frontend, cfg.frontend_b):
        key_file = fe.identity.key_file if fe is not None else None
        if key_file is not None and not key_file.exists():
            from gateway.identity import write_new_key

            write_new_key(key_file)  # each demo install gets its own key: no shared default secret
    starters = Starters(
        index=lambda c: _start(NationalIndex.start, c, args.config),
        center=lambda c: _start(Center.start, c, args.config),
        frontend=lambda c: _start(Frontend.start, c, args.config),
    )
    wait, stopping = _signals()
    return run_demo(cfg, start=starters, wait=wait, stopping=stopping, config_path=args.config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ybyx", description="医保影像云 imaging gateway and archive")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("frontend", help="run the hospital front-end (DICOM SCP + archive)")
    p.add_argument("-c", "--config", required=True, help="front-end TOML file")
    p.set_defaults(func=cmd_frontend)

    p = sub.add_parser("center", help="run a province's sharing center (DICOMweb archive)")
    p.add_argument("-c", "--config", required=True, help="center TOML file")
    p.set_defaults(func=cmd_center)

    p = sub.add_parser("index", help="run the national index (索引共享模块)")
    p.add_argument("-c", "--config", required=True, help="index TOML file")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True)
    c = csub.add_parser("check", help="validate config files; prints file: key: reason per problem")
    c.add_argument("files", nargs="+")
    c.set_defaults(func=cmd_config_check)

    p = sub.add_parser("send", help="C-STORE files or folders to a DICOM peer")
    p.add_argument("paths", nargs="+")
    p.add_argument("--to", required=True, metavar="AE@HOST:PORT")
    p.add_argument("--calling-ae", default="YBYX_SCU")
    p.add_argument("--journal", help="file recording what was acknowledged; a rerun skips it")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--tls", action="store_true", help="DICOM TLS, peer checked against the system CAs")
    p.add_argument("--tls-ca", help="DICOM TLS: CA file the peer's certificate must chain to")
    p.add_argument("--tls-cert", help="DICOM TLS: our certificate (mutual TLS)")
    p.add_argument("--tls-key", help="its private key")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("certs", help="TLS certificates")
    tsub = p.add_subparsers(dest="certs_command", required=True)
    t = tsub.add_parser("dev", help="a development CA with a server and a client certificate (PEM)")
    t.add_argument("--out", required=True, help="folder for ca.pem, server.pem, client.pem and keys")
    t.add_argument("--host", action="append", help="server name or address (repeat; default localhost)")
    t.add_argument("--days", type=int, default=365)
    t.set_defaults(func=cmd_certs_dev)

    p = sub.add_parser("keys", help="key management")
    ksub = p.add_subparsers(dest="keys_command", required=True)
    k = ksub.add_parser("generate", help="a new pseudonym key file (--out) or a node's first KEK (-c)")
    k.add_argument("--out", help="write a new random pseudonym key file (mode 600)")
    k.add_argument("-c", "--config", help="make the key file of this node's [encryption] KMS")
    k.add_argument("--role", choices=DEMO_NODES, help="which node of a demo config")
    from gateway.keys_cli import add_purpose  # issue 6 §5: managed keys in the KMS

    add_purpose(k)
    k.set_defaults(func=cmd_keys_generate)
    k = ksub.add_parser("generate-signing", help="write a new Ed25519 token-signing key (PEM, mode 600)")
    k.add_argument("--out", required=True)
    k.set_defaults(func=cmd_keys_generate_signing)
    from gateway.keys_cli import add_parsers as add_key_parsers  # issue 6 §5: KEK lifecycle

    add_key_parsers(ksub)

    p = sub.add_parser("clients", help="OAuth clients that may obtain tokens from a node")
    clsub = p.add_subparsers(dest="clients_command", required=True)
    for name, text in (
        ("add", "register a client; prints its id and secret (shown once)"),
        ("list", "list the clients"),
        ("reset-secret", "give a client a new secret (shown once); the old one stops working"),
        ("revoke", "stop a client from obtaining tokens"),
    ):
        c = clsub.add_parser(name, help=text)
        c.add_argument("-c", "--config", required=True, help="the node's TOML file")
        c.add_argument("--role", choices=list(DEMO_TABLES), help="which node of a demo config")
        if name == "add":
            c.add_argument("name")
            c.add_argument("--scopes", required=True, help='space-separated, e.g. "stow api:inventory"')
            c.add_argument("--client-id", help="choose the id (default: NAME-<random>)")
            c.add_argument(
                "--institution", help="the institution it uploads for: its transfer key seals them (R-CE-2)"
            )
        elif name in ("reset-secret", "revoke"):
            c.add_argument("client_id")
        else:
            c.add_argument("--all", action="store_true", help="include revoked clients")
        if name in ("add", "reset-secret"):
            c.add_argument("--secret-out", help="write the secret to this file (mode 600) instead")
        c.set_defaults(func=cmd_clients)

    p = sub.add_parser("sample", help="write synthetic sample studies (CT, MR, DX, multi-frame, RGB)")
    p.add_argument("--out", required=True)
    p.add_argument("--ct-slices", type=int, default=40)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo", help="run the one-machine demo (center + front-end with sample studies)")
    p.add_argument("-c", "--config", default="config/demo.toml")
    p.set_defaults(func=cmd_demo)

    from gateway.audit_cli import add_parser as add_audit_parser  # issue 6 §4

    add_audit_parser(sub)
    from gateway.export_cli import add_parsers as add_export_parsers  # issue 6 §9

    add_export_parsers(sub)
    from gateway.admin_cli import add_parser as add_admin_parser  # issue 6 §2: users

    add_admin_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
