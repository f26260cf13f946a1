"""Coverage-guided fuzzing with atheris (issue 6: "hypothesis (and atheris where it builds) over
STOW bodies and C-STORE datasets"; hardened input §8, R-SE-16).

Each target of ``fuzz/`` runs in a subprocess for a bounded number of inputs (seconds, not
minutes), from the seed corpus, with a fixed libFuzzer seed so a CI failure can be replayed; the
invariants (no crash, no partial write, a clear error) are asserted inside the target, and a
violation makes libFuzzer exit non-zero and save the input. The canary test proves that path:
with ``YBYX_FUZZ_CANARY=1`` the first refusal is treated as a finding. Longer runs:
``python -m fuzz --minutes N`` (docs/security.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"stow": 3000, "cstore": 1000}  # cstore ingests (SQLite commits, blob writes): slower per input


def fuzz(
    target: str, tmp_path: Path, *flags: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    findings = tmp_path / "findings"
    findings.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", f"fuzz.{target}", "-seed=1", f"-artifact_prefix={findings}/", *flags],
        cwd=ROOT,
        env={**os.environ, "YBYX_FUZZ_WORK": str(tmp_path / "work"), **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("target", ["stow", "cstore"])
def test_atheris_target_runs_clean(target: str, tmp_path: Path) -> None:
    proc = fuzz(target, tmp_path, f"-runs={RUNS[target]}")
    tail = proc.stderr[-4000:]
    assert proc.returncode == 0, (proc.stdout[-3000:], tail)
    assert "Uncaught Python exception" not in proc.stdout
    assert f"Done {RUNS[target]} runs" in proc.stderr, tail
    assert "INITED" in proc.stderr and "cov:" in proc.stderr  # instrumented: coverage is reported
    assert not list((tmp_path / "findings").iterdir())
    seeds = list((tmp_path / "work" / "corpus").iterdir())
    assert len(seeds) >= 5  # started from the seed corpus (tests' instances + sample headers)


def test_a_broken_invariant_stops_the_run_and_keeps_the_input(tmp_path: Path) -> None:
    proc = fuzz("cstore", tmp_path, "-runs=200", env={"YBYX_FUZZ_CANARY": "1"})
    assert proc.returncode != 0
    # atheris prints the Python traceback on stdout, libFuzzer's report on stderr
    assert "AssertionError: canary: refused" in proc.stdout, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Uncaught Python exception" in proc.stdout
    saved = list((tmp_path / "findings").glob("crash-*"))
    assert len(saved) == 1
    # the saved input replays to the same finding
    replay = fuzz("cstore", tmp_path / "replay", str(saved[0]), env={"YBYX_FUZZ_CANARY": "1"})
    assert replay.returncode != 0 and "canary: refused" in replay.stdout
