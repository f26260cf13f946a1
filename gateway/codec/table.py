"""The codec table: which lossless transfer syntaxes the front-end can compress to (R-UP-1).

One entry per codec, keyed by the name used in config (``[compression] transfer_syntax``). An
entry says which transfer syntax it writes, which pydicom encoding plugin does the work (with its
options), and which images it can take. Adding a codec (e.g. HTJ2K lossless once an encoder exists
on PyPI: pydicom 3 registers none today) is one more :class:`Codec` in :data:`CODECS`.

The transfer syntax lists below classify what arrives: native (uncompressed), compressed
losslessly, or anything else (lossy, or unknown, which is treated as lossy: never re-encoded).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

NATIVE = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian})
# Lossless, but not native: left alone unless ``transcode_lossless`` (deflate compresses the whole
# data set; the others are encapsulated lossless pixel data).
LOSSLESS_COMPRESSED = frozenset(
    {
        DeflatedExplicitVRLittleEndian,
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEG2000Lossless,
        JPEG2000MCLossless,
        RLELossless,
        HTJ2KLossless,
        HTJ2KLosslessRPCL,
    }
)


@dataclass(frozen=True)
class PixelDescription:
    """What a codec needs to know of an image to say whether it can encode it losslessly."""

    samples_per_pixel: int
    photometric: str
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    rows: int
    columns: int
    frames: int


def _monochrome_or_rgb(p: PixelDescription) -> str | None:
    if p.samples_per_pixel == 1 and p.photometric in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"):
        return None
    if p.samples_per_pixel == 3 and p.photometric == "RGB":
        return None
    # YBR_* colour would need the colour transform rules of each syntax (PS3.5 8.2): kept as is
    return f"photometric interpretation {p.photometric} with {p.samples_per_pixel} samples"


def _jpeg_ls(p: PixelDescription) -> str | None:
    if p.bits_allocated not in (8, 16) or not 2 <= p.bits_stored <= 16:
        return f"JPEG-LS takes 2-16 bits stored in 8 or 16 allocated, not {p.bits_stored}/{p.bits_allocated}"
    return _monochrome_or_rgb(p)


def _jpeg_2000(p: PixelDescription) -> str | None:
    if p.bits_allocated not in (8, 16) or not 1 <= p.bits_stored <= 16:
        return f"JPEG 2000 (here) takes up to 16 bits, not {p.bits_stored}/{p.bits_allocated}"
    return _monochrome_or_rgb(p)


def _rle(p: PixelDescription) -> str | None:
    if p.bits_allocated not in (8, 16, 32):
        return f"RLE takes 8, 16 or 32 bits allocated, not {p.bits_allocated}"
    return _monochrome_or_rgb(p)


@dataclass(frozen=True)
class Codec:
    """One lossless codec: its config name, the transfer syntax it writes, how pydicom encodes it.

    ``why_not`` returns None when the codec can encode an image losslessly, else the reason.
    """

    name: str
    transfer_syntax: UID
    plugin: str  # pydicom encoding plugin
    why_not: Callable[[PixelDescription], str | None]
    options: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    # What RGB becomes in the header: JPEG 2000 lossless codes colour with its reversible
    # component transform, which PS3.3 (e.g. the US IOD) names YBR_RCT.
    rgb_photometric: str = "RGB"
    # pydicom decoding plugin that checks each result (not GDCM: the tests use it as the
    # independent second decoder)
    decoder: str = "pylibjpeg"

    def available(self) -> bool:
        """Whether pydicom has a working encoder for it (the plugin's package is installed)."""
        from pydicom.pixels.encoders.base import get_encoder

        try:
            encoder = get_encoder(self.transfer_syntax)
        except NotImplementedError:
            return False
        return self.plugin in encoder.available_plugins


CODECS: dict[str, Codec] = {
    codec.name: codec
    for codec in (
        Codec(
            "jpeg-ls",
            JPEGLSLossless,
            "pyjpegls",
            _jpeg_ls,
            description="JPEG-LS lossless (CharLS via pyjpegls): the default, fast and small",
            decoder="pyjpegls",
        ),
        Codec(
            "jpeg2000",
            JPEG2000Lossless,
            "pylibjpeg",
            _jpeg_2000,
            options={"use_mct": True},
            description="JPEG 2000 lossless (OpenJPEG via pylibjpeg-openjpeg): ~5x slower than JPEG-LS",
            rgb_photometric="YBR_RCT",
        ),
        Codec(
            "rle",
            RLELossless,
            "pylibjpeg",
            _rle,
            description="RLE lossless (pylibjpeg-rle): fastest, least compression",
        ),
    )
}


def codec_for(name: str) -> Codec:
    """The codec named ``name`` in config; ``KeyError`` names the known ones."""
    try:
        return CODECS[name]
    except KeyError:
        raise KeyError(f"unknown codec {name!r} (known: {', '.join(sorted(CODECS))})") from None
