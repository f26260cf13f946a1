"""Pixel data of stored instances for WADO-RS: frames by range read, decoding and transcoding.

Issue 3 §4 and PS3.18 §10.4 (Retrieve Transaction), §8.7.3.5 (transfer syntaxes) and Table
8.7.3-5 (pixel data media types). Nothing here loads a whole file to serve a frame:

* :class:`BlobFile` is a seekable file object over ``BlobStore.read_range`` (buffered, 64 KiB
  blocks), so pydicom reads only the header (``stop_before_pixels``) and the file position then sits
  on the pixel data element: its value offset is known without reading the pixels.
* A native (uncompressed) frame is one ``read_range`` at ``value_offset + (n-1) * frame_size``.
* An encapsulated frame is located through the Basic (or Extended) Offset Table with
  :func:`pydicom.encaps.get_frame` reading through the same buffered file object, so only the
  header, the offset table and the needed fragments are fetched.

Decoding (compressed → Explicit VR Little Endian) is the domain's one transcoding path,
:mod:`gateway.codec.decode` (pydicom's decoders, dcmtk's command-line decoders as fallback), shared
with the DIMSE retrieve; here its :class:`~gateway.codec.decode.CannotDecode` becomes this edge's
:class:`CannotDecode` (a :class:`PixelDataError`).
"""

from __future__ import annotations

import copy
import io
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, get_frame, parse_basic_offsets
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from gateway.archive.blobstore import BlobStore
from gateway.archive.catalog import PixelRow, StoredInstance
from gateway.codec import decode

PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float, Double Float
BLOCK = 64 * 1024
NATIVE = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian)

# PS3.18 Table 8.7.3-5: media type of each compressed transfer syntax's frames. The first name is
# the standard one; ``x-`` names are the pre-2019 ones some clients still send.
FRAME_MEDIA_TYPES: dict[str, tuple[str, ...]] = {
    "1.2.840.10008.1.2.4.50": ("image/jpeg",),
    "1.2.840.10008.1.2.4.51": ("image/jpeg",),
    "1.2.840.10008.1.2.4.57": ("image/jpeg",),
    "1.2.840.10008.1.2.4.70": ("image/jpeg",),
    "1.2.840.10008.1.2.5": ("image/dicom-rle", "image/x-dicom-rle"),
    "1.2.840.10008.1.2.4.80": ("image/jls", "image/x-jls"),
    "1.2.840.10008.1.2.4.81": ("image/jls", "image/x-jls"),
    "1.2.840.10008.1.2.4.90": ("image/jp2",),
    "1.2.840.10008.1.2.4.91": ("image/jp2",),
    "1.2.840.10008.1.2.4.92": ("image/jpx",),
    "1.2.840.10008.1.2.4.93": ("image/jpx",),
    "1.2.840.10008.1.2.4.201": ("image/jphc",),
    "1.2.840.10008.1.2.4.202": ("image/jphc",),
    "1.2.840.10008.1.2.4.203": ("image/jphc",),
    "1.2.840.10008.1.2.4.100": ("video/mpeg2",),
    "1.2.840.10008.1.2.4.101": ("video/mpeg2",),
    "1.2.840.10008.1.2.4.102": ("video/mp4",),
    "1.2.840.10008.1.2.4.103": ("video/mp4",),
    "1.2.840.10008.1.2.4.104": ("video/mp4",),
    "1.2.840.10008.1.2.4.105": ("video/mp4",),
    "1.2.840.10008.1.2.4.106": ("video/mp4",),
}

# The Image Pixel module (PS3.3 C.7.6.3): what a decoder needs to make sense of one frame.
_PIXEL_MODULE = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
)


# Fragment tables of encapsulated pixel data without offset tables, by (immutable) blob key.
_FRAGMENTS: OrderedDict[str, list[tuple[int, int]]] = OrderedDict()
_FRAGMENTS_LOCK = threading.Lock()
_FRAGMENTS_MAX = 256


class PixelDataError(ValueError):
    """The request cannot be served from this instance's pixel data (message says why)."""


class NoPixelData(PixelDataError):
    """The instance has no pixel data element."""


