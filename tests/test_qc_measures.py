"""Each QC pixel measure on a synthetic image with a known answer (issue 4 §3, R-QC-1, R-RT-3).

The formulas are in ``gateway/qc/measures.py`` and docs/qc.md; each test builds an image whose
true value follows from the formula and checks the measure finds it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage  # type: ignore[import-untyped]

from gateway.qc import measures
from gateway.qc.image import exposed_field, otsu_threshold, reduce, working_image

RNG = np.random.default_rng(7)


def ellipse(
    shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float, angle: float = 0
) -> np.ndarray:
    y, x = np.indices(shape, dtype=np.float64)
    t = math.radians(angle)
    u = (x - cx) * math.cos(t) + (y - cy) * math.sin(t)
    v = -(x - cx) * math.sin(t) + (y - cy) * math.cos(t)
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1  # type: ignore[no-any-return]


def phantom(shape: tuple[int, int] = (256, 256), **kw: float) -> np.ndarray:
    """Background 100, an elliptical body at 1100 (contrast 1000)."""
    h, w = shape
    args = {"cy": h / 2, "cx": w / 2, "ry": h * 0.3, "rx": w * 0.4, **kw}
    return np.where(ellipse(shape, **args), 1100.0, 100.0).astype(np.float32)  # type: ignore[arg-type]


def test_noise_sigma_is_the_added_gaussian_noise() -> None:
    img = phantom() + RNG.normal(0, 10, (256, 256)).astype(np.float32)
    assert measures.noise_sigma(img, phantom() > 600) == pytest.approx(10, rel=0.05)


def test_snr_is_contrast_over_noise() -> None:
    img = phantom() + RNG.normal(0, 20, (256, 256)).astype(np.float32)
    w = working_image(img, 256)
    assert measures.contrast(w) == pytest.approx(1000, rel=0.01)
    assert measures.contrast(w) / measures.noise_sigma(img, w.anatomy) == pytest.approx(50, rel=0.06)


def test_graininess_of_white_noise_follows_the_band_pass_formula() -> None:
    sigma = 30.0
    img = np.full((256, 256), 500, np.float32) + RNG.normal(0, sigma, (256, 256)).astype(np.float32)
    expected = 100 * sigma * math.sqrt((1 + 1 / 9 - 4 / 10) / (4 * math.pi)) / 1000  # C = 1000
    got = measures.graininess(img, np.ones((256, 256), bool), 1000.0)
    assert got == pytest.approx(expected, rel=0.1)
    # correlated noise of the same pixel σ is grainier: the mottle the measure is for
    blobs = ndimage.gaussian_filter(RNG.normal(0, 1, (256, 256)), 1.5)
    blotchy = (500 + sigma * blobs / blobs.std()).astype(np.float32)
    assert measures.graininess(blotchy, np.ones((256, 256), bool), 1000.0) > 1.5 * got


@pytest.mark.parametrize("blur", [0.0, 1.0, 2.0, 3.0, 4.0])
def test_edge_blur_finds_the_gaussian_blur_of_step_edges(blur: float) -> None:
    """A pixel-sampled step has an intrinsic σ of about 0.46 px; blur adds in quadrature."""
    x = np.arange(256)
    bars = np.where((x // 16) % 2 == 0, 100.0, 1100.0)[None, :] * np.ones((256, 1))
    img = ndimage.gaussian_filter(bars, blur) if blur else bars
    assert measures.edge_blur(img.astype(np.float32)) == pytest.approx(math.hypot(blur, 0.46), abs=0.1)


def test_clipped_is_the_share_of_anatomy_at_the_extremes() -> None:
    img = phantom() + RNG.normal(0, 5, (256, 256)).astype(np.float32)
    body = phantom() > 600
    flat = body & (np.indices(img.shape)[0] < 100)  # top part of the body saturated
    img[flat] = img.max() + 50
    w = working_image(img, 256)
    assert measures.clipped(w) == pytest.approx(100 * flat.sum() / body.sum(), abs=0.5)


def test_stripe_is_the_line_amplitude_in_percent_of_contrast() -> None:
    img = phantom()
    img[:, 101:103] += 50  # a 2-px bright column through every row, 5 % of the contrast
    w = working_image(img, 256)
    assert measures.stripe(w.field_pixels, measures.contrast(w)) == pytest.approx(5, abs=0.3)
    assert measures.stripe(phantom(), 1000.0) == 0  # the body's outline is an edge, not a line


def test_ring_finds_a_concentric_ring() -> None:
    img = phantom()
    y, x = np.indices(img.shape)
    r = np.hypot(y - 127.5, x - 127.5)
    img[np.abs(r - 60) < 0.5] += 80  # a one-pixel ring, 8 % of the contrast
    got = measures.ring(img, 1000.0)
    assert got == pytest.approx(8 * (1 - 1 / (math.sqrt(2 * math.pi) * 3)), rel=0.2)
    assert measures.ring(phantom(), 1000.0) == 0


def test_geometry_offset_tilt_symmetry_cut() -> None:
    centred = measures.geometry(working_image(phantom(), 256))
    assert centred.offset == pytest.approx(0, abs=0.5)
    assert centred.tilt == pytest.approx(0, abs=0.5)
    assert centred.symmetry == pytest.approx(1, abs=0.01)
    assert centred.cut == 0 and centred.anatomy == pytest.approx(100 * math.pi * 0.3 * 0.4, rel=0.02)
    shifted = measures.geometry(working_image(phantom(cx=128 + 25.6), 256))  # 10 % of the width
    assert shifted.offset == pytest.approx(10, abs=0.5)
    tilted = measures.geometry(working_image(phantom(angle=12), 256))
    assert tilted.tilt == pytest.approx(12, abs=1)
    assert tilted.symmetry < 0.95
    cut = measures.geometry(working_image(phantom(cx=200), 256))
    assert cut.cut > 10
    round_ = measures.geometry(working_image(phantom(ry=60, rx=60), 256))
    assert round_.tilt is None  # a round anatomy has no axis to measure tilt by


def test_exposed_field_leaves_out_collimated_edges() -> None:
    img = phantom((300, 240)) + RNG.normal(0, 5, (300, 240)).astype(np.float32)
    img[:30, :] = img[-20:, :] = 3000  # unexposed (bright) bands, flat but for noise
    img[:, :10] = 3000
    img[:30, :] += RNG.normal(0, 5, (30, 240)).astype(np.float32)
    f = exposed_field(img)
    m = max(2, 240 // 64)
    assert (f.top, f.bottom, f.left, f.right) == (30 + m, 300 - 20 - m, 10 + m, 240)


def test_reduce_and_otsu() -> None:
    small, k = reduce(np.ones((2500, 2048), np.float32), 256)
    assert k == 10 and small.shape == (250, 204)
    values = np.concatenate([RNG.normal(100, 5, 1000), RNG.normal(1000, 5, 1000)])
    t = otsu_threshold(values)
    assert ((values > t) == (np.arange(2000) >= 1000)).all()  # the two classes, exactly
