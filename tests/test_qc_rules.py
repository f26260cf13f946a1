"""QC rules file, header checks, grading and the AI hook (issue 4 §3, R-QC-1, R-CE-5).

``config/qc.toml`` is validated like every config (an unknown key or thresholds out of order name
the key); header checks find what an image needs to be usable; an AI hook's result is merged and
labelled AI-assisted.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from gateway.config import ConfigError
from gateway.qc.engine import QcEngine, grade_value
from gateway.qc.header import TYPE1_COMMON, TYPE2_COMMON, check_header
from gateway.qc.result import Grade, StudyQc
from gateway.qc.rules import DEFAULT_MODALITIES, DEFAULT_THRESHOLDS, QcRules, load_rules, parse_rules

ROOT = Path(__file__).resolve().parents[1]
HEADER_COMMON = {*TYPE1_COMMON, *TYPE2_COMMON, "SpecificCharacterSet"}


@pytest.fixture(scope="module")
def ct(samples: Path) -> Dataset:
    return dcmread(sorted((samples / "01_CT_chest").iterdir())[5])


def test_example_rules_are_valid_and_are_the_built_in_defaults() -> None:
    rules = load_rules(ROOT / "config" / "qc.toml")
    assert rules.thresholds == DEFAULT_THRESHOLDS
    assert rules.modality == DEFAULT_MODALITIES
    for modality in ("CT", "MR", "DX", "CR", "XA", "US", "MG"):
        assert rules.for_image(modality, "CHEST") == QcRules().for_image(modality, "CHEST")


def test_unknown_key_and_bad_thresholds_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as bad:
        parse_rules({"thresholds": {"snrr": [1, 2, 3]}, "modality": {"CT": {"tilt": [9, 5, 1]}}}, "qc.toml")
    assert "qc.toml: thresholds.snrr: unknown key" in bad.value.problems
    assert any(
        p.startswith("qc.toml: modality.CT.tilt:") and "must not decrease" in p for p in bad.value.problems
    )
    with pytest.raises(ConfigError) as two:
        parse_rules({"thresholds": {"snr": [1, 2]}})
    assert "three thresholds" in two.value.problems[0]
    with pytest.raises(ConfigError) as case:
        parse_rules({"modality": {"ct": {}}})
    assert "upper case" in case.value.problems[0]
    path = tmp_path / "qc.toml"
    path.write_text("working_size = 256\n[modality.DX.body_part.CHEST]\ntilt = [3, 6, 12]\nfoo = 1\n")
    with pytest.raises(ConfigError) as nested:
        load_rules(path)
    assert nested.value.problems == [f"{path}: modality.DX.body_part.CHEST.foo: unknown key"]


def test_thresholds_merge_default_modality_body_part() -> None:
    rules = parse_rules(
        {"modality": {"DX": {"tilt": [5, 10, 20], "body_part": {"CHEST": {"tilt": [3, 6, 12]}}}}}
    )
    assert rules.for_image("DX", "chest")["tilt"] == [3, 6, 12]
    assert rules.for_image("DX", "HAND")["tilt"] == [5, 10, 20]
    assert rules.for_image("CT", "")["tilt"] == DEFAULT_THRESHOLDS.tilt
    assert "snr" not in QcRules().for_image("US", "")  # [] = not graded


@pytest.mark.parametrize(
    ("name", "limits", "value", "grade"),
    [
        ("snr", [25, 12, 5], 30, Grade.A),
        ("snr", [25, 12, 5], 12, Grade.B),
        ("snr", [25, 12, 5], 6, Grade.C),
        ("snr", [25, 12, 5], 4.9, Grade.REJECT),
        ("tilt", [4, 8, 15], 4, Grade.A),
        ("tilt", [4, 8, 15], 8.1, Grade.C),
        ("tilt", [4, 8, 15], 16, Grade.REJECT),
    ],
)
def test_grade_value(name: str, limits: list[float], value: float, grade: Grade) -> None:
    got, score = grade_value(name, value, limits)
    assert got is grade
    assert (
        {Grade.A: 90, Grade.B: 75, Grade.C: 60, Grade.REJECT: 0}[grade]
        <= score
        <= {Grade.A: 100, Grade.B: 90, Grade.C: 75, Grade.REJECT: 60}[grade]
    )


def problems(ds: Dataset) -> list[str]:
    return [f"{p.severity}: {p.text}" for p in check_header(ds, encapsulated=False)]


def test_header_checks(ct: Dataset) -> None:
    assert problems(ct) == []
    ds = copy.deepcopy(ct)
    del ds.ImagePositionPatient
    ds.SeriesInstanceUID = "1.2.03.4"  # a leading zero: not a UID
    ds.StudyDate = "20261340"
    assert problems(ds) == [
        "error: ImagePositionPatient (Type 1) is missing",
        "error: SeriesInstanceUID '1.2.03.4' is not a valid UID",
        "warning: StudyDate '20261340' is not a date (YYYYMMDD)",
    ]
    short = copy.deepcopy(ct)
    short.PixelData = short.PixelData[:-512]
    assert problems(short) == [
        f"error: Pixel Data has {512 * 512 * 2 - 512} bytes; the Image Pixel module describes {512 * 512 * 2}"
    ]


def test_an_instance_without_pixels_is_checked_for_its_common_attributes(ct: Dataset) -> None:
    sr = copy.deepcopy(ct)
    for kw in [k for k in sr.dir() if k not in HEADER_COMMON]:
        delattr(sr, kw)
    sr.Modality = "SR"
    assert problems(sr) == []
    result = QcEngine().assess(sr)
    assert result.grade is Grade.A and [d.name for d in result.dimensions] == ["header"]


def test_non_ascii_text_needs_a_character_set(samples: Path, tmp_path: Path) -> None:
    src = sorted((samples / "01_CT_chest").iterdir())[5]
    data = src.read_bytes()
    element = b"\x08\x00\x05\x00CS\x08\x00GB18030 "  # (0008,0005) CS, 8 bytes
    assert data.count(element) == 1
    path = tmp_path / "no-charset.dcm"  # the same bytes, the character set blanked out
    path.write_bytes(data.replace(element, element[:8] + b" " * 8))
    found = problems(dcmread(path))
    assert "warning: InstitutionName has non-ASCII text but Specific Character Set is not declared" in found


def test_body_part_and_laterality_where_the_exam_needs_them(samples: Path) -> None:
    dx = dcmread(next((samples / "03_DX_chest").iterdir()))
    assert problems(dx) == []
    hand = copy.deepcopy(dx)
    hand.BodyPartExamined = "HAND"
    hand.ImageLaterality = "U"
    assert problems(hand) == ["warning: laterality (L, R or B) is missing for HAND"]
    hand.ImageLaterality = "L"
    assert problems(hand) == []
    nobody = copy.deepcopy(dx)
    del nobody.BodyPartExamined
    del nobody.AnatomicRegionSequence
    assert "warning: body part is missing (BodyPartExamined or Anatomic Region Sequence)" in problems(nobody)


def test_patient_identity_must_agree_across_the_study(ct: Dataset, samples: Path) -> None:
    engine = QcEngine()
    a = engine.assess(ct)
    other = copy.deepcopy(dcmread(sorted((samples / "01_CT_chest").iterdir())[6]))
    other.PatientID = "SOMEONE-ELSE"
    b = engine.assess(other)
    assert (
        StudyQc(
            a.study_uid, [a, engine.assess(dcmread(sorted((samples / "01_CT_chest").iterdir())[6]))]
        ).grade
        is Grade.A
    )
    mixed = StudyQc(a.study_uid, [a, b])
    assert mixed.grade is Grade.REJECT and "patient identity" in mixed.study_reasons[0]


def ai_assess(ds: Dataset, pixels: np.ndarray | None, result: dict[str, Any]) -> dict[str, Any]:
    """A stand-in model: flags foreign bodies (a stretch goal for the engine) on every CT."""
    assert pixels is not None and pixels.shape == (512, 512) and result["grade"] == "甲"
    return {
        "dimensions": [
            {"name": "artifacts", "grade": "丙", "score": 65, "reasons": ["metal foreign body, left chest"]},
            {"name": "foreign_body", "grade": "乙", "score": 80, "reasons": ["possible ECG lead"]},
        ]
    }


def test_ai_hook_is_merged_and_labelled(ct: Dataset) -> None:
    engine = QcEngine(parse_rules({"ai_hook": "tests.test_qc_rules:ai_assess"}))
    result = engine.assess(ct)
    assert result.ai_assisted and result.grade is Grade.C
    artifacts = result.dimension("artifacts")
    assert artifacts is not None and artifacts.ai_assisted and artifacts.grade is Grade.C
    assert "AI: metal foreign body, left chest" in artifacts.reasons
    extra = result.dimension("foreign_body")
    assert extra is not None and extra.ai_assisted and extra.grade is Grade.B
    assert result.to_json()["ai_assisted"] is True
    with pytest.raises(ModuleNotFoundError):
        QcEngine(parse_rules({"ai_hook": "no_such_module:assess"}))


def test_a_failing_ai_hook_leaves_the_engine_result(ct: Dataset) -> None:
    def broken(*_: Any) -> dict[str, Any]:
        raise RuntimeError("model not loaded")

    result = QcEngine(hook=broken).assess(ct)
    assert result.grade is Grade.A and not result.ai_assisted


def test_config_check_validates_the_rules_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from argparse import Namespace

    from gateway.cli import cmd_config_check

    bad = tmp_path / "qc.toml"
    bad.write_text('role = "qc"\n[thresholds]\nsnrr = [1, 2, 3]\n', encoding="utf-8")
    assert cmd_config_check(Namespace(files=[str(ROOT / "config" / "qc.toml")])) == 0
    assert cmd_config_check(Namespace(files=[str(bad)])) == 2
    out = capsys.readouterr()
    assert "config/qc.toml: ok (qc)" in out.out and f"{bad}: thresholds.snrr: unknown key" in out.err