class FrameOutOfRange(PixelDataError):
    """A requested frame number is not in ``1..NumberOfFrames``."""


class CannotDecode(PixelDataError):
    """No available decoder (pydicom plugin or dcmtk tool) handles this transfer syntax."""


# --------------------------------------------------------------------------- range-read file


class BlobFile(io.RawIOBase):
    """A read-only, seekable raw file over ``BlobStore.read_range`` (wrap in a BufferedReader)."""

    def __init__(self, store: BlobStore, key: str, size: int) -> None:
        super().__init__()
        self._store, self._key, self._size, self._pos = store, key, size, 0
        self.name = key  # pydicom records a file object's name as the data set's filename

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), max(0, self._size - self._pos))
        if want == 0:
            return 0
        data = self._store.read_range(self._key, self._pos, want)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


def open_blob(store: BlobStore, inst: StoredInstance) -> io.BufferedReader:
    """The stored instance as a buffered, seekable file reading only the ranges it is asked for."""
    return io.BufferedReader(BlobFile(store, inst.blob_key, inst.size), buffer_size=BLOCK)


def read_blob(store: BlobStore, inst: StoredInstance) -> bytes:
    """All of the stored instance's bytes (used only to transcode one instance at a time)."""
    return b"".join(store.get(inst.blob_key))


# --------------------------------------------------------------------------- decoding


def can_decode(ts: str) -> bool:
    """Whether an instance in ``ts`` can be turned into Explicit VR Little Endian here."""
    return decode.can_decode(ts)


def decode_dataset(ds: Dataset) -> Dataset:
    """``ds`` in Explicit VR Little Endian (:func:`gateway.codec.decode.decode_dataset`)."""
    try:
        return decode.decode_dataset(ds)
    except decode.CannotDecode as exc:
        raise CannotDecode(str(exc)) from exc


def to_explicit_le(data: bytes, ts: str) -> bytes:
    """A stored Part-10 file re-encoded as Explicit VR LE (:func:`gateway.codec.decode.to_explicit_le`)."""
    try:
        return decode.to_explicit_le(data, ts)
    except decode.CannotDecode as exc:
        raise CannotDecode(str(exc)) from exc


# --------------------------------------------------------------------------- frames


