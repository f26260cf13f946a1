"""Lossless compression of one Part-10 file, proven bit-exact before it may replace the original.

R-UP-1 (lossless compression per DICOM before upload), issue 4 §1. :func:`compress` takes the
bytes of a stored instance and returns either the compressed file or the reason it keeps the
original. The rules, in order:

* no Pixel Data (7FE0,0010), or already in the target syntax: kept;
* a lossy source (a lossy or unknown transfer syntax, or Lossy Image Compression "01") is never
  re-encoded;
* data compressed losslessly already (JPEG lossless, JPEG-LS, JPEG 2000 lossless, RLE, HTJ2K
  lossless, deflate) is left alone unless ``transcode_lossless``;
* images the codec cannot encode losslessly (its :attr:`Codec.why_not`) are kept;
* native pixel data must be exactly what its decoded array says (no bits set outside Bits Stored,
  which a lossless codec of Bits Stored precision would drop) — else kept;
* the result is decoded again (pydicom + pylibjpeg / pyjpegls) and compared bit for bit with the
  original pixels; any difference is a *mismatch*: kept, logged and counted by the caller;
* every header element but Pixel Data (and the extended offset table) and Planar Configuration is
  compared with the original's; the file meta changes only in its Transfer Syntax UID and the
  implementation that wrote the file;
* a result that is not smaller than the original is not kept.

Planar Configuration: encapsulated colour pixel data carries its own component layout, and PS3.5
§8.2 says the attribute shall then be 0; a native RGB source with Planar Configuration 1 gets 0.
Photometric Interpretation: RGB coded by JPEG 2000 lossless uses the reversible component
transform and is then YBR_RCT (PS3.5 §8.2.4; the US IOD allows nothing else); the decoded pixels
are the original RGB values.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom import dcmread, dcmwrite
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pixel_array
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRBigEndian

from gateway.codec.table import LOSSLESS_COMPRESSED, NATIVE, Codec, PixelDescription

log = logging.getLogger(__name__)

IMPLEMENTATION_VERSION = "YBYX_CODEC_1"
# Elements the compression may change (besides the file meta): the pixel data and its tables,
# and Planar Configuration (see the module docstring).
_CHANGED = frozenset({0x7FE00010, 0x7FE00001, 0x7FE00002, 0x00280006})
_PHOTOMETRIC = 0x00280004


class Status(StrEnum):
    COMPRESSED = "compressed"
    KEPT = "kept"  # a rule says: keep the original (the reason says which)
    MISMATCH = "mismatch"  # decoding the result did not give the original pixels back
    FAILED = "failed"  # the encoder or decoder raised


@dataclass(frozen=True)
class Outcome:
    """What :func:`compress` did; ``data`` is the new Part-10 file when ``status`` is COMPRESSED."""

    status: Status
    reason: str
    size_before: int
    size_after: int = 0
    data: bytes | None = None
    source_syntax: str = ""
    encode_seconds: float = 0.0
    verify_seconds: float = 0.0

    @property
    def ratio(self) -> float:
        return self.size_before / self.size_after if self.size_after else 0.0


def describe(ds: Dataset) -> PixelDescription:
    """The image pixel module values a codec decides on (missing ones read as 0 or empty)."""

    def num(keyword: str, default: int = 0) -> int:
        value = ds.get(keyword)
        try:
            return int(value) if value not in (None, "") else default
        except (TypeError, ValueError):
            return default

    return PixelDescription(
        samples_per_pixel=num("SamplesPerPixel", 1),
        photometric=str(ds.get("PhotometricInterpretation", "")).strip(),
        bits_allocated=num("BitsAllocated"),
        bits_stored=num("BitsStored"),
        pixel_representation=num("PixelRepresentation"),
        rows=num("Rows"),
        columns=num("Columns"),
        frames=num("NumberOfFrames", 1) or 1,
    )


def _native_bytes_match(ds: Dataset, arr: npt.NDArray[Any], p: PixelDescription, big_endian: bool) -> bool:
    """Whether the native Pixel Data bytes are exactly ``arr`` laid out as the header says."""
    shaped = arr.reshape(p.frames, p.rows, p.columns, p.samples_per_pixel)
    if p.samples_per_pixel > 1 and int(ds.get("PlanarConfiguration", 0)) == 1:
        shaped = shaped.transpose(0, 3, 1, 2)
    dtype = arr.dtype.newbyteorder(">" if big_endian else "<")
    expected = np.ascontiguousarray(shaped, dtype=dtype).tobytes()
    raw = ds.PixelData
    return bool(raw[: len(expected)] == expected) and len(raw) - len(expected) in (0, 1)


def _header_changes(before: Dataset, after: Dataset, photometric: str) -> list[str]:
    """Tags (as text) whose presence or value differs outside the elements compression changes
    (Photometric Interpretation may become ``photometric``)."""
    tags = (set(before.keys()) | set(after.keys())) - _CHANGED
    changed = []
    for tag in sorted(tags):
        a, b = before.get_item(tag), after.get_item(tag)
        if (
            isinstance(a, RawDataElement)
            and isinstance(b, RawDataElement)
            and (a.VR, a.value) == (b.VR, b.value)
        ):
            continue  # same bytes (the usual case, explicit VR both): no need to convert the values
        if tag == _PHOTOMETRIC and tag in after and str(after[tag].value) == photometric:
            continue
        if tag not in before or tag not in after or before[tag].value != after[tag].value:
            changed.append(f"({tag >> 16:04X},{tag & 0xFFFF:04X})")
    return changed


def compress(data: bytes, codec: Codec, *, transcode_lossless: bool = False) -> Outcome:
    """Compress the Part-10 file ``data`` with ``codec`` if the rules above allow it."""
    size = len(data)
    try:
        ds = dcmread(io.BytesIO(data))
    except Exception as exc:  # stored instances were checked at ingest; this is a damaged blob
        return Outcome(Status.FAILED, f"not readable as DICOM: {exc}", size)
    source = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))

    def kept(reason: str) -> Outcome:
        return Outcome(Status.KEPT, reason, size, source_syntax=source)

    if 0x7FE00010 not in ds:
        return kept("no Pixel Data")
    if source == codec.transfer_syntax:
        return kept(f"already {codec.name}")
    if str(ds.get("LossyImageCompression", "")).strip() == "01":
        return kept("lossy source (Lossy Image Compression 01): never re-encoded")
    if source in LOSSLESS_COMPRESSED:
        if not transcode_lossless:
            return kept(f"already compressed losslessly ({source.name})")
    elif source not in NATIVE:
        return kept(f"lossy or unknown transfer syntax {source}: never re-encoded")
    pixels = describe(ds)
    if pixels.rows <= 0 or pixels.columns <= 0:
        return kept("Rows or Columns missing")
    why_not = codec.why_not(pixels)
    if why_not is not None:
        return kept(why_not)

    try:
        reference = pixel_array(ds, raw=True)
    except Exception as exc:
        return Outcome(
            Status.FAILED, f"original pixel data could not be decoded: {exc}", size, source_syntax=source
        )
    if source in NATIVE and not _native_bytes_match(ds, reference, pixels, source == ExplicitVRBigEndian):
        return kept("pixel data has bits set outside Bits Stored (a lossless codec would drop them)")

    started = time.perf_counter()
    try:
        out = dcmread(io.BytesIO(data))
        for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
            if keyword in out:
                delattr(out, keyword)
        photometric = pixels.photometric
        if pixels.samples_per_pixel > 1:
            out.PlanarConfiguration = 0
            if pixels.photometric == "RGB":
                photometric = out.PhotometricInterpretation = codec.rgb_photometric
        out.compress(
            codec.transfer_syntax,
            reference,
            encoding_plugin=codec.plugin,
            generate_instance_uid=False,  # pydicom's default would give the instance a new UID
            **codec.options,
        )
        out.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        out.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION
        buf = io.BytesIO()
        dcmwrite(buf, out, enforce_file_format=True)
        encoded = buf.getvalue()
    except Exception as exc:
        return Outcome(Status.FAILED, f"{codec.name} encoder failed: {exc}", size, source_syntax=source)
    encode_seconds = time.perf_counter() - started
    if len(encoded) >= size:
        return Outcome(
            Status.KEPT,
            f"{codec.name} result ({len(encoded)} bytes) is not smaller than the original ({size})",
            size,
            len(encoded),
            source_syntax=source,
            encode_seconds=encode_seconds,
        )

    started = time.perf_counter()

    def mismatch(reason: str) -> Outcome:
        return Outcome(Status.MISMATCH, reason, size, len(encoded), source_syntax=source)

    try:
        check = dcmread(io.BytesIO(encoded))
        decoded = pixel_array(check, raw=True, decoding_plugin=codec.decoder)
    except Exception as exc:
        return mismatch(f"the {codec.name} result could not be decoded: {exc}")
    same = decoded.dtype == reference.dtype and decoded.shape == reference.shape
    if not same or not np.array_equal(decoded, reference):
        return mismatch(f"{codec.name} result decodes to different pixels")
    changed = _header_changes(ds, check, photometric)
    if changed:
        return mismatch(f"header elements changed: {', '.join(changed[:5])}")
    sop_in_meta = str(ds.file_meta.get("MediaStorageSOPInstanceUID", ""))
    if str(check.file_meta.get("MediaStorageSOPInstanceUID", "")) != sop_in_meta:
        return mismatch("file meta SOP Instance UID changed")
    verify_seconds = time.perf_counter() - started
    return Outcome(
        Status.COMPRESSED,
        f"{source.name} -> {codec.transfer_syntax.name}",
        size,
        len(encoded),
        encoded,
        source,
        encode_seconds,
        verify_seconds,
    )
