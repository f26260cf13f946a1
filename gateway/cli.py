"""``ybyx``: the one command (ARCHITECTURE "One product, three roles, one command")."""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from gateway.config import CenterConfig, ConfigError, DemoConfig, FrontendConfig, load_config

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


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def cmd_config_check(args: argparse.Namespace) -> int:
    bad = 0
    for path in args.files:
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            bad += 1
            for line in exc.problems:
                print(line, file=sys.stderr)
            continue
        print(f"{path}: ok ({cfg.role})")
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
        )
    for path, reason in report.failed.items():
        console.print(f"[red]failed[/red] {path}: {reason}")
    console.print(
        f"sent {len(report.sent)}, skipped {len(report.skipped)} (journal), failed {len(report.failed)}"
    )
    return 0 if report.ok else 1


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from gateway.identity import write_new_key

    path = Path(args.out)
    if path.exists():
        console.print(
            f"{path}: exists; refusing to overwrite a key (data pseudonymised with it would be orphaned)"
        )
        return 2
    write_new_key(path)
    console.print(f"wrote a new 256-bit key to {path} (mode 600); back it up: pseudonyms depend on it")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from gateway.sample import write_samples

    paths = write_samples(Path(args.out), ct_slices=args.ct_slices)
    console.print(f"wrote {len(paths)} files under {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.center import Center
    from gateway.demo import run_demo
    from gateway.frontend import Frontend

    cfg = load_config(args.config)
    if not isinstance(cfg, DemoConfig):
        raise ConfigError([f'{args.config}: role: this command needs role = "demo" (got {cfg.role!r})'])
    key_file = cfg.frontend.identity.key_file
    if key_file is not None and not key_file.exists():
        from gateway.identity import write_new_key

        write_new_key(key_file)  # each demo install gets its own key: no shared default secret
    return run_demo(
        cfg,
        start_center=lambda: _start(Center.start, cfg.center, args.config),
        start_frontend=lambda: _start(Frontend.start, cfg.frontend, args.config),
        wait=_wait_for_signal,
    )


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
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("keys", help="key management")
    ksub = p.add_subparsers(dest="keys_command", required=True)
    k = ksub.add_parser("generate", help="write a new random key file (mode 600)")
    k.add_argument("--out", required=True)
    k.set_defaults(func=cmd_keys_generate)

    p = sub.add_parser("sample", help="write synthetic sample studies (CT, MR, DX, multi-frame, RGB)")
    p.add_argument("--out", required=True)
    p.add_argument("--ct-slices", type=int, default=40)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo", help="run the one-machine demo (center + front-end with sample studies)")
    p.add_argument("-c", "--config", default="config/demo.toml")
    p.set_defaults(func=cmd_demo)
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
