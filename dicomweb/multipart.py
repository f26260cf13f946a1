"""``multipart/related`` bodies (RFC 2046 §5.1, RFC 2387), read as a stream and written as one.

STOW-RS requests and WADO-RS responses carry DICOM objects as the parts of a
``multipart/related; type="application/dicom"`` message (PS3.18 §8.6, §10.4, §10.5; issue 3 §2).
This module is hand-written because neither Starlette nor python-multipart parses that media
type: both only know ``multipart/form-data`` (parts named by ``Content-Disposition``), and both
keep small parts in memory. A STOW-RS body can be a 2 GB study, so here:

* :class:`MultipartParser` is a push parser without I/O: :meth:`~MultipartParser.feed` it byte
  chunks of any size (down to one byte) and it returns :class:`PartStart`, :class:`PartData` and
  :class:`PartEnd` events. It holds at most one chunk plus the length of the delimiter
  (``CRLF--boundary``), or one part's header block (bounded by ``max_header_bytes``);
* :func:`spool_parts` drives the parser over an async iterator of chunks (``request.stream()``)
  and writes each part's body to a temporary file as it arrives, yielding a :class:`SpooledPart`
  (headers, file, size, SHA-256) when the part is complete. Disk writes are batched
  (``write_batch``, 1 MiB) and done in a worker thread, so a slow disk never stalls the event
  loop; memory stays bounded by boundary + one chunk + one batch, whatever the body size;
* :class:`MultipartWriter` builds a body from ``(headers, body)`` parts, as a sync or an async
  generator of bytes (WADO-RS responses, our STOW-RS client);
* :func:`parse_content_type` splits a ``Content-Type`` value into its media type and parameters
  (``boundary``, ``type``, ``start``, quoted values with backslash escapes).

Malformed bodies (no boundary, a missing closing delimiter, a truncated part, junk after a
delimiter) raise :class:`MultipartError` with a message fit to return in a 400 response.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import uuid
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from itertools import islice
from pathlib import Path
from typing import BinaryIO, TypeVar

import anyio.to_thread

__all__ = [
    "MultipartError",
    "MultipartParser",
    "MultipartWriter",
    "PartData",
    "PartEnd",
    "PartStart",
    "SpooledPart",
    "parse_content_type",
    "spool_parts",
]

#: RFC 2046 §5.1.1: a boundary is 1 to 70 characters.
# RFC 2046 §5.1.1 caps boundaries at 70 characters, but real clients exceed it (Orthanc 1.10's
# STOW-RS client sends 73: two UUIDs). Be liberal in what we accept; the parser only ever searches
# for the delimiter, so a longer one costs nothing. Our own writer stays within 70.
MAX_BOUNDARY = 200
#: Whitespace allowed between a delimiter and its CRLF ("transport padding"); more is an error.
MAX_PADDING = 1024


class MultipartError(ValueError):
    """The body (or the ``Content-Type`` that describes it) is not valid multipart."""


# ---------------------------------------------------------------------------- Content-Type

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA_TYPE = re.compile(rf"\s*({_TOKEN}/{_TOKEN})\s*")
# A parameter value is a quoted-string or, leniently, any run without ';', space or quote (clients
# send unquoted values such as ``type=application/dicom`` that are not RFC 9110 tokens).
_PARAMETER = re.compile(rf';\s*(?:({_TOKEN})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s"]+))\s*)?')
_ESCAPE = re.compile(r"\\(.)")


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """The lower-cased media type and the parameters (lower-cased names) of a Content-Type value.

    ``'multipart/related; type="application/dicom"; boundary=abc'`` →
    ``('multipart/related', {'type': 'application/dicom', 'boundary': 'abc'})``. Empty parameters
    (``a/b;;c=d;``) are ignored. Raises :class:`MultipartError` when the value is not
    ``type/subtype *(; name=value)`` (e.g. an unterminated quoted string).
    """
    m = _MEDIA_TYPE.match(value)
    if m is None:
        raise MultipartError(f"Content-Type {value!r} is not a media type (type/subtype)")
    media_type = m.group(1).lower()
    params: dict[str, str] = {}
    pos = m.end()
    while pos < len(value):
        p = _PARAMETER.match(value, pos)
        if p is None or p.end() == pos:
            raise MultipartError(f"Content-Type {value!r}: cannot parse the parameters at {value[pos:]!r}")
        if p.group(1) is not None:
            name = p.group(1).lower()
            quoted, bare = p.group(2), p.group(3)
            params[name] = _ESCAPE.sub(r"\1", quoted) if quoted is not None else bare
        pos = p.end()
    return media_type, params


def check_boundary(boundary: str) -> bytes:
    """The boundary as bytes, or :class:`MultipartError` if RFC 2046 §5.1.1 does not allow it."""
    if not 1 <= len(boundary) <= MAX_BOUNDARY:
        raise MultipartError(f"boundary must be 1 to {MAX_BOUNDARY} characters, got {len(boundary)}")
    if not boundary.isascii() or any(c in boundary for c in "\r\n") or boundary.endswith(" "):
        raise MultipartError(f"boundary {boundary!r} has characters RFC 2046 does not allow")
    return boundary.encode("ascii")


# ---------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class PartStart:
    """A part begins; ``headers`` has lower-cased names (repeated headers joined with ``, ``)."""

    headers: dict[str, str]


@dataclass(frozen=True)
class PartData:
    """The next bytes of the current part's body."""

    data: bytes


