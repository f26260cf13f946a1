"""atheris target: a STOW-RS request body, without the HTTP layer.

An input is ``Content-Type value`` LF ``one byte: chunk size - 1`` ``body``. The Content-Type goes
through the same check as ``POST /studies`` (``dicomweb.stow._boundary``: a 400/415 with a
message, or the boundary); the body is streamed in chunks of that size through
``dicomweb.multipart.spool_parts`` into a spool folder, and, as ``dicomweb.stow.store`` does, a
malformed body stores nothing while a well-formed one has each part ingested. Also checked: the
parts read back are what :class:`~dicomweb.multipart.MultipartWriter` rebuilds them into, and no
spool file is left. ``python -m fuzz.stow [-runs=N] [corpus dir …]``; see :mod:`fuzz`.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import aclosing

import anyio
import atheris

with atheris.instrument_imports(include=["dicomweb.multipart", "dicomweb.stow"]):
    from dicomweb import stow
    from dicomweb.multipart import (
        MultipartError,
        MultipartParser,
        MultipartWriter,
        PartData,
        PartStart,
        SpooledPart,
        spool_parts,
    )

from fuzz.common import Archive, run, work_folder

ARCHIVE = Archive(work_folder())


async def _spool(body: bytes, boundary: str, chunk: int, parts: list[SpooledPart]) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), chunk):
            yield body[i : i + chunk]

    async with aclosing(spool_parts(chunks(), boundary, ARCHIVE.spool, write_batch=4096)) as stream:
        async for part in stream:
            parts.append(part)


def _bodies(body: bytes, boundary: str) -> list[bytes]:
    parser = MultipartParser(boundary)
    out: list[bytearray] = []
    for event in parser.feed(body):
        if isinstance(event, PartData):
            out[-1] += event.data
        elif isinstance(event, PartStart):
            out.append(bytearray())
    parser.finish()
    return [bytes(b) for b in out]


def one_input(data: bytes) -> None:
    head, _, rest = data.partition(b"\n")
    content_type = head.decode("latin-1")
    chunk, body = (rest[0] + 1, rest[1:]) if rest else (1, b"")
    try:
        boundary = stow._boundary(content_type)
    except stow._Problem as problem:
        assert problem.status in (400, 415) and problem.message.strip(), (problem.status, problem.message)
        return
    before = ARCHIVE.state()
    parts: list[SpooledPart] = []
    try:
        anyio.run(_spool, body, boundary, chunk, parts)
    except MultipartError as exc:
        assert str(exc).strip(), "a MultipartError without a message"
    else:
        bodies = [p.path.read_bytes() for p in parts]
        assert [len(b) for b in bodies] == [p.size for p in parts]
        writer = MultipartWriter()
        rebuilt = b"".join(writer.iter([({"Content-Type": "application/dicom"}, b) for b in bodies]))
        assert _bodies(rebuilt, writer.boundary) == bodies, "parts differ after a write/parse round trip"
        for part in parts:
            ARCHIVE.accept(part.path, source="STOW-ATHERIS")
    finally:
        for part in parts:
            part.path.unlink(missing_ok=True)
    left = list(ARCHIVE.spool.iterdir())
    assert not left, f"spool files left behind: {left[:3]}"
    if not parts:
        assert ARCHIVE.state() == before


if __name__ == "__main__":
    run("stow", one_input, sys.argv)
