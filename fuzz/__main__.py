"""``python -m fuzz [--minutes N] [--target stow|cstore] [--corpus DIR]``: longer atheris runs.

Each target runs in its own process for ``--minutes`` (libFuzzer ``-max_total_time``) on a corpus
kept in ``DIR/<target>`` (default ``var/fuzz``; seeded on first use), so later runs start where
earlier ones stopped. A finding is saved as ``DIR/<target>-findings/crash-<sha1>``; replay it with
``python -m fuzz.<target> DIR/<target>-findings/crash-…``. Exit 1 if any target found something.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from fuzz.common import ROOT

TARGETS = ("stow", "cstore")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="per target (default 10)")
    p.add_argument("--target", choices=TARGETS, action="append", help="repeatable; default: all")
    p.add_argument("--corpus", type=Path, default=ROOT / "var" / "fuzz", help="corpus folder")
    p.add_argument("--jobs", type=int, default=1, help="libFuzzer -jobs/-workers per target")
    args = p.parse_args(argv)
    failed = []
    for target in args.target or TARGETS:
        corpus = args.corpus / target
        findings = args.corpus / f"{target}-findings"
        findings.mkdir(parents=True, exist_ok=True)
        if not corpus.is_dir() or not any(corpus.iterdir()):
            from fuzz.common import write_seeds

            write_seeds(corpus, target)
        cmd = [
            sys.executable,
            "-m",
            f"fuzz.{target}",
            f"-max_total_time={int(args.minutes * 60)}",
            f"-artifact_prefix={findings}/",
            "-print_final_stats=1",
            str(corpus),
        ]
        if args.jobs > 1:
            cmd[4:4] = [f"-jobs={args.jobs}", f"-workers={args.jobs}"]
        print(f"fuzz {target}: {' '.join(cmd[3:])}", flush=True)
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        print(f"fuzz {target}: exit {rc}", flush=True)
        if rc != 0:
            failed.append(target)
    if failed:
        print(f"findings in {', '.join(failed)}: see {args.corpus}/<target>-findings/", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