@dataclass(frozen=True)
class PartEnd:
    """The current part's body is complete."""


Event = PartStart | PartData | PartEnd


class _State(Enum):
    PREAMBLE = "preamble"
    DELIMITER = "after a delimiter"
    HEADERS = "in a part's headers"
    BODY = "in a part's body"
    EPILOGUE = "epilogue"


class MultipartParser:
    """Incremental multipart parser (no I/O): bytes in, :data:`Event` values out.

    The body is ``preamble CRLF--boundary padding CRLF headers CRLF CRLF body CRLF--boundary …
    CRLF--boundary-- epilogue`` (RFC 2046 §5.1.1); the delimiter on the first line may come
    without the CRLF before it. Preamble and epilogue are discarded; header lines may be folded.
    Only the delimiter is ever searched for, so bodies are passed through byte for byte.
    """

    def __init__(self, boundary: str, *, max_header_bytes: int = 64 * 1024) -> None:
        self.boundary = boundary
        self._delimiter = b"\r\n--" + check_boundary(boundary)
        self._max_header_bytes = max_header_bytes
        # The virtual CRLF lets the first delimiter, at the very start of the body, match too.
        self._buf = b"\r\n"
        self._state = _State.PREAMBLE
        self._fed = 0
        #: How many parts have started so far.
        self.parts = 0

    @property
    def complete(self) -> bool:
        """Whether the closing delimiter has been read."""
        return self._state is _State.EPILOGUE

    def feed(self, data: bytes) -> list[Event]:
        """Parse the next chunk; returns the events it completes (possibly none)."""
        self._fed += len(data)
        if self._state is _State.EPILOGUE:
            return []
        self._buf += data
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> None:
        """The body has ended: raise :class:`MultipartError` unless the closing delimiter was read."""
        close = f"--{self.boundary}--"
        if self._state is _State.EPILOGUE:
            return
        if self._fed == 0:
            raise MultipartError("the request body is empty")
        if self._state is _State.PREAMBLE:
            raise MultipartError(f"no boundary delimiter '--{self.boundary}' found in the body")
        raise MultipartError(
            f"the body ends {self._state.value} of part {self.parts} without the closing delimiter "
            f"'{close}' (truncated?)"
        )

    def _step(self, events: list[Event]) -> bool:
        """Advance by one token if the buffer holds it; whether anything was consumed."""
        buf, delim = self._buf, self._delimiter
        if self._state is _State.PREAMBLE or self._state is _State.BODY:
            at = buf.find(delim)
            if at < 0:
                # Keep only what could be the start of a delimiter: it begins with the buffer's
                # last CR (the boundary itself has none) and is shorter than the delimiter.
                keep_from = buf.rfind(b"\r", max(0, len(buf) - len(delim) + 1))
                cut = len(buf) if keep_from < 0 else keep_from
                if cut and self._state is _State.BODY:
                    events.append(PartData(buf[:cut]))
                self._buf = buf[cut:]
                return False
            if self._state is _State.BODY:
                if at:
                    events.append(PartData(buf[:at]))
                events.append(PartEnd())
            self._buf = buf[at + len(delim) :]
            self._state = _State.DELIMITER
            return True

        if self._state is _State.DELIMITER:
            if len(buf) < 2:
                return False
            if buf.startswith(b"--"):
                self._state = _State.EPILOGUE
                self._buf = b""
                return False
            pad = len(buf) - len(buf.lstrip(b" \t"))
            rest = buf[pad:]
            if rest.startswith(b"\r\n"):
                self._buf = rest[2:]
                self._state = _State.HEADERS
                return True
            if pad > MAX_PADDING or rest not in (b"", b"\r"):
                raise MultipartError(
                    f"unexpected bytes {rest[:16]!r} after the boundary delimiter '--{self.boundary}' "
                    "(expected CRLF, or '--' to close); is the boundary also used inside a part?"
                )
            return False

        if self._state is _State.HEADERS:
            if buf.startswith(b"\r\n"):  # a part without headers
                block, rest = b"", buf[2:]
            elif len(buf) < 2:
                return False
            else:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > self._max_header_bytes:
                        raise MultipartError(
                            f"the headers of part {self.parts + 1} exceed {self._max_header_bytes} bytes"
                        )
                    return False
                block, rest = buf[:end], buf[end + 4 :]
            self.parts += 1
            events.append(PartStart(_parse_headers(block, self.parts)))
            self._buf = rest
            self._state = _State.BODY
            return True

        return False  # EPILOGUE: nothing more to do


