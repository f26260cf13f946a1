"""atheris target: the C-STORE data set ingest (``Ingest.accept_file`` on a temporary archive).

``python -m fuzz.cstore [-runs=N] [-max_total_time=S] [corpus dir …]``; see :mod:`fuzz`.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["gateway.ingest", "gateway.archive.record", "pydicom"]):
    import gateway.ingest  # noqa: F401  (instrumented before anything else imports it)

from fuzz.common import Archive, run, work_folder

ARCHIVE = Archive(work_folder())
INPUT = ARCHIVE.work / "input.dcm"


def one_input(data: bytes) -> None:
    INPUT.write_bytes(data)
    ARCHIVE.accept(INPUT, source="ATHERIS")


if __name__ == "__main__":
    run("cstore", one_input, sys.argv)
