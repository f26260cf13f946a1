"""Rendering one frame to a consumer image (JPEG or PNG) for WADO-RS ``/rendered`` and ``/thumbnail``.

PS3.18 §8.3.5 (rendered query parameters), §10.4.1.1.3 (Rendered Resources) and §10.4.1.1.4
(Thumbnail Resources); issue 3 §4. The grayscale pipeline is PS3.4 Annex N's (simplified):

1. Modality LUT: Rescale Slope/Intercept (from the Pixel Value Transformation functional group for
   enhanced multi-frame objects) or the Modality LUT Sequence;
2. VOI LUT: the ``window`` parameter if given, else the object's Window Center/Width (functional
   group or top level, first pair) with its VOI LUT Function, else a VOI LUT Sequence, else the
   frame's min/max;
3. Presentation: MONOCHROME1 inverted so that the output is always "bright = high".

Colour images (RGB, YBR_*, PALETTE COLOR) pass through as RGB (the window parameter applies to
grayscale only). The ``viewport`` scales the image to fit, keeping the aspect ratio.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut, convert_color_space

RENDER_MEDIA_TYPES = ("image/jpeg", "image/png")
DEFAULT_QUALITY = 90
THUMBNAIL_VIEWPORT = (128, 128)
WINDOW_FUNCTIONS = ("linear", "linear-exact", "sigmoid")

FloatArray = npt.NDArray[np.float64]
ByteArray = npt.NDArray[np.uint8]


class RenderParamError(ValueError):
    """A rendering query parameter is malformed or out of range (→ 400; message names it)."""


@dataclass(frozen=True)
class Window:
    """A VOI window (PS3.3 C.11.2.1.2): centre, width and the function applied."""

    center: float
    width: float
    function: str = "linear"


@dataclass(frozen=True)
class Viewport:
    """PS3.18 §8.3.5.1.3: output size (either may be None: keep aspect) and an optional source region."""

    width: int | None
    height: int | None
    region: tuple[int, int, int, int] | None = None  # sx, sy, sw, sh


@dataclass(frozen=True)
class RenderParams:
    """The parsed rendering parameters of one request."""

    media_type: str = "image/jpeg"
    window: Window | None = None
    viewport: Viewport | None = None
    quality: int = DEFAULT_QUALITY


def _numbers(name: str, value: str, count: tuple[int, ...]) -> list[str]:
    parts = [p.strip() for p in value.split(",")]
    if len(parts) not in count:
        want = " or ".join(str(c) for c in count)
        raise RenderParamError(f"{name}={value!r}: expected {want} comma-separated values")
    return parts


def parse_window(value: str) -> Window:
    """``window=center,width[,function]`` (PS3.18 §8.3.5.1.4)."""
    parts = _numbers("window", value, (2, 3))
    try:
        center, width = float(parts[0]), float(parts[1])
    except ValueError:
        raise RenderParamError(f"window={value!r}: center and width must be numbers") from None
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 0:
        raise RenderParamError(f"window={value!r}: width must be a number greater than 0")
    function = (parts[2] if len(parts) == 3 else "linear").lower().replace("_", "-")
    if function not in WINDOW_FUNCTIONS:
        raise RenderParamError(f"window={value!r}: function must be one of {', '.join(WINDOW_FUNCTIONS)}")
    return Window(center, width, function)


def parse_viewport(value: str) -> Viewport:
    """``viewport=vw,vh[,sx,sy,sw,sh]`` (PS3.18 §8.3.5.1.3); vw or vh may be empty."""
    parts = _numbers("viewport", value, (2, 6))

    def size(text: str) -> int | None:
        if text == "":
            return None
        if not text.isdigit() or not 1 <= int(text) <= 8192:
            raise RenderParamError(f"viewport={value!r}: sizes must be integers from 1 to 8192")
        return int(text)

    vw, vh = size(parts[0]), size(parts[1])
    if vw is None and vh is None:
        raise RenderParamError(f"viewport={value!r}: give a width, a height or both")
    region = None
    if len(parts) == 6:
        try:
            sx, sy, sw, sh = (int(p) for p in parts[2:])
        except ValueError:
            raise RenderParamError(f"viewport={value!r}: the source region must be integers") from None
        if sx < 0 or sy < 0 or sw <= 0 or sh <= 0:
            raise RenderParamError(
                f"viewport={value!r}: the source region needs sx,sy >= 0 and sw,sh > 0 (no flipping)"
            )
        region = (sx, sy, sw, sh)
    return Viewport(vw, vh, region)


def parse_params(
    query: Mapping[str, str], media_type: str, *, default_viewport: tuple[int, int] | None = None
) -> RenderParams:
    """The rendering parameters of a request; raises :class:`RenderParamError` for bad values.

    Parameters this server does not implement (``annotation``, ``iccprofile``, ``charset``) are
    ignored, as PS3.18 §8.3.5 allows for a rendering it cannot apply.
    """
    window = parse_window(query["window"]) if "window" in query else None
    if "viewport" in query:
        viewport: Viewport | None = parse_viewport(query["viewport"])
    elif default_viewport is not None:
        viewport = Viewport(*default_viewport)
    else:
        viewport = None
    quality = DEFAULT_QUALITY
    if "quality" in query:
        text = query["quality"].strip()
        if not text.isdigit() or not 1 <= int(text) <= 100:
            raise RenderParamError(f"quality={query['quality']!r}: must be an integer from 1 to 100")
        quality = int(text)
    return RenderParams(media_type, window, viewport, quality)


# --------------------------------------------------------------------------- pixel pipeline


def _functional_group(header: Dataset, frame_index: int, keyword: str) -> Dataset | None:
    """The item of functional group ``keyword`` for a frame (per-frame first, then shared)."""
    groups = (("PerFrameFunctionalGroupsSequence", frame_index), ("SharedFunctionalGroupsSequence", 0))
    for seq_kw, idx in groups:
        seq = header.get(seq_kw)
        if seq and len(seq) > idx and keyword in seq[idx] and len(seq[idx][keyword].value):
            item: Dataset = seq[idx][keyword].value[0]
            return item
    return None


def _first(value: object) -> float:
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = next(iter(value))  # type: ignore[call-overload]
    return float(value)  # type: ignore[arg-type]


def modality_values(arr: npt.NDArray[np.generic], header: Dataset, frame_index: int) -> FloatArray:
    """Stored values → modality values (e.g. Hounsfield units)."""
    fg = _functional_group(header, frame_index, "PixelValueTransformationSequence")
    source = fg if fg is not None and "RescaleSlope" in fg else header
    if "ModalityLUTSequence" in header and fg is None:
        out: FloatArray = np.asarray(apply_modality_lut(arr, header), dtype=np.float64)
        return out
    slope = _first(source.get("RescaleSlope", 1) or 1)
    intercept = _first(source.get("RescaleIntercept", 0) or 0)
    values: FloatArray = arr.astype(np.float64) * slope + intercept
    return values


def apply_window(values: FloatArray, window: Window) -> ByteArray:
    """PS3.3 C.11.2.1.2.1 (LINEAR), C.11.2.1.3.2 (LINEAR_EXACT) and (SIGMOID), output 0–255."""
    c, w = window.center, window.width
    if window.function == "sigmoid":
        out = 255.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
    elif window.function == "linear-exact":
        out = ((values - c) / w + 0.5) * 255.0
    elif w <= 1:
        out = np.where(values > c - 0.5, 255.0, 0.0)
    else:
        out = ((values - (c - 0.5)) / (w - 1) + 0.5) * 255.0
    result: ByteArray = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return result


def _default_window(header: Dataset, frame_index: int) -> Window | None:
    fg = _functional_group(header, frame_index, "FrameVOILUTSequence")
    for source in (fg, header):
        if source is None or "WindowCenter" not in source or "WindowWidth" not in source:
            continue
        try:
            center, width = _first(source.WindowCenter), _first(source.WindowWidth)
        except (TypeError, ValueError, IndexError):
            continue
        if width > 0:
            function = str(source.get("VOILUTFunction", "LINEAR") or "LINEAR").lower().replace("_", "-")
            return Window(center, width, function if function in WINDOW_FUNCTIONS else "linear")
    return None


def grayscale(
    arr: npt.NDArray[np.generic], header: Dataset, frame_index: int, photometric: str, window: Window | None
) -> ByteArray:
    """A grayscale frame as 8-bit display values (modality LUT, VOI, MONOCHROME1 inversion)."""
    values = modality_values(arr, header, frame_index)
    chosen = window or _default_window(header, frame_index)
    if chosen is not None:
        out = apply_window(values, chosen)
    elif "VOILUTSequence" in header:
        lut_item = header.VOILUTSequence[0]
        bits = int(lut_item.LUTDescriptor[2]) if "LUTDescriptor" in lut_item else 16
        mapped = apply_voi_lut(np.rint(values).astype(np.int64), header, prefer_lut=True)
        out = np.clip(np.asarray(mapped, np.float64) / float(2**bits - 1) * 255.0, 0, 255).astype(np.uint8)
    else:
        lo, hi = float(values.min()), float(values.max())
        scaled = (values - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(values)
        out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


def colour(arr: npt.NDArray[np.generic], header: Dataset, frame: Dataset, photometric: str) -> ByteArray:
    """A colour frame as 8-bit RGB."""
    if photometric == "PALETTE COLOR":
        rgb = np.asarray(apply_color_lut(arr, header))
        bits = 16 if rgb.dtype.itemsize > 1 else 8
    else:
        rgb = np.asarray(arr)
        if photometric.startswith("YBR") and photometric != "YBR_ICT" and photometric != "YBR_RCT":
            rgb = np.asarray(convert_color_space(rgb, photometric, "RGB"))
        bits = int(frame.get("BitsStored", 8) or 8)
    if bits > 8:
        rgb = np.right_shift(rgb.astype(np.uint32), bits - 8)
    out: ByteArray = np.clip(rgb, 0, 255).astype(np.uint8)
    return out


def to_image(frame: Dataset, header: Dataset, frame_index: int, window: Window | None) -> Image.Image:
    """One decoded frame (from :meth:`PixelSource.frame_dataset`) as a Pillow image (L or RGB)."""
    arr = frame.pixel_array
    photometric = str(frame.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if int(frame.get("SamplesPerPixel", 1)) == 1 and photometric != "PALETTE COLOR":
        if arr.ndim == 3:  # a single frame array should be 2-D; be tolerant
            arr = arr[0]
        return Image.fromarray(grayscale(arr, header, frame_index, photometric, window))
    return Image.fromarray(np.ascontiguousarray(colour(arr, header, frame, photometric)))


def fit(img: Image.Image, viewport: Viewport | None) -> Image.Image:
    """Crop to the viewport's source region, then scale to fit it keeping the aspect ratio."""
    if viewport is None:
        return img
    if viewport.region is not None:
        sx, sy, sw, sh = viewport.region
        if sx >= img.width or sy >= img.height:
            raise RenderParamError(
                f"viewport source region starts at ({sx},{sy}), outside the {img.width}x{img.height} image"
            )
        img = img.crop((sx, sy, min(sx + sw, img.width), min(sy + sh, img.height)))
    scales = []
    if viewport.width is not None:
        scales.append(viewport.width / img.width)
    if viewport.height is not None:
        scales.append(viewport.height / img.height)
    scale = min(scales)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    if size == img.size:
        return img
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode(img: Image.Image, params: RenderParams) -> bytes:
    buf = io.BytesIO()
    if params.media_type == "image/png":
        img.save(buf, format="PNG", compress_level=6)
    else:
        img.save(buf, format="JPEG", quality=params.quality)
    return buf.getvalue()


def render(frame: Dataset, header: Dataset, frame_index: int, params: RenderParams) -> bytes:
    """Frame ``frame_index`` (0-based; ``frame`` is its decoded one-frame dataset) as JPEG or PNG."""
    img = to_image(frame, header, frame_index, params.window)
    return encode(fit(img, params.viewport), params)
