"""Attribute matching (PS3.4 C.2.2.2) turned into one SQL statement per query.

Used by C-FIND and by QIDO-RS: single value, wildcard (``*`` ``?``), UID list (``\\``),
date/time range (``a-b``, ``a-``, ``-b``) and universal (empty) matching. Person names match
case- and accent-insensitively against any component group (alphabetic, ideographic, phonetic).

Fuzzy matching of person names (PS3.4 C.2.2.2.1.1, QIDO-RS ``fuzzymatching=true`` of PS3.18
§8.3.4.2; issue 3 §3) is prefix matching, case- and accent-insensitive, of every query word against
the words of any component group, where Chinese characters count as their pinyin: ``zhang`` finds
``Zhang^San`` and a name written only as ``张三``. Each stored name keeps a folded word list
(:func:`fuzzy_name`, columns ``*_fuzzy``) so the match stays one indexed-column ``LIKE`` per word.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pypinyin import Style, lazy_pinyin, pinyin
from sqlalchemy import ColumnElement, Select, and_, exists, func, literal, or_, select

from gateway.archive.record import fold_name
from gateway.archive.schema import instances, patients, series, studies


class Level(StrEnum):
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class QueryError(ValueError):
    """A matching key whose value cannot be used (the message names the key)."""


@dataclass(frozen=True)
class Attr:
    column: Any
    kind: str  # "text", "uid", "date", "time", "int", "pn"
    level: Level


_S, _E, _I = Level.STUDY, Level.SERIES, Level.IMAGE

ATTRIBUTES: dict[str, Attr] = {
    "PatientID": Attr(patients.c.patient_id, "text", _S),
    "IssuerOfPatientID": Attr(patients.c.issuer, "text", _S),
    "PatientName": Attr(patients.c.patient_name, "pn", _S),
    "PatientBirthDate": Attr(patients.c.birth_date, "date", _S),
    "PatientSex": Attr(patients.c.sex, "text", _S),
    "StudyInstanceUID": Attr(studies.c.study_uid, "uid", _S),
    "StudyDate": Attr(studies.c.study_date, "date", _S),
    "StudyTime": Attr(studies.c.study_time, "time", _S),
    "AccessionNumber": Attr(studies.c.accession_number, "text", _S),
    "StudyID": Attr(studies.c.study_id, "text", _S),
    "ReferringPhysicianName": Attr(studies.c.referring_physician, "pn", _S),
    "StudyDescription": Attr(studies.c.study_description, "text", _S),
    "InstitutionName": Attr(studies.c.institution_name, "text", _S),
    "SeriesInstanceUID": Attr(series.c.series_uid, "uid", _E),
    "Modality": Attr(series.c.modality, "text", _E),
    "SeriesNumber": Attr(series.c.series_number, "int", _E),
    "SeriesDescription": Attr(series.c.series_description, "text", _E),
    "BodyPartExamined": Attr(series.c.body_part, "text", _E),
    "PerformedProcedureStepStartDate": Attr(series.c.pps_start_date, "date", _E),
    "PerformedProcedureStepStartTime": Attr(series.c.pps_start_time, "time", _E),
    "SOPInstanceUID": Attr(instances.c.sop_uid, "uid", _I),
    "SOPClassUID": Attr(instances.c.sop_class_uid, "uid", _I),
    "InstanceNumber": Attr(instances.c.instance_number, "int", _I),
    "Rows": Attr(instances.c.rows, "int", _I),
    "Columns": Attr(instances.c.columns, "int", _I),
    "BitsAllocated": Attr(instances.c.bits_allocated, "int", _I),
    "NumberOfFrames": Attr(instances.c.number_of_frames, "int", _I),
}
# Person-name attributes with a fuzzy (pinyin-folded) word list kept beside them.
FUZZY_COLUMNS: dict[str, Any] = {
    "PatientName": patients.c.patient_name_fuzzy,
    "ReferringPhysicianName": studies.c.referring_physician_fuzzy,
}
FUZZY_LENGTH = 1000  # schema length of the ``*_fuzzy`` columns
_ORDER = {_S: 0, _E: 1, _I: 2}
# Computed at query time (no counters to keep in step on every insert).
COMPUTED = {
    _S: ("ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    _E: ("NumberOfSeriesRelatedInstances",),
    _I: (),
}


def _like(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _is_han(char: str) -> bool:
    return unicodedata.name(char, "").startswith("CJK ")


def _fold_word(word: str) -> str:
    """Case- and accent-free letters and digits of ``word`` (Chinese characters kept as they are)."""
    return "".join(c for c in fold_name(word) if c.isalnum())


def _syllables(word: str, *, every_reading: bool) -> Iterator[list[str]]:
    """Per character of ``word``: its pinyin readings (Han) or the run of other characters."""
    run = ""
    for char in word:
        if _is_han(char):
            if run:
                yield [run]
                run = ""
            readings = pinyin(char, style=Style.NORMAL, heteronym=True)[0] if every_reading else []
            first = lazy_pinyin(char, style=Style.NORMAL)[0]
            yield [first, *(r for r in readings if r != first)]
        else:
            run += char
    if run:
        yield [run]


def _words(value: str, *, stored: bool) -> list[str]:
    """The fuzzy words of a PN value (``stored``) or of a fuzzy query value.

    Stored words: every whitespace-separated word of every component of every group, each Han
    character's every pinyin reading alone (surnames such as 曾 read "zeng" as well as "ceng"), the
    component and the whole group joined up ("zhangsan"), and ``ü`` written "v" also as "u".
    Query words: the words of the value, Han characters as their usual reading, joined per word.
    """
    words: list[str] = []

    def add(word: str) -> None:
        for w in (word, word.replace("v", "u")) if stored else (word,):
            if w and w not in words:
                words.append(w)

    for group in value.split("="):
        group_joined = ""
        for component in group.split("^"):
            component_joined = ""
            for raw in component.split():
                parts = list(_syllables(_fold_word(raw), every_reading=stored))
                joined = "".join(p[0] for p in parts)
                component_joined += joined
                if not stored:
                    add(joined)
                    continue
                add(joined)
                for readings in parts:
                    for reading in readings:
                        add(reading)
            group_joined += component_joined
            if stored:
                add(component_joined)
        if stored:
            add(group_joined)
    return words


def fuzzy_name(value: str) -> str:
    """The folded word list stored beside a person name for fuzzy matching (`` w1 w2 …``)."""
    out = ""
    for word in _words(value, stored=True):
        if len(out) + len(word) + 1 > FUZZY_LENGTH:
            break
        out += f" {word}"
    return out


_FUZZY_UNSUPPORTED = re.compile(r"[?]|\*(?!\s*$)")


def fuzzy_applies(value: str) -> bool:
    """Whether fuzzy matching can be applied to a person-name query value.

    Values with ``?`` or with ``*`` anywhere but at the end are matched literally (as wildcards);
    QIDO-RS then answers with the Warning of PS3.18 §8.3.4.2. A trailing ``*`` is the prefix
    matching fuzzy matching does anyway.
    """
    return _FUZZY_UNSUPPORTED.search(value) is None


def _fuzzy(key: str, value: str) -> ColumnElement[bool] | None:
    column = FUZZY_COLUMNS[key]
    words = _words(value.strip().rstrip("*"), stored=False)
    if not words:
        return None
    escaped = [w.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") for w in words]
    return and_(*(column.like(f"% {w}%", escape="\\") for w in escaped))


def _range(column: Any, value: str, key: str) -> ColumnElement[bool]:
    low, _, high = value.partition("-")
    low, high = low.strip(), high.strip()
    if not low and not high:
        raise QueryError(f"{key}: empty range {value!r}")
    if low and high and low > high:
        raise QueryError(f"{key}: range {value!r} ends before it starts")
    parts = []
    if low:
        parts.append(column >= low)
    if high:
        # "…-20240131" includes the whole last day/time: compare on the value's own precision.
        parts.append(func.substr(column, 1, len(high)) <= high)
    return and_(*parts)


def match(key: str, value: str, *, fuzzy: bool = False) -> ColumnElement[bool] | None:
    """The SQL condition for one matching key, or None for universal matching.

    ``fuzzy`` asks for fuzzy person-name matching (PS3.4 C.2.2.2.1.1); it applies to the keys of
    :data:`FUZZY_COLUMNS` whose value :func:`fuzzy_applies` to, others match literally.
    """
    attr = ATTRIBUTES[key]
    value = value.strip()
    if value in ("", "*"):
        return None
    if fuzzy and key in FUZZY_COLUMNS and fuzzy_applies(value):
        return _fuzzy(key, value)
    col: ColumnElement[Any] = attr.column
    if attr.kind == "uid":
        uids = [u.strip() for u in value.split("\\") if u.strip()]
        return col == uids[0] if len(uids) == 1 else col.in_(uids)
    if attr.kind in ("date", "time") and "-" in value:
        return _range(col, value, key)
    if attr.kind == "int":
        try:
            numbers = [int(v) for v in value.split("\\")]
        except ValueError:
            raise QueryError(f"{key}: {value!r} is not an integer") from None
        return col.in_(numbers)
    if attr.kind == "pn":
        folded_col = patients.c.patient_name_folded if col is patients.c.patient_name else func.lower(col)
        pattern = _like(fold_name(value))
        if "%" not in pattern and "_" not in pattern.replace("\\_", ""):
            # a name without wildcards matches a whole component group
            return or_(
                folded_col == pattern,
                folded_col.like(f"{pattern}=%", escape="\\"),
                folded_col.like(f"%={pattern}", escape="\\"),
                folded_col.like(f"%={pattern}=%", escape="\\"),
            )
        return or_(folded_col.like(pattern, escape="\\"), folded_col.like(f"%={pattern}", escape="\\"))
    if "*" in value or "?" in value:
        return col.like(_like(value), escape="\\")
    if "\\" in value and attr.kind == "text":
        return col.in_(value.split("\\"))
    return col == value


def supported(key: str) -> bool:
    """Whether ``key`` (a DICOM keyword) can be used as a matching key."""
    return key in ATTRIBUTES or key == "ModalitiesInStudy"


def _study_computed() -> list[Any]:
    """ModalitiesInStudy and the study's series and instance counts, correlated to ``studies``.

    The subqueries use their own aliases of ``series`` and ``instances`` so that they correlate to
    the study only, also in SERIES- and IMAGE-level statements that join those tables.
    """
    se, inst = series.alias("c_series"), instances.alias("c_instances")
    n_series = select(func.count()).select_from(se).where(se.c.study_pk == studies.c.id).scalar_subquery()
    n_inst = (
        select(func.count())
        .select_from(inst.join(se, se.c.id == inst.c.series_pk))
        .where(se.c.study_pk == studies.c.id)
        .scalar_subquery()
    )
    mods_in_study = (
        select(func.aggregate_strings(se.c.modality, "\\"))
        .select_from(se)
        .where(se.c.study_pk == studies.c.id)
        .scalar_subquery()
    )
    return [
        mods_in_study.label("ModalitiesInStudy"),
        n_series.label("NumberOfStudyRelatedSeries"),
        n_inst.label("NumberOfStudyRelatedInstances"),
    ]


def _series_computed() -> list[Any]:
    """The series' instance count, correlated to ``series`` (own alias of ``instances``)."""
    inst = instances.alias("c_instances")
    n_inst = select(func.count()).select_from(inst).where(inst.c.series_pk == series.c.id).scalar_subquery()
    return [n_inst.label("NumberOfSeriesRelatedInstances")]


