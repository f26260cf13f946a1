"""The QC engine: one instance in, one graded :class:`QcResult` out (R-QC-1, R-CE-5, R-RT-3).

Header checks (``header.py``) and pixel measures (``measures.py``, on the working image of
``image.py``) are graded against the thresholds of ``config/qc.toml`` (``rules.py``) for the
image's modality and body part; each dimension takes the worst grade of its measures, the
instance the worst of its dimensions. An optional AI hook (``ai_hook = "module:function"``) is
called with the dataset, the grey frame and the engine's result as JSON, and returns
``{"dimensions": [{"name", "grade", "score"?, "reasons"?}, ...]}``; its dimensions are merged (the
worse grade wins, reasons are added) and marked ``ai_assisted`` (R-CE-5 "AI-assisted QC").
"""

from __future__ import annotations

import importlib
import io
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from gateway.qc import measures
from gateway.qc.header import Problem, body_part, check_header, identity
from gateway.qc.image import FloatImage, detail_window, grey_frame, working_image
from gateway.qc.result import (
    DIMENSIONS,
    ENGINE_VERSION,
    MEASURED,
    NO_PIXELS,
    SKIPPED,
    Dimension,
    Grade,
    QcResult,
)
from gateway.qc.rules import HIGHER_IS_BETTER, MEASURES, QcRules

log = logging.getLogger(__name__)

AiHook = Callable[[Dataset, FloatImage | None, dict[str, Any]], Mapping[str, Any]]
_UNITS = {
    "clipped": " %",
    "graininess": " %",
    "stripe": " %",
    "ring": " %",
    "cut": " %",
    "anatomy": " %",
    "offset": " %",
    "tilt": "°",
    "edge_blur": " px",
}


def load_hook(spec: str) -> AiHook:
    """``module:function`` → the callable; ImportError/AttributeError name what is missing."""
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    hook = getattr(module, attr)
    if not callable(hook):
        raise TypeError(f"ai_hook {spec}: not callable")
    return hook  # type: ignore[no-any-return]


def grade_value(name: str, value: float, limits: list[float]) -> tuple[Grade, float]:
    """The grade of one measured value and a 0–100 score (90–100 甲, 75–90 乙, 60–75 丙, < 60 废)."""
    a, b, c = limits
    v = value
    if name in HIGHER_IS_BETTER:  # mirror, so that less is better below
        v, a, b, c = -v, -a, -b, -c
    step = max(b - a, c - b, 1e-9)
    if v <= a:
        return Grade.A, 90.0 + 10.0 * min(1.0, (a - v) / step)
    if v <= b:
        return Grade.B, 90.0 - 15.0 * (v - a) / max(b - a, 1e-9)
    if v <= c:
        return Grade.C, 75.0 - 15.0 * (v - b) / max(c - b, 1e-9)
    return Grade.REJECT, max(0.0, 60.0 * (1.0 - (v - c) / step))


def _reason(name: str, value: float, limits: list[float], grade: Grade) -> str:
    label = DIMENSIONS[MEASURES[name]]
    unit = _UNITS.get(name, "")
    better = "at least" if name in HIGHER_IS_BETTER else "at most"
    return f"{label}: {name} {value:.3g}{unit} → {grade.value} (甲 needs {better} {limits[0]:g}{unit})"


