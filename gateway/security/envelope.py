"""The sealed-object format: AES-256-GCM in fixed-size segments under a per-object data key.

R-SE-10 (encryption at rest), issue 6 §5. WADO-RS ``/frames`` reads frames by range at their stored
pixel offsets (``dicomweb/frames.py``), so an object cannot be one GCM message: it is cut into
segments of ``segment_size`` plaintext bytes (64 KiB), each sealed on its own, and a range read
opens only the segments it touches.

Layout::

    header  = MAGIC (8) | segment_size (u32 BE) | data key id (16) | nonce prefix (8)      36 bytes
    segment = AES-256-GCM(data key, nonce = prefix | index (u32 BE),
                          plaintext[index*S : (index+1)*S],
                          aad = header | index (u32 BE) | final (u8))                     S + 16 bytes

* The header is in every segment's associated data: a changed segment size, key id or nonce
  prefix fails authentication.
* The index in the nonce and in the associated data detects reordered or swapped segments; the
  *final* flag (1 on the last segment only) detects an object cut at a segment boundary.
* An empty object is one empty final segment (16 bytes of tag), so it too is authenticated.
* The data key is random per object (never reused), and the nonce prefix random per object, so
  no (key, nonce) pair ever repeats.

The data key itself is not in the object: it is kept wrapped by a KEK in the catalog
(``gateway/archive/encrypted.py``), where a rotation re-wraps it without rewriting the object.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC: Final = b"YBYXENC1"
HEADER_SIZE: Final = 36
TAG: Final = 16
SEGMENT_SIZE: Final = 64 << 10
_HEADER = struct.Struct(">8sI16s8s")


class SealError(OSError):
    """A sealed object that does not open: altered, truncated, reordered or under another key.

    An ``OSError`` so that readers handle it as any storage failure; the message names what failed,
    never key material."""


class KeyGone(SealError):
    """A sealed object whose data key was destroyed (crypto-shredding: its KEK or its
    institution's transfer key destroyed, or its data key deleted): unreadable for good, not
    damaged. WADO-RS answers 410 Gone for it (``dicomweb/wado.py``)."""


@dataclass(frozen=True)
class Header:
    """The clear header of a sealed object."""

    segment_size: int
    key_id: str  # hex of the 16-byte data key id (the catalog's ``data_keys.dek_id``)
    nonce_prefix: bytes
    raw: bytes

    @classmethod
    def new(cls, segment_size: int = SEGMENT_SIZE) -> Header:
        key_id = uuid.uuid4().bytes
        prefix = secrets.token_bytes(8)
        return cls(segment_size, key_id.hex(), prefix, _HEADER.pack(MAGIC, segment_size, key_id, prefix))

    @classmethod
    def parse(cls, raw: bytes, where: str = "object") -> Header:
        if len(raw) < HEADER_SIZE or raw[:8] != MAGIC:
            raise SealError(f"{where}: not a sealed object (no {MAGIC.decode()} header)")
        _magic, size, key_id, prefix = _HEADER.unpack(raw[:HEADER_SIZE])
        if not 1024 <= size <= 16 << 20:
            raise SealError(f"{where}: implausible segment size {size}")
        return cls(size, key_id.hex(), prefix, bytes(raw[:HEADER_SIZE]))

    @property
    def stride(self) -> int:
        """Bytes one full sealed segment takes."""
        return self.segment_size + TAG

    def nonce(self, index: int) -> bytes:
        return self.nonce_prefix + struct.pack(">I", index)

    def aad(self, index: int, final: bool) -> bytes:
        return self.raw + struct.pack(">IB", index, 1 if final else 0)


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


class SealingReader:
    """A stream of the sealed form of ``source`` (read-only, for a blob store's ``put``).

    Counts and SHA-256-hashes the *plaintext* as it passes (the catalog keeps the plaintext's size
    and hash: the bytes a client gets back). Errors raised by ``source`` pass through unchanged.
    """

    def __init__(self, source: BinaryIO, header: Header, data_key: bytes) -> None:
        self._source = source
        self._header = header
        self._aead = AESGCM(data_key)
        self._out = bytearray(header.raw)
        self._pending: bytes | None = None  # read ahead: a segment is final only if nothing follows
        self._index = 0
        self._eof = False
        self._done = False
        self._digest = hashlib.sha256()
        self.size = 0

    def _fill(self, want: int) -> bytes:
        parts: list[bytes] = []
        while want > 0:
            data = self._source.read(want)
            if not data:
                self._eof = True
                break
            parts.append(data)
            want -= len(data)
        chunk = b"".join(parts)
        self._digest.update(chunk)
        self.size += len(chunk)
        return chunk

    def _seal(self, plain: bytes, final: bool) -> None:
        h = self._header
        self._out += self._aead.encrypt(h.nonce(self._index), plain, h.aad(self._index, final))
        self._index += 1

    def _advance(self) -> bool:
        """Seal one more segment into the output buffer; False once everything is sealed."""
        if self._done:
            return False
        if self._pending is None:
            self._pending = self._fill(self._header.segment_size)
        nxt = b"" if self._eof else self._fill(self._header.segment_size)
        final = not nxt
        self._seal(self._pending, final)
        self._pending = nxt
        self._done = final
        return True

    def read(self, size: int = -1) -> bytes:
        while (size < 0 or len(self._out) < size) and self._advance():
            pass
        if size < 0 or size >= len(self._out):
            data = bytes(self._out)
            self._out.clear()
            return data
        data = bytes(self._out[:size])
        del self._out[:size]
        return data

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def sealed_size(plain_size: int, segment_size: int = SEGMENT_SIZE) -> int:
    segments = max(1, -(-plain_size // segment_size))
    return HEADER_SIZE + plain_size + segments * TAG


def open_segments(
    header: Header, data_key: bytes, first: int, data: bytes, *, more: bool, where: str
) -> bytes:
    """The plaintext of consecutive sealed segments ``data`` starting at segment ``first``.

    ``more``: bytes follow ``data`` in the object (so its last segment is not the final one).
    """
    if not data and first == 0:
        raise SealError(f"{where}: sealed object has no segments (truncated after its header)")
    if not data and not more and first > 0:
        return b""  # a read starting at or past the end
    aead = AESGCM(data_key)
    stride = header.stride
    out: list[bytes] = []
    count = max(1, -(-len(data) // stride)) if data else 0
    for n in range(count):
        seg = data[n * stride : (n + 1) * stride]
        index = first + n
        final = n == count - 1 and not more
        if len(seg) < TAG or (not final and len(seg) != stride):
            raise SealError(f"{where}: sealed segment {index} is truncated")
        try:
            out.append(aead.decrypt(header.nonce(index), seg, header.aad(index, final)))
        except InvalidTag:
            raise SealError(
                f"{where}: segment {index} fails authentication (altered, truncated or reordered)"
            ) from None
    return b"".join(out)


def open_stream(header: Header, data_key: bytes, body: Iterable[bytes], *, where: str) -> Iterator[bytes]:
    """The plaintext of a sealed object's body (everything after the header), segment by segment."""
    stride = header.stride
    buf = bytearray()
    index = 0
    for chunk in body:
        buf += chunk
        # keep at least one byte beyond a full segment: only then is that segment known not final
        while len(buf) > stride:
            yield open_segments(header, data_key, index, bytes(buf[:stride]), more=True, where=where)
            del buf[:stride]
            index += 1
    yield open_segments(header, data_key, index, bytes(buf), more=False, where=where)
