"""Pixel measures of image quality, each a documented formula on the working image (R-QC-1, R-RT-3).

Notation: ``w`` the working image (``image.WorkingImage``: one grey frame, reduced to ≤ 512 px a
side), ``A`` its anatomy mask, ``F`` its exposed field, ``G_s`` a Gaussian filter of standard
deviation ``s`` pixels, ``MAD`` the median absolute deviation from the median.

============  ================================================================  ===========
measure       formula                                                          unit
============  ================================================================  ===========
noise σ       Immerkær: ``median |w ∗ K| / (0.6745 · 6)`` over eroded A,         stored value
              ``K = [[1,-2,1],[-2,4,-2],[1,-2,1]]`` (for white noise ``w ∗ K``
              has standard deviation ``6σ``; the median ignores edges)
contrast C    ``mean(w | A) − mean(w | F∖A)`` (F∖A ≥ 5 % of F) else
              ``mean(w | A) − P1(w | F)``                                        stored value
snr           ``C / σ``                                                          ratio
graininess    ``100 · 1.4826 · MAD((G_1 − G_3) w | eroded A) / C``: the mottle     % of C
              visible at the 1–3 px scale; white noise of σ gives
              ``σ · sqrt((1 + 1/9 − 4/10) / 4π) = 0.238 σ``
edge_blur     ``sqrt(s² − 1)``, ``s = C / (sqrt(2π) · P99.5 |∇G_1 w| over F)``:    px
              the Gaussian σ of the steepest edges (a step of height C blurred
              by σ_b has peak gradient ``C / (sqrt(2π) sqrt(σ_b² + 1))`` after
              the σ = 1 derivative filter)
clipped       ``100 · |{A : w ≥ max − ε or w ≤ min + ε}| / |A|``, extremes of       % of A
              the full-resolution frame, ``ε = 10⁻⁴ · (max − min)``
stripe        ``100 · max over columns of L(ℓ) / C``, the same over rows; ``ℓ`` the   % of C
              line response ``min(w − w⁻, w − w⁺)`` (bright; ``max`` for dark)
              with ``w∓`` the mean of the pixels 2–3 px before/after across the
              line (a step edge equals one side: response 0), ``L`` the
              deviation ≥ 90 % of the line's pixels share (P10 if > 0, −P90 if
              < 0, else 0): an artifact runs through the image, anatomy does not
ring          ``100 · max_r L_r(w − G_3 w) / C`` for 8 ≤ r ≤ half the field, ``L_r``  % of C
              as for stripe over the pixels at distance r from the field centre
cut           ``100 ·`` fraction of F's one-pixel border that is anatomy            % of border
              (anatomy cut off by the field or image edge)
anatomy       ``100 · |A| / |F|``                                                % of F
field         ``100 · |F| / |w|`` (collimation)                                  % of image
offset        ``100 · hypot((x̄ − x_c)/W, (ȳ − y_c)/H)``, (x̄, ȳ) the centroid of A,   % of F
              (x_c, y_c) F's centre, W×H its size (the centre line)
tilt          angle of A's principal axis, ``½ atan2(2μ₁₁, μ₂₀ − μ₀₂)``, to the    degrees
              nearest image axis; undetermined (None) when A is nearly round
              (eigenvalue ratio < 1.3)
symmetry      ``|A ∩ mirror(A)| / |A ∪ mirror(A)|``, mirrored about the vertical    0–1
              line through x̄
============  ================================================================  ===========
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage  # type: ignore[import-untyped]

from gateway.qc.image import FloatImage, Mask, WorkingImage

_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)
_MIN_PIXELS = 64


def _inner(mask: Mask, field: Mask | None = None) -> Mask:
    """``mask`` eroded by two pixels (edges out), or the whole ``field`` if too little is left."""
    inner: Mask = ndimage.binary_erosion(mask, iterations=2)
    if int(inner.sum()) >= _MIN_PIXELS:
        return inner
    if int(mask.sum()) >= _MIN_PIXELS:
        return mask
    return field if field is not None else np.ones(mask.shape, dtype=bool)


def inner_region(mask: Mask) -> Mask:
    """The region noise and graininess are measured over: ``mask`` eroded (``_inner``); the engine
    erodes once for both."""
    return _inner(mask)


def noise_sigma(img: FloatImage, mask: Mask | None = None, *, region: Mask | None = None) -> float:
    """Immerkær's noise estimate with a median (robust to edges); see the module table.
    ``region``: ``inner_region(mask)`` already computed."""
    response = np.abs(ndimage.convolve(img, _IMMERKAER, mode="reflect"))
    if region is None:
        region = _inner(mask) if mask is not None else np.ones(img.shape, dtype=bool)
    return float(np.median(response[region])) / (0.6745 * 6.0)


def contrast(w: WorkingImage) -> float:
    """Anatomy above background (see the module table); at least one stored unit."""
    fp, fa = w.field_pixels, w.field_anatomy
    if int(fa.sum()) == 0:
        return 1.0
    inside = float(fp[fa].mean())
    outside = fp[~fa]
    background = float(outside.mean()) if outside.size >= 0.05 * fp.size else float(np.percentile(fp, 1))
    return max(abs(inside - background), 1.0)


def graininess(img: FloatImage, mask: Mask, c: float, *, region: Mask | None = None) -> float:
    """Mottle at the 1–3 px scale in % of the contrast (module table); ``region`` as for
    :func:`noise_sigma`."""
    band = ndimage.gaussian_filter(img, 1.0) - ndimage.gaussian_filter(img, 3.0)
    values = band[region if region is not None else _inner(mask)]
    mad = float(np.median(np.abs(values - np.median(values))))
    return 100.0 * 1.4826 * mad / c


def edge_blur(img: FloatImage) -> float:
    """Gaussian σ (px) of the steepest edges, from two derivative scales (module table)."""
    g1 = float(np.percentile(ndimage.gaussian_gradient_magnitude(img, 1.0), 99.5))
    g2 = float(np.percentile(ndimage.gaussian_gradient_magnitude(img, 2.0), 99.5))
    if g2 <= 0 or g1 <= g2:
        return math.inf if g1 <= g2 else 0.0
    r2 = (g1 / g2) ** 2
    return math.sqrt(max((4.0 - r2) / (r2 - 1.0), 0.0))


def clipped(w: WorkingImage) -> float:
    """% of anatomy at the frame's extreme values (module table)."""
    a = w.anatomy
    n = int(a.sum())
    if n == 0:
        return 0.0
    eps = 1e-4 * max(w.full_max - w.full_min, 1.0)
    values = w.pixels[a]
    at_edge = (values >= w.full_max - eps) | (values <= w.full_min + eps)
    return 100.0 * int(at_edge.sum()) / n