@dataclass
class PixelSource:
    """Where one stored instance's pixel data is and how its frames are laid out.

    Built by :func:`open_pixels` from the header only. ``value_offset`` is the first byte of the
    pixel data element's value (for encapsulated data: the Basic Offset Table item).
    """

    store: BlobStore
    inst: StoredInstance
    header: Dataset
    transfer_syntax: UID
    tag: int
    value_offset: int
    length: int | None  # None: undefined length (encapsulated)
    number_of_frames: int
    _fh: io.BufferedReader | None
    _full: Dataset | None = None  # deflated files are inflated whole (no byte offsets exist)

    @property
    def encapsulated(self) -> bool:
        return self.length is None

    @property
    def media_types(self) -> tuple[str, ...]:
        """PS3.18 Table 8.7.3-5 media types of the frames as stored."""
        if not self.encapsulated:
            return ("application/octet-stream",)
        return FRAME_MEDIA_TYPES.get(str(self.transfer_syntax), ("application/octet-stream",))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()

    def check_frames(self, numbers: list[int]) -> None:
        """Raise :class:`FrameOutOfRange` naming the first frame number not in the instance."""
        for n in numbers:
            if not 1 <= n <= self.number_of_frames:
                raise FrameOutOfRange(
                    f"frame {n} is out of range: the instance has {self.number_of_frames} "
                    f"frame{'s' if self.number_of_frames != 1 else ''}"
                )

    # ---- native layout

    def _frame_bits(self) -> int:
        h = self.header
        rows, cols = int(h.get("Rows", 0)), int(h.get("Columns", 0))
        spp, bits = int(h.get("SamplesPerPixel", 1)), int(h.get("BitsAllocated", 8))
        if self.tag == 0x7FE00008:
            bits = 32
        elif self.tag == 0x7FE00009:
            bits = 64
        if spp == 3 and str(h.get("PhotometricInterpretation", "")) == "YBR_FULL_422":
            return rows * cols * 2 * bits  # two samples per pixel after 4:2:2 subsampling
        return rows * cols * spp * bits

    def _native_frame(self, n: int) -> bytes:
        bits = self._frame_bits()
        start_bit = (n - 1) * bits
        if self._full is not None:
            elem = self._full[self.tag]
            value = bytes(elem.value)
            chunk = value[start_bit // 8 : (start_bit + bits + 7) // 8]
        else:
            assert self._fh is not None and self.length is not None
            if (start_bit + bits + 7) // 8 > self.length:
                raise PixelDataError(
                    f"pixel data holds {self.length} bytes, too few for frame {n} of {self.number_of_frames}"
                )
            self._fh.seek(self.value_offset + start_bit // 8)
            chunk = self._fh.read((start_bit % 8 + bits + 7) // 8)
        if start_bit % 8 or bits % 8:
            # BitsAllocated 1: frames need not start on a byte; re-pack this frame's bits.
            flat = np.unpackbits(np.frombuffer(chunk, np.uint8), bitorder="little")
            part = flat[start_bit % 8 : start_bit % 8 + bits]
            return bytes(np.packbits(part, bitorder="little").tobytes())
        if self.transfer_syntax == ExplicitVRBigEndian:
            width = max(int(self.header.get("BitsAllocated", 8)), 8) // 8
            if width > 1:
                return np.frombuffer(chunk, f">u{width}").astype(f"<u{width}").tobytes()
        return chunk

    # ---- frames

    def stored_frame(self, n: int) -> bytes:
        """Frame ``n`` (1-based) as stored: compressed bytes, or native little-endian pixels."""
        if not self.encapsulated:
            return self._native_frame(n)
        assert self._fh is not None
        eot = None
        if "ExtendedOffsetTable" in self.header and "ExtendedOffsetTableLengths" in self.header:
            eot = (bytes(self.header.ExtendedOffsetTable), bytes(self.header.ExtendedOffsetTableLengths))
        try:
            if eot is None:
                self._fh.seek(self.value_offset)
                if not parse_basic_offsets(self._fh, endianness=self._endian):
                    # No offset table: frames are found from the fragment table (cached per blob).
                    fragments = self._fragments()
                    if len(fragments) == self.number_of_frames:
                        return self._read_at(*fragments[n - 1])
                    if self.number_of_frames == 1:
                        return b"".join(self._read_at(*f) for f in fragments)
            # Basic/Extended Offset Table, or several fragments per frame: pydicom seeks its way.
            self._fh.seek(self.value_offset)
            frames = self.number_of_frames
            return get_frame(
                self._fh, n - 1, extended_offsets=eot, number_of_frames=frames, endianness=self._endian
            )
        except (ValueError, struct.error) as exc:
            raise PixelDataError(f"cannot locate frame {n} in the encapsulated pixel data: {exc}") from exc

    @property
    def _endian(self) -> str:
        return ">" if self.transfer_syntax == ExplicitVRBigEndian else "<"

    def _fragments(self) -> list[tuple[int, int]]:
        """(offset, length) of every fragment's value (see :func:`_scan_fragments`)."""
        return _scan_fragments(self.store, self.inst, self.value_offset, self._endian)

    def frame_dataset(self, n: int) -> Dataset:
        """A one-frame Explicit VR LE dataset (Image Pixel module + pixel data) holding frame ``n``.

        Compressed frames are decoded; rendering and octet-stream transcoding read from here.
        """
        h = self.header
        ds = Dataset()
        for kw in _PIXEL_MODULE:
            if kw in h:
                ds[kw] = copy.deepcopy(h[kw])
        ds.SOPClassUID = h.get("SOPClassUID", self.inst.sop_class_uid)
        ds.SOPInstanceUID = h.get("SOPInstanceUID", self.inst.sop_uid)
        ds.NumberOfFrames = 1
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(str(ds.SOPClassUID))
        meta.MediaStorageSOPInstanceUID = UID(str(ds.SOPInstanceUID))
        frame = self.stored_frame(n)
        if self.encapsulated:
            meta.TransferSyntaxUID = self.transfer_syntax
            ds.file_meta = meta
            ds.PixelData = encapsulate([frame])
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
            return decode_dataset(ds)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        vr = "OB" if int(h.get("BitsAllocated", 8)) <= 8 else "OW"
        if self.tag != 0x7FE00010:
            vr = "OF" if self.tag == 0x7FE00008 else "OD"
        ds.add_new(self.tag, vr, frame)  # float pixel data keeps its own tag
        return ds

    def decoded_frame(self, n: int) -> bytes:
        """Frame ``n`` as uncompressed little-endian pixel bytes (decoding if stored compressed)."""
        if not self.encapsulated:
            return self._native_frame(n)
        ds = self.frame_dataset(n)
        return bytes(ds[self.tag].value)

    def native_value(self) -> Iterator[bytes]:
        """The whole native pixel data value, in 1 MiB range reads (``/bulk/7FE00010``)."""
        if self._full is not None:
            yield bytes(self._full[self.tag].value)
            return
        assert self.length is not None and self._fh is not None
        if self.transfer_syntax == ExplicitVRBigEndian:
            for n in range(1, self.number_of_frames + 1):
                yield self._native_frame(n)
            return
        pos, end = self.value_offset, self.value_offset + self.length
        while pos < end:
            step = min(1 << 20, end - pos)
            yield self._read_at(pos, step)
            pos += step

    def _read_at(self, pos: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``pos`` (one range read, no read-ahead)."""
        data = self.store.read_range(self.inst.blob_key, pos, length)
        if len(data) < length:
            raise PixelDataError(f"the stored object ends inside the pixel data (byte {pos + len(data)})")
        return data


def _scan_fragments(
    store: BlobStore, inst: StoredInstance, value_offset: int, endian: str
) -> list[tuple[int, int]]:
    """(offset, length) of every fragment's value, from 8-byte item headers read by range.

    Unbuffered on purpose: a buffered read would fetch a whole block per header. Blob keys are
    content-addressed, so the table is cached by key and never goes stale.
    """
    key = inst.blob_key
    with _FRAGMENTS_LOCK:
        cached = _FRAGMENTS.get(key)
        if cached is not None:
            _FRAGMENTS.move_to_end(key)
            return cached
    found: list[tuple[int, int]] = []
    pos, first = value_offset, True
    while pos + 8 <= inst.size:
        head = store.read_range(key, pos, 8)
        if len(head) < 8:
            break
        group, element, length = struct.unpack(f"{endian}HHL", head)
        if (group, element) == (0xFFFE, 0xE0DD):  # sequence delimiter: done
            break
        if (group, element) != (0xFFFE, 0xE000):
            raise PixelDataError(f"expected an item tag at byte {pos}, found ({group:04X},{element:04X})")
        if not first:
            found.append((pos + 8, length))
        first = False  # the first item is the (empty) Basic Offset Table
        pos += 8 + length
    with _FRAGMENTS_LOCK:
        _FRAGMENTS[key] = found
        while len(_FRAGMENTS) > _FRAGMENTS_MAX:
            _FRAGMENTS.popitem(last=False)
    return found


# --------------------------------------------------------------------------- frames from the catalog

# Basic Offset Tables by (immutable) blob key: (frame offsets, first fragment's item position).
_OFFSETS: OrderedDict[str, tuple[tuple[int, ...], int]] = OrderedDict()
_OFFSETS_LOCK = threading.Lock()
_OFFSETS_MAX = 1024
_ITEM = 0xE000FFFE  # (FFFE,E000) read as one little-endian uint32


class NeedsHeader(PixelDataError):
    """The catalog's pixel location is not enough for this frame: parse the header instead."""


@dataclass(frozen=True)
class IndexedPixels:
    """Frames of an instance located from its catalog row alone (no header read).

    Built by :func:`indexed_pixels` when ingest recorded the pixel data location: a native frame is
    one range read; an encapsulated frame is found through the Basic Offset Table (cached per
    blob) or, when that is empty, the cached fragment table. Anything else raises
    :class:`NeedsHeader` and the caller falls back to :func:`open_pixels`.
    """

    store: BlobStore
    inst: StoredInstance
    transfer_syntax: UID
    value_offset: int
    length: int | None  # None: undefined length (encapsulated)
    number_of_frames: int
    frame_size: int  # bytes per native frame (0 when encapsulated)

    @property
    def encapsulated(self) -> bool:
        return self.length is None

    @property
    def media_types(self) -> tuple[str, ...]:
        if not self.encapsulated:
            return ("application/octet-stream",)
        return FRAME_MEDIA_TYPES.get(str(self.transfer_syntax), ("application/octet-stream",))

    def check_frames(self, numbers: list[int]) -> None:
        for n in numbers:
            if not 1 <= n <= self.number_of_frames:
                raise FrameOutOfRange(
                    f"frame {n} is out of range: the instance has {self.number_of_frames} "
                    f"frame{'s' if self.number_of_frames != 1 else ''}"
                )

    def _read(self, pos: int, length: int) -> bytes:
        data = self.store.read_range(self.inst.blob_key, pos, length)
        if len(data) < length:
            raise PixelDataError(f"the stored object ends inside the pixel data (byte {pos + len(data)})")
        return data

    def stored_frame(self, n: int) -> bytes:
        """Frame ``n`` (1-based) as stored: native little-endian pixels or compressed bytes."""
        if self.length is not None:
            start = (n - 1) * self.frame_size
            if start + self.frame_size > self.length:
                raise PixelDataError(
                    f"pixel data holds {self.length} bytes, too few for frame {n} of {self.number_of_frames}"
                )
            return self._read(self.value_offset + start, self.frame_size)
        offsets, first = self._offsets()
        if not offsets:
            fragments = _scan_fragments(self.store, self.inst, self.value_offset, "<")
            if len(fragments) == self.number_of_frames:
                return self._read(*fragments[n - 1])
            if self.number_of_frames == 1:
                return b"".join(self._read(*f) for f in fragments)
            raise NeedsHeader("several fragments per frame and no Basic Offset Table")
        start = first + offsets[n - 1]
        if n < self.number_of_frames:
            return self._items(self._read(start, first + offsets[n] - start), start)
        return self._last_frame(start)

    def _offsets(self) -> tuple[tuple[int, ...], int]:
        """The Basic Offset Table (empty if absent) and where the first fragment's item starts."""
        key = self.inst.blob_key
        with _OFFSETS_LOCK:
            cached = _OFFSETS.get(key)
            if cached is not None:
                _OFFSETS.move_to_end(key)
                return cached
        want = 4 * self.number_of_frames
        head = self.store.read_range(key, self.value_offset, 8 + want)
        if len(head) < 8:
            raise PixelDataError("the stored object ends inside the pixel data")
        tag, length = struct.unpack("<LL", head[:8])
        if tag != _ITEM or length % 4:
            raise PixelDataError(f"no Basic Offset Table item at byte {self.value_offset}")
        if length and length != want:
            raise NeedsHeader(
                f"the Basic Offset Table has {length // 4} entries for {self.number_of_frames} frames"
            )
        if len(head) < 8 + length:
            raise PixelDataError("the stored object ends inside the Basic Offset Table")
        found = (struct.unpack(f"<{length // 4}L", head[8 : 8 + length]), self.value_offset + 8 + length)
        with _OFFSETS_LOCK:
            _OFFSETS[key] = found
            while len(_OFFSETS) > _OFFSETS_MAX:
                _OFFSETS.popitem(last=False)
        return found

    @staticmethod
    def _items(data: bytes, pos: int) -> bytes:
        """The values of the fragment items filling ``data`` (read at byte ``pos``), joined."""
        values: list[bytes] = []
        at = 0
        while at < len(data):
            if at + 8 > len(data):
                raise PixelDataError(f"a fragment item header crosses the next frame at byte {pos + at}")
            tag, length = struct.unpack_from("<LL", data, at)
            if tag != _ITEM or at + 8 + length > len(data):
                raise PixelDataError(f"the Basic Offset Table does not point at fragments (byte {pos + at})")
            values.append(data[at + 8 : at + 8 + length])
            at += 8 + length
        return values[0] if len(values) == 1 else b"".join(values)

    def _last_frame(self, pos: int) -> bytes:
        """The fragments from ``pos`` up to the sequence delimiter; each read takes the next header."""
        head = self._read(pos, 8)
        values: list[bytes] = []
        while True:
            tag, length = struct.unpack("<LL", head)
            if tag != _ITEM:  # the sequence delimiter (or trailing padding) after the last fragment
                break
            data = self.store.read_range(self.inst.blob_key, pos + 8, length + 8)
            if len(data) < length:
                raise PixelDataError(
                    f"the stored object ends inside the pixel data (byte {pos + 8 + len(data)})"
                )
            values.append(data[:length])
            head, pos = data[length:], pos + 8 + length
            if len(head) < 8:  # no delimiter at the file's end: the last fragment ends it
                break
        if not values:
            raise PixelDataError("the last frame has no fragments")
        return values[0] if len(values) == 1 else b"".join(values)


def indexed_pixels(store: BlobStore, row: PixelRow) -> IndexedPixels | None:
    """Frames located from the catalog row, or None when the header must be parsed (old rows,
    big-endian or deflated files, BitsAllocated not a multiple of 8, missing attributes)."""
    if row.pixel_offset is None:
        return None
    ts = UID(row.instance.transfer_syntax)
    frames = max(row.number_of_frames or 1, 1)
    if row.pixel_length is None:
        if not ts.is_compressed or ts == DeflatedExplicitVRLittleEndian:
            return None
        return IndexedPixels(store, row.instance, ts, row.pixel_offset, None, frames, 0)
    if ts not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
        return None
    rows, cols, spp, bits = row.rows, row.columns, row.samples_per_pixel, row.bits_allocated
    if not rows or not cols or not spp or not bits or bits % 8:
        return None
    size = rows * cols * spp * bits // 8
    return IndexedPixels(store, row.instance, ts, row.pixel_offset, row.pixel_length, frames, size)


def _number_of_frames(header: Dataset) -> int:
    try:
        n = int(header.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        n = 1
    return max(n, 1)


def open_pixels(store: BlobStore, inst: StoredInstance) -> PixelSource:
    """Read the header of a stored instance (ranges only) and locate its pixel data element.

    Raises :class:`NoPixelData` when the instance has none.
    """
    if inst.transfer_syntax == DeflatedExplicitVRLittleEndian:
        # The data set is one deflate stream: there are no byte offsets to read at; inflate it.
        full = dcmread(io.BytesIO(read_blob(store, inst)))
        tag = next((t for t in PIXEL_TAGS if t in full), None)
        if tag is None:
            raise NoPixelData("the instance has no pixel data")
        ts = UID(inst.transfer_syntax)
        nframes = _number_of_frames(full)
        return PixelSource(store, inst, full, ts, tag, 0, len(full[tag].value), nframes, None, full)
    fh = open_blob(store, inst)
    try:
        header = dcmread(fh, stop_before_pixels=True)
        ts = UID(str(header.file_meta.get("TransferSyntaxUID", inst.transfer_syntax)))
        nframes = _number_of_frames(header)
        tag_offset = fh.tell()
        head = fh.read(12)
        if len(head) < 8:
            raise NoPixelData("the instance has no pixel data")
        endian = ">" if ts == ExplicitVRBigEndian else "<"
        group, element = struct.unpack(f"{endian}HH", head[:4])
        tag = (group << 16) | element
        if tag not in PIXEL_TAGS:
            raise NoPixelData("the instance has no pixel data")
        if ts == ImplicitVRLittleEndian:
            (length,) = struct.unpack("<I", head[4:8])
            value_offset = tag_offset + 8
        else:
            (length,) = struct.unpack(f"{endian}I", head[8:12])
            value_offset = tag_offset + 12
        value_length = None if length == 0xFFFFFFFF else length
        return PixelSource(store, inst, header, ts, tag, value_offset, value_length, nframes, fh)
    except BaseException:
        fh.close()
        raise
