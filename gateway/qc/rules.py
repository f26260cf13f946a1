"""QC rules (``config/qc.toml``): grade thresholds per modality and body part (R-QC-1, R-CE-5).

Each graded measure has three thresholds ``[甲, 乙, 丙]``: for a measure where more is better
(``snr``, ``anatomy``, ``symmetry``) a value ≥ the first is 甲, ≥ the second 乙, ≥ the third 丙,
below it 废; for the others (less is better) ≤ instead. ``[]`` leaves a measure ungraded (still
measured and shown). ``[thresholds]`` holds the defaults; ``[modality.CT]`` overrides measures for
a modality, ``[modality.DX.body_part.CHEST]`` for a body part of it. Validated with pydantic like
every config: an unknown key, a wrong type or thresholds out of order name the key.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.config import ConfigError
from gateway.qc.sampling import SAMPLED_MODALITIES, SERIES_SAMPLE

HIGHER_IS_BETTER = frozenset({"snr", "anatomy", "symmetry"})
# measure → the dimension it grades (R-RT-3's words)
MEASURES: dict[str, str] = {
    "header_warnings": "header",
    "clipped": "exposure",
    "snr": "snr",
    "edge_blur": "sharpness",
    "graininess": "graininess",
    "stripe": "artifacts",
    "ring": "artifacts",
    "cut": "coverage",
    "anatomy": "coverage",
    "offset": "center_line",
    "tilt": "positioning",
    "symmetry": "positioning",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _triple(name: str, value: list[float] | None) -> list[float] | None:
    if value is None or value == []:
        return value
    if len(value) != 3:
        raise ValueError(f"give three thresholds [甲, 乙, 丙] or [] (got {len(value)})")
    a, b, c = value
    if name in HIGHER_IS_BETTER and not a >= b >= c:
        raise ValueError(f"more is better for {name}: thresholds must not increase (got {value})")
    if name not in HIGHER_IS_BETTER and not a <= b <= c:
        raise ValueError(f"less is better for {name}: thresholds must not decrease (got {value})")
    return value


class Thresholds(_Strict):
    """``[甲, 乙, 丙]`` per measure (units in docs/qc.md); unset = inherited, ``[]`` = not graded."""

    header_warnings: list[float] | None = None
    clipped: list[float] | None = None
    snr: list[float] | None = None
    edge_blur: list[float] | None = None
    graininess: list[float] | None = None
    stripe: list[float] | None = None
    ring: list[float] | None = None
    cut: list[float] | None = None
    anatomy: list[float] | None = None
    offset: list[float] | None = None
    tilt: list[float] | None = None
    symmetry: list[float] | None = None

    @field_validator("*")
    @classmethod
    def _ordered(cls, value: Any, info: Any) -> Any:
        return _triple(str(info.field_name), value) if info.field_name in MEASURES else value

    def given(self) -> dict[str, list[float]]:
        return {k: v for k in MEASURES if (v := getattr(self, k, None)) is not None}


class ModalityRules(Thresholds):
    body_part: dict[str, Thresholds] = Field(default_factory=dict)


DEFAULT_THRESHOLDS = Thresholds(
    header_warnings=[0, 1, 3],
    clipped=[1, 3, 10],
    snr=[25, 12, 5],
    edge_blur=[1.5, 2.5, 4],
    graininess=[5, 10, 20],
    stripe=[3, 6, 12],
    ring=[3, 6, 12],
    cut=[],
    anatomy=[],
    offset=[10, 20, 30],
    tilt=[4, 8, 15],
    symmetry=[],
)
# Built-in modality overrides (config/qc.toml repeats them; a file overrides them measure by measure).
DEFAULT_MODALITIES: dict[str, ModalityRules] = {
    "DX": ModalityRules(offset=[16, 22, 30], tilt=[5, 10, 20]),
    "CR": ModalityRules(offset=[16, 22, 30], tilt=[5, 10, 20]),
    "XA": ModalityRules(snr=[], graininess=[], offset=[], tilt=[], ring=[]),
    "US": ModalityRules(snr=[], graininess=[], offset=[], tilt=[], ring=[], edge_blur=[]),
}


class QcRules(_Strict):
    """The whole of ``config/qc.toml``."""

    role: Literal["qc"] = Field(default="qc", description="marks the file for `ybyx config check`")

    working_size: int = Field(default=256, ge=64, le=4096, description="largest side measured (px)")
    ai_hook: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="optional AI-assisted QC: 'module:function'",
    )
    series_sample: int = Field(
        default=SERIES_SAMPLE,
        ge=0,
        le=100000,
        description="pixel measures on at most this many slices of a series of a sampled modality "
        "(first, last, evenly spaced between; 0 = every slice); header checks on every slice",
    )
    sampled_modalities: list[str] = Field(
        default_factory=lambda: list(SAMPLED_MODALITIES),
        description="modalities whose series are sampled (cross-sectional); all others (DX, CR, MG, "
        "US, XA, ...) get pixel measures on every image",
    )
    thresholds: Thresholds = DEFAULT_THRESHOLDS
    modality: dict[str, ModalityRules] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _upper_case_keys(self) -> QcRules:
        for name in self.sampled_modalities:
            if name != name.upper():
                raise ValueError(f"sampled_modalities: modality codes are upper case ({name.upper()})")
        for name, rules in self.modality.items():
            if name != name.upper():
                raise ValueError(f"modality.{name}: modality codes are upper case ({name.upper()})")
            for part in rules.body_part:
                if part != part.upper():
                    raise ValueError(f"modality.{name}.body_part.{part}: body parts are upper case")
        return self

    def samples(self, modality: str) -> bool:
        """Whether a single-frame slice of this modality may be left to its series' sample."""
        return self.series_sample > 0 and modality.upper() in self.sampled_modalities

    def for_image(self, modality: str, body_part: str) -> dict[str, list[float]]:
        """The thresholds that apply: built-in ← [thresholds] ← built-in for the modality ←
        [modality.X] ← [modality.X.body_part.Y] (``[]`` = not graded)."""
        merged = {**DEFAULT_THRESHOLDS.given(), **self.thresholds.given()}
        builtin = DEFAULT_MODALITIES.get(modality.upper())
        if builtin is not None:
            merged.update(builtin.given())
        rules = self.modality.get(modality.upper())
        if rules is not None:
            merged.update(rules.given())
            part = rules.body_part.get(body_part.upper())
            if part is not None:
                merged.update(part.given())
        return {k: v for k, v in merged.items() if v}


def parse_rules(data: dict[str, Any], source: str = "qc.toml") -> QcRules:
    """Validate; raise :class:`ConfigError` with one ``file: key: reason`` per problem."""
    try:
        return QcRules.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif not err["loc"] and ": " in msg:
                key, msg = msg.split(": ", 1)
            problems.append(f"{source}: {key}: {msg}")
        raise ConfigError(problems) from None


def load_rules(path: Path | str | None) -> QcRules:
    """Read ``config/qc.toml`` (None: the built-in defaults)."""
    if path is None:
        return QcRules()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{path}: (file): no such file"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: (syntax): {exc}"]) from None
    return parse_rules(data, str(path))


def qc_rules_role(path: Path | str) -> str | None:
    """``"qc"`` after validating ``path`` if it is a QC rules file (``role = "qc"``), else None
    (``ybyx config check`` validates it like a role config); problems raise :class:`ConfigError`."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return None  # load_config reports it
    if data.get("role") != "qc":
        return None
    parse_rules(data, str(path))
    return "qc"
