"""The image QC measures work on: one frame, grey, float, at most ``max_size`` pixels a side.

R-QC-1, R-CE-5. Large images (a 2500×2048 radiograph) are reduced by block means before any
measure runs, so QC keeps up with ingest on two cores (``bench/qc.py``); the thresholds in
``config/qc.toml`` are for the reduced image. Two masks follow from it:

- the **exposed field**: the image minus collimated edge bands. A band is collimated when the
  rows (columns) from an edge are flat — standard deviation below 2 % of the image's 1–99 %
  range — and bright (unexposed detector reads as attenuation in MONOCHROME2, mean in the top
  15 % of the range);
- the **anatomy**: inside the field, pixels above Otsu's threshold, the largest connected part,
  holes filled (lungs, ventricles are anatomy too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage  # type: ignore[import-untyped]

FloatImage = npt.NDArray[np.float32]
Mask = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Field:
    """The exposed field as the rows ``top:bottom`` and columns ``left:right`` of the image."""

    top: int
    bottom: int
    left: int
    right: int

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def width(self) -> int:
        return self.right - self.left


@dataclass(frozen=True)
class WorkingImage:
    """One reduced frame with its field, its anatomy mask, and the frame's value extremes."""

    pixels: FloatImage
    factor: int  # block size of the reduction (1: full resolution)
    field: Field
    anatomy: Mask  # same shape as ``pixels``, False outside the field
    full_min: float  # extremes of the full-resolution frame (clipping is judged against them)
    full_max: float

    @property
    def field_pixels(self) -> FloatImage:
        f = self.field
        return self.pixels[f.top : f.bottom, f.left : f.right]

    @property
    def field_anatomy(self) -> Mask:
        f = self.field
        return self.anatomy[f.top : f.bottom, f.left : f.right]


def grey_frame(pixels: npt.NDArray[Any], photometric: str, samples: int) -> FloatImage:
    """The first frame as float32 grey, brighter = more signal (MONOCHROME1 is inverted)."""
    arr = np.asarray(pixels)
    if samples > 1:
        if arr.ndim == 4:  # frames, rows, columns, samples
            arr = arr[0]
        # ITU-R BT.601 luma; YBR data is already luma in its first sample
        if photometric.startswith("YBR"):
            grey = arr[..., 0].astype(np.float32)
        else:
            grey = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    else:
        grey = (arr[0] if arr.ndim == 3 else arr).astype(np.float32)
    if photometric == "MONOCHROME1":
        grey = grey.max() + grey.min() - grey
    return np.ascontiguousarray(grey, dtype=np.float32)


def reduce(frame: FloatImage, max_size: int) -> tuple[FloatImage, int]:
    """Block means of ``k×k`` pixels, ``k`` the smallest integer that brings both sides ≤ max_size."""
    k = max(1, -(-max(frame.shape) // max_size))
    if k == 1:
        return frame, 1
    rows, cols = (frame.shape[0] // k) * k, (frame.shape[1] // k) * k
    # rows of each block first (contiguous), then columns: 5x faster than one mean over a 4-D view
    # of the frame (8 ms for a 2500x2048 DX); equal to it up to float32 rounding
    strips = frame[:rows, :cols].reshape(rows // k, k, cols).sum(axis=1, dtype=np.float32)
    blocks = strips.reshape(rows // k, cols // k, k).sum(axis=2, dtype=np.float32)
    blocks *= np.float32(1.0 / (k * k))
    return blocks, k


def _flat_band(
    profile_std: npt.NDArray[Any], profile_mean: npt.NDArray[Any], flat: float, bright: float
) -> int:
    """How many leading entries are flat and bright (a collimated band from this edge)."""
    ok = (profile_std < flat) & (profile_mean > bright)
    if not ok[0]:
        return 0
    stop = np.flatnonzero(~ok)
    return int(stop[0]) if stop.size else len(ok)


def exposed_field(img: FloatImage) -> Field:
    """The image minus flat, bright edge bands (collimation), see the module docstring."""
    lo, hi = np.percentile(img, [1, 99])
    span = float(hi - lo) or 1.0
    flat, bright = 0.02 * span, float(lo) + 0.85 * span
    rs, rm = img.std(axis=1), img.mean(axis=1)
    cs, cm = img.std(axis=0), img.mean(axis=0)
    top = _flat_band(rs, rm, flat, bright)
    bottom = img.shape[0] - _flat_band(rs[::-1], rm[::-1], flat, bright)
    left = _flat_band(cs, cm, flat, bright)
    right = img.shape[1] - _flat_band(cs[::-1], cm[::-1], flat, bright)
    if bottom - top < img.shape[0] // 4 or right - left < img.shape[1] // 4:
        return Field(0, img.shape[0], 0, img.shape[1])  # a "field" that small is an image, not collimation
    # a margin off each collimated side: a reduced block may straddle the collimator's edge, and
    # the edge itself may be soft (penumbra)
    m = max(2, min(img.shape) // 64)
    top, left = top + m * (top > 0), left + m * (left > 0)
    bottom, right = bottom - m * (bottom < img.shape[0]), right - m * (right < img.shape[1])
    return Field(top, bottom, left, right)


def otsu_threshold(values: npt.NDArray[Any], bins: int = 256) -> float:
    """Otsu's threshold: the split of the histogram maximising the between-class variance (the
    middle of a plateau of maxima)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = (w0 * w1 * (mu0 - mu1) ** 2)[:-1]
    # empty bins between two classes give a plateau: take its middle, not its first bin
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float(centres[(int(best[0]) + int(best[-1])) // 2])


def anatomy_mask(field_pixels: FloatImage) -> Mask:
    """Above Otsu's threshold, largest connected part, holes filled (see module docstring)."""
    smooth = ndimage.uniform_filter(field_pixels, 3)
    above = smooth > otsu_threshold(smooth)
    labels, n = ndimage.label(above)
    if n == 0:
        return np.zeros(field_pixels.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = labels == int(np.argmax(sizes))
    filled: Mask = ndimage.binary_fill_holes(largest)
    return filled


def detail_window(frame: FloatImage, w: WorkingImage, size: int = 256) -> tuple[FloatImage, Mask]:
    """A full-resolution window (≤ ``size`` a side) at the centre of the exposed field, with the
    anatomy mask scaled up to it: noise and sharpness are pixel-scale properties that reduction
    would average away."""
    k, f = w.factor, w.field
    top, bottom, left, right = f.top * k, f.bottom * k, f.left * k, f.right * k
    cy, cx = (top + bottom) // 2, (left + right) // 2
    hh, hw = min(size, bottom - top) // 2, min(size, right - left) // 2
    y0, x0 = cy - hh, cx - hw
    window = frame[y0 : y0 + 2 * hh, x0 : x0 + 2 * hw]
    ys = np.minimum(np.arange(y0, y0 + 2 * hh) // k, w.anatomy.shape[0] - 1)
    xs = np.minimum(np.arange(x0, x0 + 2 * hw) // k, w.anatomy.shape[1] - 1)
    mask: Mask = w.anatomy[np.ix_(ys, xs)]
    return window, mask


def working_image(frame: FloatImage, max_size: int) -> WorkingImage:
    """Reduce ``frame``, find its field and anatomy."""
    pixels, k = reduce(frame, max_size)
    field = exposed_field(pixels)
    anatomy = np.zeros(pixels.shape, dtype=bool)
    anatomy[field.top : field.bottom, field.left : field.right] = anatomy_mask(
        pixels[field.top : field.bottom, field.left : field.right]
    )
    return WorkingImage(pixels, k, field, anatomy, float(frame.min()), float(frame.max()))