def _consistent(values: npt.NDArray[np.float32], axis: int) -> npt.NDArray[np.float64]:
    """Per line, the deviation at least 90 % of its pixels share: P10 if positive, −P90 if
    negative, else 0 (anatomy edges cross a line only in part; an artifact line runs through it)."""
    p10, p90 = np.percentile(values, [10, 90], axis=axis)
    out: npt.NDArray[np.float64] = np.maximum(np.maximum(p10, -p90), 0.0)
    return out


def _line_response(fp: FloatImage, axis: int) -> npt.NDArray[np.float32]:
    """How much each pixel stands out from *both* sides across ``axis`` (2–3 px away): a line
    does, a step edge does not (one side equals it)."""
    before = ndimage.correlate1d(fp, np.array([0.5, 0.5, 0, 0, 0, 0, 0], np.float32), axis=axis)
    after = ndimage.correlate1d(fp, np.array([0, 0, 0, 0, 0, 0.5, 0.5], np.float32), axis=axis)
    up, down = fp - before, fp - after
    bright = np.maximum(np.minimum(up, down), 0)
    dark = np.minimum(np.maximum(up, down), 0)
    out: npt.NDArray[np.float32] = bright + dark
    return out


def stripe(fp: FloatImage, c: float) -> float:
    """Line artifacts through ≥ 90 % of the rows or columns, in % of the contrast (module table)."""
    vertical = _line_response(fp, 1)  # columns that stand out from their neighbours
    horizontal = _line_response(fp, 0)
    worst = max(float(_consistent(vertical, 0).max()), float(_consistent(horizontal, 1).max()))
    return 100.0 * worst / c