class QcEngine:
    """Grades instances with one set of rules (thread-safe: it holds no per-image state)."""

    def __init__(self, rules: QcRules | None = None, *, hook: AiHook | None = None) -> None:
        self.rules = rules or QcRules()
        self.hook = (
            hook if hook is not None else (load_hook(self.rules.ai_hook) if self.rules.ai_hook else None)
        )

    def assess_bytes(self, data: bytes, *, defer_pixels: bool = False) -> QcResult:
        return self.assess(dcmread(io.BytesIO(data)), defer_pixels=defer_pixels)

    def defers(self, ds: Dataset) -> bool:
        """Whether this instance may leave its pixel measures to its series' sample: a single-frame
        slice of a sampled modality with an Instance Number (``gateway/qc/sampling.py``)."""
        modality = str(ds.get("Modality", "") or "")
        frames = _int(ds.get("NumberOfFrames")) or 1
        return self.rules.samples(modality) and frames == 1 and _int(ds.get("InstanceNumber")) is not None

    def assess(self, ds: Dataset, *, defer_pixels: bool = False) -> QcResult:
        """Grade one instance; ``defer_pixels``: header checks only if :meth:`defers` allows it
        (the first pass over a slice; the book queues the series' sample again for the full
        measures, ``QcBook.queue_samples``)."""
        started = time.perf_counter()
        skip = defer_pixels and self.defers(ds)
        modality = str(ds.get("Modality", "") or "").upper()
        part = body_part(ds)
        encapsulated = bool(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)) and bool(
            ds.file_meta.TransferSyntaxUID.is_compressed
        )
        problems = check_header(ds, encapsulated=encapsulated)
        limits = self.rules.for_image(modality, part)
        values: dict[str, float | None] = {}
        frame: FloatImage | None = None
        if skip:
            pass  # header checks only: the series' sample gets the pixel measures
        elif "PixelData" in ds and not any(p.severity == "error" and "Pixel" in p.text for p in problems):
            try:
                frame = grey_frame(
                    ds.pixel_array,
                    str(ds.get("PhotometricInterpretation", "")),
                    int(ds.get("SamplesPerPixel", 1)),
                )
            except Exception as exc:  # any codec failure: the image cannot be used
                problems.append(Problem("error", f"pixel data cannot be decoded: {exc}"))
        if frame is not None:
            values = self._measure(frame)
        errors = [p.text for p in problems if p.severity == "error"]
        warnings = [p.text for p in problems if p.severity == "warning"]
        values["header_warnings"] = float(len(warnings))
        dims = self._grade(values, limits, errors, warnings)
        result = QcResult(
            study_uid=str(ds.get("StudyInstanceUID", "") or ""),
            series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
            sop_uid=str(ds.get("SOPInstanceUID", "") or ""),
            modality=modality,
            body_part=part,
            grade=Grade.worst(d.grade for d in dims),
            dimensions=dims,
            engine_version=ENGINE_VERSION,
            series_number=_int(ds.get("SeriesNumber")),
            instance_number=_int(ds.get("InstanceNumber")),
            identity=identity(ds),
            pixels=SKIPPED if skip else MEASURED if frame is not None else NO_PIXELS,
        )
        if self.hook is not None and not skip:
            result = self._with_ai(ds, frame, result)
        return _timed(result, started)

    def _measure(self, frame: FloatImage) -> dict[str, float | None]:
        w = working_image(frame, self.rules.working_size)
        c = measures.contrast(w)
        window, mask = detail_window(frame, w)
        region = measures.inner_region(mask)  # eroded once for noise and graininess
        sigma = measures.noise_sigma(window, region=region)
        geo = measures.geometry(w)
        fp = w.field_pixels
        return {
            "clipped": measures.clipped(w),
            "snr": c / sigma if sigma > 0 else math.inf,
            "edge_blur": measures.edge_blur(window),
            "graininess": measures.graininess(window, mask, c, region=region),
            "stripe": measures.stripe(fp, c),
            "ring": measures.ring(fp, c),
            "cut": geo.cut,
            "anatomy": geo.anatomy,
            "field": geo.field,
            "offset": geo.offset,
            "tilt": geo.tilt,
            "symmetry": geo.symmetry,
            "noise_sigma": sigma,
            "contrast": c,
        }

    def _grade(
        self,
        values: dict[str, float | None],
        limits: dict[str, list[float]],
        errors: list[str],
        warnings: list[str],
    ) -> list[Dimension]:
        shown: dict[str, dict[str, float | None]] = {name: {} for name in DIMENSIONS}
        grades: dict[str, list[tuple[Grade, float]]] = {name: [] for name in DIMENSIONS}
        reasons: dict[str, list[str]] = {name: [] for name in DIMENSIONS}
        extra = {"field": "coverage", "noise_sigma": "snr", "contrast": "snr"}
        for key, value in values.items():
            dim = MEASURES.get(key) or extra[key]
            shown[dim][key] = value
            if key not in limits or value is None or not np.isfinite(value):
                continue
            grade, score = grade_value(key, value, limits[key])
            grades[dim].append((grade, score))
            if grade is not Grade.A and key != "header_warnings":
                reasons[dim].append(_reason(key, value, limits[key], grade))
        if errors:
            grades["header"].append((Grade.REJECT, 0.0))
        reasons["header"] = [f"头信息: {t}" for t in (*errors, *warnings)]
        dims = []
        for name in DIMENSIONS:
            if not grades[name] and not shown[name]:
                continue
            g = Grade.worst(gr for gr, _ in grades[name])
            score = min((s for _, s in grades[name]), default=100.0)
            dims.append(Dimension(name, g, score, shown[name], reasons[name]))
        return dims

    def _with_ai(self, ds: Dataset, frame: FloatImage | None, result: QcResult) -> QcResult:
        assert self.hook is not None
        try:
            answer = self.hook(ds, frame, result.to_json())
            extra = [Dimension.from_json({"score": 100.0, **d}) for d in answer.get("dimensions", [])]
        except Exception:  # the hook is optional: its failure must not stop QC
            log.exception("QC AI hook failed for %s", result.sop_uid)
            return result
        dims = {d.name: d for d in result.dimensions}
        for ai in extra:
            mine = dims.get(ai.name)
            if mine is None:
                dims[ai.name] = Dimension(
                    ai.name, ai.grade, ai.score, ai.values, ai.reasons, ai_assisted=True
                )
            else:
                dims[ai.name] = Dimension(
                    ai.name,
                    Grade.worst([mine.grade, ai.grade]),
                    min(mine.score, ai.score),
                    {**mine.values, **ai.values},
                    [*mine.reasons, *(f"AI: {r}" for r in ai.reasons)],
                    ai_assisted=True,
                )
        merged = list(dims.values())
        return QcResult(
            **{
                **result.__dict__,
                "dimensions": merged,
                "grade": Grade.worst(d.grade for d in merged),
                "ai_assisted": bool(extra),
            }
        )


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _timed(result: QcResult, started: float) -> QcResult:
    return QcResult(**{**result.__dict__, "millis": 1000 * (time.perf_counter() - started)})