def _parse_headers(block: bytes, part: int) -> dict[str, str]:
    """Header lines (RFC 5322 syntax, obsolete folding allowed) to a dict with lower-cased names."""
    headers: dict[str, str] = {}
    last: str | None = None
    for raw in block.split(b"\r\n") if block else []:
        line = raw.decode("latin-1")
        if line[:1] in (" ", "\t") and last is not None:
            headers[last] = f"{headers[last]} {line.strip()}".strip()
            continue
        name, sep, value = line.partition(":")
        name = name.strip().lower()
        if not sep or not name or re.fullmatch(_TOKEN, name) is None:
            raise MultipartError(f"part {part}: malformed header line {line[:80]!r}")
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
        last = name
    return headers


# ---------------------------------------------------------------------------- spooling


@dataclass(frozen=True)
class SpooledPart:
    """A complete part whose body is in a temporary file (the consumer deletes ``path``)."""

    index: int  # 1-based position in the body
    headers: Mapping[str, str]
    path: Path
    size: int
    sha256: bytes  # digest of the body, computed while it was written (for Content-Digest)


@dataclass
class _SpoolFile:
    """A part body being written: batches of chunks are hashed and written in a worker thread."""

    index: int
    headers: dict[str, str]
    path: Path
    fh: BinaryIO
    batch: int
    pending: list[bytes] = field(default_factory=list)
    pending_size: int = 0
    size: int = 0
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)

    @classmethod
    def create(cls, folder: Path, index: int, headers: dict[str, str], batch: int) -> _SpoolFile:
        fd, name = tempfile.mkstemp(prefix="part-", suffix=".tmp", dir=folder)
        return cls(index, headers, Path(name), os.fdopen(fd, "wb", buffering=0), batch)

    async def write(self, data: bytes) -> None:
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size >= self.batch:
            await anyio.to_thread.run_sync(self._flush)

    def _flush(self) -> None:
        for data in self.pending:  # chunk by chunk: joining them would copy the batch
            self.digest.update(data)
            view = memoryview(data)
            while view:  # a raw file may write less than asked
                written = self.fh.write(view)
                view = view[written or 0 :]
            self.size += len(data)
        self.pending.clear()
        self.pending_size = 0

    def _finish(self) -> None:
        self._flush()
        self.fh.close()

    async def close(self) -> SpooledPart:
        await anyio.to_thread.run_sync(self._finish)
        return SpooledPart(self.index, self.headers, self.path, self.size, self.digest.digest())

    def discard(self) -> None:
        self.fh.close()
        self.path.unlink(missing_ok=True)


