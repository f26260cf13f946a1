"""Decompression of stored instances for peers that do not take the stored transfer syntax.

The one transcoding path of both edges (R-UP-1: what the front-end stores compressed must still
reach any peer; issue 3 §4, issue 4 §1): WADO-RS ``transfer-syntax=1.2.840.10008.1.2.1``
(``dicomweb/wado.py``, ``dicomweb/frames.py``) and C-MOVE / C-GET sub-operations to a peer that
accepted only uncompressed syntaxes (``dimse/server.py``). Only ever *decoding*: nothing here
encodes, so lossy data is never re-encoded (a lossy source decodes to its lossy pixels and keeps
Lossy Image Compression "01").

Decoding uses pydicom's decoders (pylibjpeg, openjpeg, pyjpegls, pydicom's RLE) and falls back to
dcmtk's command-line decoders (``dcmdjpls``, ``dcmdjpeg``, ``dcmdrle``; ``dcmconv`` for big
endian), which the project installs anyway (Makefile ``APT_PKGS``). The SOP Instance UID is kept:
transcoding changes the encoding, not the instance (PS3.18 §8.7.3.5.2, PS3.4 C.4.2.3 / C.4.3.3).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from collections.abc import Collection
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

NATIVE = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian)
# What a decoded instance may be sent in: the two syntaxes every DICOM peer must support.
UNCOMPRESSED_TARGETS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

# dcmtk decoders per transfer syntax (fallback when pydicom has no plugin for it).
_DCMTK_JPEG = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57")
_DCMTK_TOOLS: dict[str, list[str]] = {
    **{ts: ["dcmdjpeg"] for ts in (*_DCMTK_JPEG, "1.2.840.10008.1.2.4.70")},
    "1.2.840.10008.1.2.4.80": ["dcmdjpls"],
    "1.2.840.10008.1.2.4.81": ["dcmdjpls"],
    "1.2.840.10008.1.2.5": ["dcmdrle"],
    ExplicitVRBigEndian: ["dcmconv", "+te"],
}


class CannotDecode(ValueError):
    """No available decoder (pydicom plugin or dcmtk tool) handles this transfer syntax."""


def _dcmtk(tool: str) -> str | None:
    return shutil.which(tool)


def can_decode(ts: str) -> bool:
    """Whether an instance in ``ts`` can be turned into Explicit VR Little Endian here."""
    uid = UID(ts)
    if uid in NATIVE and uid != ExplicitVRBigEndian:
        return True
    if uid.is_compressed and get_decoder(uid).is_available:
        return True
    tool = _DCMTK_TOOLS.get(str(uid))
    return tool is not None and _dcmtk(tool[0]) is not None


def _decode_with_dcmtk(data: bytes, ts: str) -> bytes:
    """Run the dcmtk decoder for ``ts`` over a Part-10 file; the result is Explicit VR LE."""
    cmd = _DCMTK_TOOLS.get(ts)
    exe = _dcmtk(cmd[0]) if cmd else None
    if cmd is None or exe is None:
        raise CannotDecode(f"no decoder available for transfer syntax {ts} ({UID(ts).name})")
    with tempfile.TemporaryDirectory(prefix="ybyx-decode-") as tmp:
        src, dst = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        src.write_bytes(data)
        args = [exe, *cmd[1:], str(src), str(dst)]
        done = subprocess.run(args, capture_output=True, text=True, timeout=120)
        if done.returncode != 0 or not dst.exists():
            raise CannotDecode(f"{cmd[0]} could not decode {UID(ts).name}: {done.stderr.strip()[:300]}")
        return dst.read_bytes()


def write_part10(ds: Dataset) -> bytes:
    """``ds`` as a Part-10 file in its file meta's transfer syntax."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def decode_dataset(ds: Dataset) -> Dataset:
    """``ds`` (with pixel data) in Explicit VR Little Endian, decoded if it was compressed.

    The SOP Instance UID is kept. pydicom converts lossy JPEG's YBR to RGB, as dcmtk's
    ``dcmdjpeg`` does.
    """
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    if ts == ExplicitVRLittleEndian:
        return ds
    if ts in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return ds
    if ts.is_compressed and get_decoder(ts).is_available:
        try:
            ds.decompress(generate_instance_uid=False)
            return ds
        except Exception:
            if str(ts) not in _DCMTK_TOOLS:
                raise
    return dcmread(io.BytesIO(_decode_with_dcmtk(write_part10(ds), str(ts))))


def to_explicit_le(data: bytes, ts: str) -> bytes:
    """A stored Part-10 file (``data``, in ``ts``) re-encoded as Explicit VR Little Endian."""
    if ts == ExplicitVRLittleEndian:
        return data
    uid = UID(ts)
    if uid == ExplicitVRBigEndian or (uid.is_compressed and not get_decoder(uid).is_available):
        return _decode_with_dcmtk(data, ts)
    return write_part10(decode_dataset(dcmread(io.BytesIO(data))))


def decompressed(data: bytes, ts: str, target: str) -> Dataset:
    """The stored Part-10 file ``data`` (in ``ts``) decoded, as a data set whose file meta says
    ``target`` (Explicit or Implicit VR Little Endian): for a DIMSE peer that accepted only
    uncompressed syntaxes. Raises :class:`CannotDecode` (or the decoder's error) if it cannot."""
    if target not in UNCOMPRESSED_TARGETS:
        raise ValueError(f"{target} is not an uncompressed little-endian transfer syntax")
    uid = UID(ts)
    ds: Dataset
    if uid == ExplicitVRBigEndian or (uid.is_compressed and not get_decoder(uid).is_available):
        ds = dcmread(io.BytesIO(_decode_with_dcmtk(data, ts)))
    else:
        ds = decode_dataset(dcmread(io.BytesIO(data)))
    ds.file_meta.TransferSyntaxUID = UID(target)
    # the data set was read as explicit VR: say it is to be encoded as ``target`` (pynetdicom
    # refuses a data set whose encoding and file meta disagree)
    ds.set_original_encoding(target == ImplicitVRLittleEndian, True)
    return ds


def sendable_syntax(stored: str, accepted: Collection[str]) -> str | None:
    """The transfer syntax to send an instance stored in ``stored`` to a peer that accepted
    ``accepted`` for its SOP class: the stored one if accepted (bytes as stored); else Explicit,
    then Implicit VR Little Endian if accepted and ``stored`` can be decoded here; else None
    (the instance cannot be sent: never a syntax the peer did not accept, never a lossy re-encode).
    """
    if stored in accepted:
        return stored
    for target in UNCOMPRESSED_TARGETS:
        if target in accepted and can_decode(stored):
            return str(target)
    return None
