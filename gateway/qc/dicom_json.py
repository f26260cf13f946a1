"""The QC result in a study's WADO-RS metadata: a documented private block (R-CE-5, R-RT-3).

Chosen over a linked DICOM SR because it needs no extra instance (nothing to store, forward,
version or delete with the study) and a viewer reads it from the metadata it fetches anyway.
Each instance's DICOM JSON gets, in private group 0099 reserved by creator ``YBYX QC 1``:

========  ==  ====================================================================
tag       VR  value
========  ==  ====================================================================
00990010  LO  ``YBYX QC 1`` (private creator)
00991001  CS  the instance's grade: ``A``, ``B``, ``C`` or ``REJECT`` (甲 乙 丙 废)
00991002  CS  the study's grade, same codes
00991003  UT  the instance's QcResult as JSON (docs/qc.md): dimensions, scores, reasons
00991004  LO  the QC engine version
========  ==  ====================================================================
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.qc.result import Grade

PRIVATE_CREATOR = "YBYX QC 1"
_SOP = re.compile(rb'"00080018"\s*:\s*\{[^{}]*"Value"\s*:\s*\[\s*"([0-9.]+)"')


@dataclass(frozen=True)
class StoredQc:
    """An instance's result as the book holds it: grade, the QcResult JSON text, engine."""

    grade: Grade
    result_json: str
    engine_version: str


def _code(grade: Grade) -> str:
    return grade.code.upper()


def private_block(qc: StoredQc, study_grade: Grade) -> dict[str, dict[str, object]]:
    """The private elements for one instance (DICOM JSON, PS3.18 F.2)."""
    return {
        "00990010": {"vr": "LO", "Value": [PRIVATE_CREATOR]},
        "00991001": {"vr": "CS", "Value": [_code(qc.grade)]},
        "00991002": {"vr": "CS", "Value": [_code(study_grade)]},
        "00991003": {"vr": "UT", "Value": [qc.result_json]},
        "00991004": {"vr": "LO", "Value": [qc.engine_version[:64]]},
    }


def with_private_blocks(
    docs: list[bytes], results: Mapping[str, StoredQc], study_grade: Grade
) -> list[bytes]:
    """``docs`` (one DICOM JSON object per instance, as bytes) with each graded instance's block
    added before its closing brace; instances without a result are left as they are. The stored
    result JSON is used as it is (no parse): metadata of a large series stays cheap."""
    out = []
    for doc in docs:
        m = _SOP.search(doc)
        qc = results.get(m.group(1).decode()) if m else None
        if qc is None or not doc.rstrip().endswith(b"}"):
            out.append(doc)
            continue
        block = json.dumps(private_block(qc, study_grade), ensure_ascii=False).encode("utf-8")
        body = doc.rstrip()[:-1].rstrip()
        sep = b"" if body.endswith(b"{") else b","
        out.append(body + sep + block[1:-1] + b"}")
    return out