async def spool_parts(
    chunks: AsyncIterable[bytes], boundary: str, folder: Path, *, write_batch: int = 1 << 20
) -> AsyncGenerator[SpooledPart, None]:
    """Parse a multipart body from ``chunks``, yielding each part once its body is in ``folder``.

    The consumer owns (and must delete) each yielded part's file; a part cut short by an error or
    by the consumer closing the generator is deleted here. Raises :class:`MultipartError` when
    the body is malformed, after the parts before the error were yielded. Use it under
    :func:`contextlib.aclosing` so an early exit cleans up at once.
    """
    parser = MultipartParser(boundary)
    current: _SpoolFile | None = None
    try:
        async for chunk in chunks:
            for event in parser.feed(chunk):
                if isinstance(event, PartStart):
                    current = _SpoolFile.create(folder, parser.parts, event.headers, write_batch)
                elif isinstance(event, PartData):
                    assert current is not None
                    await current.write(event.data)
                else:
                    assert current is not None
                    part = await current.close()
                    current = None
                    yield part
        parser.finish()
    finally:
        if current is not None:
            current.discard()


# ---------------------------------------------------------------------------- writing

Body = bytes | Iterable[bytes]
AsyncBody = bytes | Iterable[bytes] | AsyncIterable[bytes]
#: A part to write: its headers and its body.
Part = tuple[Mapping[str, str], Body]
AsyncPart = tuple[Mapping[str, str], AsyncBody]


class MultipartWriter:
    """Builds ``multipart/related`` bodies: ``Content-Type`` value plus the bytes, part by part.

    ``MultipartWriter(type="application/dicom")`` picks a random boundary (a UUID: it cannot
    plausibly occur in the parts, which are not scanned for it). Each part is ``(headers,
    body)``; the body is ``bytes`` or an iterable of chunks, and for :meth:`aiter` also an async
    iterable. A sync iterable given to :meth:`aiter` (a file, a blob-store read) is pulled in a
    worker thread, so blocking reads never run on the event loop.
    """

    def __init__(self, type: str = "application/dicom", *, boundary: str | None = None) -> None:
        self.type = type
        self.boundary = boundary or uuid.uuid4().hex
        check_boundary(self.boundary)

    @property
    def content_type(self) -> str:
        """The ``Content-Type`` header value for the body."""
        return f'multipart/related; type="{self.type}"; boundary={self.boundary}'

    def _head(self, headers: Mapping[str, str]) -> bytes:
        lines = [f"--{self.boundary}"]
        for name, value in headers.items():
            if any(c in f"{name}{value}" for c in "\r\n") or ":" in name:
                raise ValueError(f"invalid part header {name!r}: {value!r}")
            lines.append(f"{name}: {value}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    @property
    def _close(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode("ascii")

    def iter(self, parts: Iterable[Part]) -> Iterator[bytes]:
        """The body as a generator of bytes (one chunk per head, body chunk and delimiter)."""
        for headers, body in parts:
            yield self._head(headers)
            if isinstance(body, bytes | bytearray | memoryview):
                yield bytes(body)
            else:
                yield from body
            yield b"\r\n"
        yield self._close

    async def aiter(self, parts: Iterable[AsyncPart] | AsyncIterable[AsyncPart]) -> AsyncIterator[bytes]:
        """The body as an async generator of bytes (for a Starlette ``StreamingResponse``)."""
        async for headers, body in _aiterate(parts):
            yield self._head(headers)
            if isinstance(body, bytes | bytearray | memoryview):
                yield bytes(body)
            else:
                async for chunk in _aiterate(body):
                    yield chunk
            yield b"\r\n"
        yield self._close


_T = TypeVar("_T")


async def _aiterate(items: Iterable[_T] | AsyncIterable[_T]) -> AsyncIterator[_T]:
    """Iterate either kind; a sync iterable is advanced in a worker thread (it may block)."""
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
        return
    if isinstance(items, list | tuple):  # already in memory: no thread needed
        for item in items:
            yield item
        return
    it = iter(items)
    while pulled := await anyio.to_thread.run_sync(_pull, it):
        yield pulled[0]


def _pull(it: Iterator[_T]) -> list[_T]:
    """The iterator's next item as a one-item list, or an empty list at its end."""
    return list(islice(it, 1))
