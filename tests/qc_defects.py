"""A defect generator for QC tests (issue 4 "Tests that must exist"): known flaws at rising strength.

Each defect takes a clean instance (a pydicom Dataset with native pixel data) and a strength
(0 = none) and returns a changed copy: noise, blur, clipping, off-centre anatomy, tilt, a stripe
artifact, missing attributes. The pixel values stay within the stored range of the image.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage  # type: ignore[import-untyped]

from gateway.qc.image import exposed_field, reduce

Defect = Callable[[Dataset, float], Dataset]

# Removed in this order: Type 2 / exam-needed first (warnings), then Type 1 (errors)
MISSING_ORDER = ("AccessionNumber", "PatientBirthDate", "StudyID", "ReferringPhysicianName", "SOPClassUID")


def _range(ds: Dataset) -> tuple[int, int]:
    bits = int(ds.BitsStored)
    if int(ds.PixelRepresentation):
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _with_pixels(ds: Dataset, pixels: np.ndarray) -> Dataset:  # type: ignore[type-arg]
    out = copy.deepcopy(ds)
    lo, hi = _range(ds)
    arr = ds.pixel_array
    out.PixelData = np.clip(np.rint(pixels), lo, hi).astype(arr.dtype).tobytes()
    return out


def _f(ds: Dataset) -> np.ndarray:  # type: ignore[type-arg]
    return ds.pixel_array.astype(np.float32)


def _background(img: np.ndarray) -> float:  # type: ignore[type-arg]
    return float(np.percentile(img, 1))


def noise(ds: Dataset, s: float) -> Dataset:
    """Gaussian noise of σ = s · 2 % of the 1–99 % range."""
    img = _f(ds)
    lo, hi = np.percentile(img, [1, 99])
    rng = np.random.default_rng(1)
    return _with_pixels(ds, img + rng.standard_normal(img.shape) * s * 0.02 * (hi - lo))


def blur(ds: Dataset, s: float) -> Dataset:
    """Gaussian blur of σ = s pixels (full resolution)."""
    return _with_pixels(ds, ndimage.gaussian_filter(_f(ds), s) if s > 0 else _f(ds))


def clipping(ds: Dataset, s: float) -> Dataset:
    """The brightest s % of the image clipped flat (saturation)."""
    img = _f(ds)
    return _with_pixels(ds, np.minimum(img, np.percentile(img, 100 - s)) if s > 0 else img)


def _in_field(img: np.ndarray, change: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:  # type: ignore[type-arg]
    """``change`` applied to the exposed field only: the patient moved, not the collimator."""
    small, k = reduce(img.astype(np.float32), 512)
    f = exposed_field(small)
    t, left = f.top * k, f.left * k
    b = img.shape[0] if f.bottom >= small.shape[0] else f.bottom * k
    r = img.shape[1] if f.right >= small.shape[1] else f.right * k
    out = img.copy()
    out[t:b, left:r] = change(img[t:b, left:r])
    return out


def off_center(ds: Dataset, s: float) -> Dataset:
    """The anatomy moved right by s % of the width (background fills in)."""
    img = _f(ds)
    bg = _background(img)
    return _with_pixels(
        ds, _in_field(img, lambda a: ndimage.shift(a, (0, s / 100 * img.shape[1]), order=1, cval=bg))
    )


def tilt(ds: Dataset, s: float) -> Dataset:
    """The anatomy rotated by s degrees about the field centre."""
    img = _f(ds)
    bg = _background(img)
    return _with_pixels(ds, _in_field(img, lambda a: ndimage.rotate(a, s, reshape=False, order=1, cval=bg)))


def stripe(ds: Dataset, s: float) -> Dataset:
    """Bright vertical lines (2 px wide, every 40 px) of s % of the 1–99 % range."""
    img = _f(ds)
    lo, hi = np.percentile(img, [1, 99])
    out = img.copy()
    for x in range(20, img.shape[1] - 2, 40):
        out[:, x : x + 2] += s / 100 * (hi - lo)
    return _with_pixels(ds, out)


def missing(ds: Dataset, s: float) -> Dataset:
    """The first s attributes of :data:`MISSING_ORDER` removed."""
    out = copy.deepcopy(ds)
    for kw in MISSING_ORDER[: int(s)]:
        if kw in out:
            delattr(out, kw)
    return out


DEFECTS: dict[str, tuple[Defect, tuple[float, ...]]] = {
    "noise": (noise, (0, 1, 2, 4, 8, 16)),
    "blur": (blur, (0, 1, 2, 3, 5, 8)),
    "clipping": (clipping, (0, 1, 3, 8, 15, 30)),
    "off_center": (off_center, (0, 5, 10, 20, 30, 45)),
    "tilt": (tilt, (0, 3, 6, 10, 15, 25)),
    "stripe": (stripe, (0, 2, 4, 8, 16, 32)),
    "missing": (missing, (0, 1, 2, 3, 4, 5)),
}
