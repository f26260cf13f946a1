"""QC results as typed values that render to JSON and back (R-QC-1, R-CE-5, R-RT-3).

A :class:`QcResult` grades one instance; :class:`SeriesQc` and :class:`StudyQc` aggregate them
(worst grade wins; each keeps the counts per grade and the reasons of the failing instances).
Grades are 甲 / 乙 / 丙 / 废 (A / B / C / reject); each dimension — the header, exposure, SNR
(信噪比), sharpness (清晰度), graininess (图像颗粒), artifacts (伪影), coverage (拍摄范围), centre
line (中心线), positioning (拍摄体位) — carries its own grade, a 0–100 score, its measured values
and its reasons in words.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

ENGINE_VERSION = "ybyx-qc 1.1"  # 1.1: series sampling (gateway/qc/sampling.py)
# QcResult.pixels: the pixel measures ran; the slice was left to its series' sample (header checks
# only); the instance has no pixel data (or it could not be decoded: a header error says so)
MEASURED, SKIPPED, NO_PIXELS = "measured", "skipped", "none"


class Grade(Enum):
    """甲 / 乙 / 丙 / 废; ordered, 甲 best. ``code`` is the ASCII form stored and sent."""

    A = "甲"
    B = "乙"
    C = "丙"
    REJECT = "废"

    @property
    def code(self) -> str:
        return "reject" if self is Grade.REJECT else self.name

    @property
    def rank(self) -> int:  # 0 best
        return list(Grade).index(self)

    @property
    def passes(self) -> bool:
        """Everything but 废 may be uploaded (R-QC-1)."""
        return self is not Grade.REJECT

    @classmethod
    def of(cls, text: str) -> Grade:
        """From ``甲``/``A``/``reject``/… (what the JSON and the database hold)."""
        for g in cls:
            if text in (g.value, g.code, g.name):
                return g
        raise ValueError(f"not a QC grade: {text!r} (甲 乙 丙 废 or A B C reject)")

    @staticmethod
    def worst(grades: Iterable[Grade]) -> Grade:
        return max(grades, key=lambda g: g.rank, default=Grade.A)


DIMENSIONS: dict[str, str] = {
    "header": "头信息",
    "exposure": "曝光",
    "snr": "信噪比",
    "sharpness": "清晰度",
    "graininess": "图像颗粒",
    "artifacts": "伪影",
    "coverage": "拍摄范围",
    "center_line": "中心线",
    "positioning": "拍摄体位",
}


@dataclass(frozen=True)
class Dimension:
    """One quality dimension of one instance."""

    name: str
    grade: Grade
    score: float  # 0–100, 100 best
    values: dict[str, float | None] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    ai_assisted: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": DIMENSIONS.get(self.name, self.name),
            "grade": self.grade.value,
            "grade_code": self.grade.code,
            "score": round(self.score, 1),
            "values": {k: (None if v is None else round(v, 4)) for k, v in self.values.items()},
            "reasons": list(self.reasons),
            "ai_assisted": self.ai_assisted,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Dimension:
        return cls(
            d["name"],
            Grade.of(d["grade"]),
            float(d["score"]),
            dict(d.get("values", {})),
            list(d.get("reasons", [])),
            bool(d.get("ai_assisted", False)),
        )


@dataclass(frozen=True)
class QcResult:
    """The QC of one instance (one SOP Instance UID in one version of its bytes)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str
    body_part: str
    grade: Grade
    dimensions: list[Dimension]
    engine_version: str = ENGINE_VERSION
    ai_assisted: bool = False
    series_number: int | None = None
    instance_number: int | None = None
    identity: str = ""  # SHA-256 of patient ID, name, birth date, sex (consistency across a study)
    millis: float = 0.0
    pixels: str = MEASURED  # MEASURED, SKIPPED or NO_PIXELS (above)

    @property
    def reasons(self) -> list[str]:
        return [r for d in self.dimensions if d.grade is not Grade.A for r in d.reasons]

    def dimension(self, name: str) -> Dimension | None:
        return next((d for d in self.dimensions if d.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "level": "instance",
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "sop_uid": self.sop_uid,
            "modality": self.modality,
            "body_part": self.body_part,
            "series_number": self.series_number,
            "instance_number": self.instance_number,
            "grade": self.grade.value,
            "grade_code": self.grade.code,
            "passes": self.grade.passes,
            "reasons": self.reasons,
            "dimensions": [d.to_json() for d in self.dimensions],
            "engine_version": self.engine_version,
            "ai_assisted": self.ai_assisted,
            "identity": self.identity,
            "millis": round(self.millis, 1),
            "pixels": self.pixels,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> QcResult:
        return cls(
            study_uid=d["study_uid"],
            series_uid=d["series_uid"],
            sop_uid=d["sop_uid"],
            modality=d.get("modality", ""),
            body_part=d.get("body_part", ""),
            grade=Grade.of(d["grade"]),
            dimensions=[Dimension.from_json(x) for x in d.get("dimensions", [])],
            engine_version=d.get("engine_version", ""),
            ai_assisted=bool(d.get("ai_assisted", False)),
            series_number=d.get("series_number"),
            instance_number=d.get("instance_number"),
            identity=d.get("identity", ""),
            millis=float(d.get("millis", 0.0)),
            pixels=str(d.get("pixels", MEASURED)),
        )


def _summary(results: list[QcResult]) -> dict[str, Any]:
    counts = Counter(r.grade.value for r in results)
    worst = Grade.worst(r.grade for r in results)
    return {
        "grade": worst.value,
        "grade_code": worst.code,
        "passes": worst.passes,
        "instances": len(results),
        "pixel_measured": sum(r.pixels == MEASURED for r in results),
        "counts": {g.value: counts.get(g.value, 0) for g in Grade},
        "ai_assisted": any(r.ai_assisted for r in results),
        "engine_version": sorted({r.engine_version for r in results}),
    }


def _dimension_summary(results: list[QcResult]) -> list[dict[str, Any]]:
    """Per dimension: worst grade and mean score over the instances that have it."""
    out = []
    for name, label in DIMENSIONS.items():
        dims = [d for r in results if (d := r.dimension(name)) is not None]
        if not dims:
            continue
        worst = Grade.worst(d.grade for d in dims)
        out.append(
            {
                "name": name,
                "label": label,
                "grade": worst.value,
                "grade_code": worst.code,
                "score": round(sum(d.score for d in dims) / len(dims), 1),
                "ai_assisted": any(d.ai_assisted for d in dims),
            }
        )
    return out


@dataclass(frozen=True)
class SeriesQc:
    """A series: the worst of its instances."""

    series_uid: str
    results: list[QcResult]

    @property
    def grade(self) -> Grade:
        return Grade.worst(r.grade for r in self.results)

    def to_json(self) -> dict[str, Any]:
        first = self.results[0] if self.results else None
        return {
            "level": "series",
            "series_uid": self.series_uid,
            "modality": first.modality if first else "",
            "series_number": first.series_number if first else None,
            **_summary(self.results),
            "dimensions": _dimension_summary(self.results),
            "failures": [
                {
                    "sop_uid": r.sop_uid,
                    "instance_number": r.instance_number,
                    "grade": r.grade.value,
                    "reasons": r.reasons,
                }
                for r in self.results
                if not r.grade.passes
            ],
        }


@dataclass(frozen=True)
class StudyQc:
    """A study: the worst of its series, plus checks across it (patient identity consistent)."""

    study_uid: str
    results: list[QcResult]

    @property
    def series(self) -> list[SeriesQc]:
        by: dict[str, list[QcResult]] = {}
        for r in self.results:
            by.setdefault(r.series_uid, []).append(r)
        return [SeriesQc(uid, rs) for uid, rs in by.items()]

    @property
    def study_reasons(self) -> list[str]:
        """Problems only visible across instances."""
        identities = {r.identity for r in self.results if r.identity}
        if len(identities) > 1:
            return [
                f"头信息: patient identity (ID, name, birth date, sex) differs between instances "
                f"of the study ({len(identities)} different identities)"
            ]
        return []

    @property
    def grade(self) -> Grade:
        worst = Grade.worst(r.grade for r in self.results)
        return Grade.REJECT if self.study_reasons else worst

    def to_json(self) -> dict[str, Any]:
        summary = _summary(self.results)
        if self.study_reasons:
            summary.update(grade=Grade.REJECT.value, grade_code=Grade.REJECT.code, passes=False)
        return {
            "level": "study",
            "study_uid": self.study_uid,
            **summary,
            "reasons": self.study_reasons,
            "dimensions": _dimension_summary(self.results),
            "series": [s.to_json() for s in self.series],
        }