def build(
    level: Level,
    criteria: Mapping[str, str],
    *,
    limit: int | None = None,
    offset: int = 0,
    fuzzy: bool = False,
    metadata: bool = False,
    parent_counts: bool = False,
    restrict: ColumnElement[bool] | None = None,
) -> Select[Any]:
    """One SELECT returning every catalogued and computed attribute at ``level``.

    Keys of deeper levels than ``level`` are refused; unknown keys are ignored (the caller decides
    whether to warn, see :func:`supported`). Rows come back in a stable order (date, then primary
    keys) so paging is stable. ``fuzzy`` turns on fuzzy person-name matching. ``metadata`` adds
    ``_metadata_json``: the instance's DICOM JSON header at IMAGE level, the first instance's at
    STUDY and SERIES level (QIDO-RS ``includefield`` of attributes the catalog does not keep).
    ``parent_counts`` adds the computed attributes of the enclosing levels too (ModalitiesInStudy
    and the study counts at SERIES and IMAGE level, the series count at IMAGE level), which
    QIDO-RS returns for "all series" and "all instances" searches (PS3.18 §10.6.3.3).
    ``restrict``: a condition on ``studies`` the rows must also meet — the studies the caller may
    see (``gateway.security.resources``, issue 6 §3), applied in this same statement.
    """
    conds: list[ColumnElement[bool]] = [] if restrict is None else [restrict]
    for key, value in criteria.items():
        if key == "ModalitiesInStudy":
            mods = [m for m in value.split("\\") if m and m != "*"]
            if mods:
                other = series.alias("mods_series")  # not the row's own series at SERIES/IMAGE level
                conds.append(exists().where(other.c.study_pk == studies.c.id, other.c.modality.in_(mods)))
            continue
        attr = ATTRIBUTES.get(key)
        if attr is None:
            continue
        if _ORDER[attr.level] > _ORDER[level]:
            raise QueryError(f"{key}: not a {level.value.lower()}-level attribute")
        cond = match(key, value, fuzzy=fuzzy)
        if cond is not None:
            conds.append(cond)

    cols: list[Any] = [a.column.label(k) for k, a in ATTRIBUTES.items() if _ORDER[a.level] <= _ORDER[level]]
    from_ = studies.join(patients, patients.c.id == studies.c.patient_pk)
    if level is Level.STUDY:
        cols += _study_computed()
        if metadata:
            first = (
                select(instances.c.metadata_json)
                .select_from(instances.join(series, series.c.id == instances.c.series_pk))
                .where(series.c.study_pk == studies.c.id)
                .order_by(series.c.id, instances.c.id)
                .limit(1)
                .scalar_subquery()
            )
            cols.append(first.label("_metadata_json"))
        order: list[Any] = [studies.c.study_date, studies.c.id]
    elif level is Level.SERIES:
        from_ = from_.join(series, series.c.study_pk == studies.c.id)
        cols += _series_computed()
        if parent_counts:
            cols += _study_computed()
        if metadata:
            first = (
                select(instances.c.metadata_json)
                .where(instances.c.series_pk == series.c.id)
                .order_by(instances.c.id)
                .limit(1)
                .scalar_subquery()
            )
            cols.append(first.label("_metadata_json"))
        order = [studies.c.study_date, studies.c.id, series.c.series_number, series.c.id]
    else:
        from_ = from_.join(series, series.c.study_pk == studies.c.id).join(
            instances, instances.c.series_pk == series.c.id
        )
        cols += [
            instances.c.transfer_syntax.label("_transfer_syntax"),
            instances.c.blob_key.label("_blob_key"),
            instances.c.size.label("_size"),
            instances.c.sha256.label("_sha256"),
        ]
        if parent_counts:
            cols += _series_computed() + _study_computed()
        if metadata:
            cols.append(instances.c.metadata_json.label("_metadata_json"))
        order = [studies.c.id, series.c.id, instances.c.instance_number, instances.c.id]
    stmt = select(*cols).select_from(from_).where(and_(literal(True), *conds)).order_by(*order)
    if limit is not None:
        stmt = stmt.limit(limit)
    if offset:
        stmt = stmt.offset(offset)
    return stmt