@functools.lru_cache(maxsize=16)
def _circles(h: int, w: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """For an h×w image (the same for every slice of a series, hence cached): the flat indices of
    the pixels 8 ≤ r ≤ min(h, w)/2 from the centre, grouped by rounded radius, each group's start
    in that order, and its size."""
    y, x = np.indices((h, w))
    r = np.hypot(y - (h - 1) / 2, x - (w - 1) / 2).round().astype(np.int64).ravel()
    rmax = min(h, w) // 2
    idx = np.flatnonzero((r >= 8) & (r <= rmax))
    order = idx[np.argsort(r[idx], kind="stable")]
    sizes = np.bincount(r[order] - 8, minlength=rmax - 7)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    return order, starts, sizes


def ring(fp: FloatImage, c: float) -> float:
    """Rings about the field centre through ≥ 90 % of their circle, in % of the contrast."""
    d = (fp - ndimage.gaussian_filter(fp, 3.0)).ravel()
    order, starts, n = _circles(*fp.shape)
    vals = d[order].astype(np.float64)
    # sort within each circle at once: offset each circle's values into its own band
    span = float(np.abs(vals).max(initial=0.0)) * 2 + 1
    group = np.repeat(np.arange(n.size), n)
    ds = np.sort(vals + group * span) - np.sort(group * span)
    full = n >= 16
    lo = ds[starts[full] + (0.1 * (n[full] - 1)).astype(np.int64)]  # P10 (lower nearest rank)
    hi = ds[starts[full] + np.ceil(0.9 * (n[full] - 1)).astype(np.int64)]  # P90
    worst = float(max(lo.max(initial=0.0), (-hi).max(initial=0.0), 0.0))
    return 100.0 * worst / c


@dataclass(frozen=True)
class Geometry:
    """Coverage, centre line and positioning of the anatomy in the field."""

    cut: float
    anatomy: float
    field: float
    offset: float
    tilt: float | None
    symmetry: float


def geometry(w: WorkingImage) -> Geometry:
    """The geometric measures of the module table."""
    fa = w.field_anatomy
    h, wd = fa.shape
    field_pct = 100.0 * fa.size / w.pixels.size
    n = int(fa.sum())
    if n == 0:
        return Geometry(0.0, 0.0, field_pct, 100.0, None, 0.0)
    border = np.concatenate([fa[0, :], fa[-1, :], fa[1:-1, 0], fa[1:-1, -1]])
    cut = 100.0 * float(border.mean())
    y, x = np.nonzero(fa)
    cy, cx = float(y.mean()), float(x.mean())
    offset = 100.0 * math.hypot((cx - (wd - 1) / 2) / wd, (cy - (h - 1) / 2) / h)
    mu20 = float(((x - cx) ** 2).mean())
    mu02 = float(((y - cy) ** 2).mean())
    mu11 = float(((x - cx) * (y - cy)).mean())
    spread = math.hypot(mu20 - mu02, 2 * mu11)
    lam1, lam2 = (mu20 + mu02 + spread) / 2, (mu20 + mu02 - spread) / 2
    tilt: float | None = None
    if lam2 > 0 and lam1 / lam2 >= 1.3:
        angle = math.degrees(0.5 * math.atan2(2 * mu11, mu20 - mu02))  # of the major axis, -90..90
        tilt = abs(angle) if abs(angle) <= 45 else 90 - abs(angle)
    # mirror about the vertical line x = cx: column j goes to 2·cx − j
    mirror = np.zeros_like(fa)
    mx = np.rint(2 * cx - x).astype(np.int64)
    inside = (mx >= 0) & (mx < wd)
    mirror[y[inside], mx[inside]] = True
    union = int((fa | mirror).sum())
    symmetry = int((fa & mirror).sum()) / union if union else 0.0
    return Geometry(cut, 100.0 * n / fa.size, field_pct, offset, tilt, symmetry)
