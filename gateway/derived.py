"""3D post-processed (derived) series and their source series (R-UP-2, issue 4 §2).

A derived series — an MPR, MIP, volume rendering or other 3D reconstruction made on a workstation,
e.g. a rib 3D reconstruction beside the plain chest CT — must be uploaded together with the
original scan it was made from. Forwarding works per study, so both travel together whenever they
are in the same study; what can go wrong is that the derived series arrives without its source
(the workstation sends its result, the modality's series never comes). This module recognises
derived series in a study and says, for each, whether its source is held; upload monitoring
(``gateway/monitoring.py``) flags the study when one is not.

Recognised as derived (from the header JSON the catalog keeps of each series' first instance):

* Image Type (0008,0008) value 2 ``SECONDARY`` (made after the acquisition, e.g. on a 3D
  workstation), or a value from the third on naming a reconstruction (``MPR``, ``MIP``,
  ``MINIP``, ``VR``, ``VOLUME``, ``3D``, ``REFORMATTED``, ``CURVED``, ``PROJECTION IMAGE``,
  ``CPR``, ``SSD``), or value 1 ``DERIVED`` with a Source Image Sequence naming what it was made
  from. ``DERIVED\\PRIMARY`` alone is not enough: processed DX/CR images "for presentation" carry
  it and are the original scan.

Its source is *held* when an instance it references in Source Image Sequence (0008,2112) or
Referenced Image Sequence (0008,1140) is in the study; when it references none, when the study
holds an original series (not derived) of the same Frame of Reference UID (0020,0052) — or, without
a frame of reference, any original image series.

Only image series count: a series without Image Type (SR, presentation states, KOS) is neither
derived nor a source.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select

from gateway.archive.catalog import Catalog
from gateway.archive.schema import instances, series, studies

RECONSTRUCTION_WORDS = frozenset(
    {"MPR", "MIP", "MINIP", "VR", "VOLUME", "3D", "REFORMATTED", "CURVED", "PROJECTION IMAGE", "CPR", "SSD"}
)
_IMAGE_TYPE = "00080008"
_FRAME_OF_REFERENCE = "00200052"
_REFERENCE_SEQUENCES = ("00082112", "00081140")  # Source Image, Referenced Image
_REFERENCED_SOP = "00081155"


@dataclass(frozen=True)
class SeriesKind:
    """What one image series of a study is, for R-UP-2."""

    series_uid: str
    series_number: int | None
    description: str
    derived: bool
    image_type: tuple[str, ...]
    frame_of_reference: str
    references: frozenset[str]  # SOP Instance UIDs its first instance was made from


@dataclass(frozen=True)
class DerivedSeries:
    """A derived series of a study and whether what it was made from is held."""

    series_uid: str
    series_number: int | None
    description: str
    image_type: tuple[str, ...]
    source_held: bool
    reason: str  # how that was decided, in words

    def as_json(self) -> dict[str, Any]:
        return {
            "series_uid": self.series_uid,
            "series_number": self.series_number,
            "description": self.description,
            "image_type": list(self.image_type),
            "source_held": self.source_held,
            "reason": self.reason,
        }


def is_derived(image_type: tuple[str, ...], *, has_sources: bool = False) -> bool:
    """Whether an image is a post-processed / reconstructed one (see the module docstring)."""
    values = [v.strip().upper() for v in image_type]
    if values[1:2] == ["SECONDARY"] or any(v in RECONSTRUCTION_WORDS for v in values[2:]):
        return True
    return values[:1] == ["DERIVED"] and has_sources


def _values(doc: dict[str, Any], tag: str) -> list[Any]:
    elem = doc.get(tag)
    return list(elem.get("Value", [])) if isinstance(elem, dict) else []


def classify(
    doc: dict[str, Any], *, series_uid: str, series_number: int | None, description: str
) -> SeriesKind | None:
    """A series' kind from the DICOM JSON of one of its instances; None if it is not an image."""
    image_type = tuple(str(v) for v in _values(doc, _IMAGE_TYPE))
    if not image_type:
        return None
    refs: set[str] = set()
    for tag in _REFERENCE_SEQUENCES:
        for item in _values(doc, tag):
            if isinstance(item, dict):
                refs.update(str(v) for v in _values(item, _REFERENCED_SOP))
    frame = _values(doc, _FRAME_OF_REFERENCE)
    return SeriesKind(
        series_uid,
        series_number,
        description,
        is_derived(image_type, has_sources=bool(refs)),
        image_type,
        str(frame[0]) if frame else "",
        frozenset(refs),
    )


def study_series(catalog: Catalog, study_uid: str) -> list[SeriesKind]:
    """Every image series of the study, classified from its first instance's header (one query)."""
    first = (
        select(instances.c.series_pk, func.min(instances.c.id).label("first_id"))
        .group_by(instances.c.series_pk)
        .subquery()
    )
    stmt = (
        select(
            series.c.series_uid,
            series.c.series_number,
            series.c.series_description,
            instances.c.metadata_json,
        )
        .select_from(
            studies.join(series, series.c.study_pk == studies.c.id)
            .join(first, first.c.series_pk == series.c.id)
            .join(instances, instances.c.id == first.c.first_id)
        )
        .where(studies.c.study_uid == study_uid)
        .order_by(series.c.series_number, series.c.id)
    )
    with catalog.engine.connect() as conn:
        rows = conn.execute(stmt).all()
    found = []
    for uid, number, description, doc in rows:
        text = doc.decode("utf-8") if isinstance(doc, bytes | bytearray) else doc
        kind = classify(json.loads(text), series_uid=uid, series_number=number, description=description)
        if kind is not None:
            found.append(kind)
    return found


def derived_series(catalog: Catalog, study_uid: str) -> list[DerivedSeries]:
    """The study's derived series, each with whether its source is held (R-UP-2)."""
    kinds = study_series(catalog, study_uid)
    derived = [k for k in kinds if k.derived]
    if not derived:
        return []
    originals = [k for k in kinds if not k.derived]
    wanted = set().union(*(k.references for k in derived))
    held: set[str] = set()
    if wanted:
        found = catalog.instances_by_uid(sorted(wanted))
        held = {sop for sop, inst in found.items() if inst.study_uid == study_uid}
    out = []
    for k in derived:
        if k.references:
            hits = k.references & held
            ok = bool(hits)
            reason = (
                f"{len(hits)} of the {len(k.references)} source images it references are held"
                if ok
                else f"none of the {len(k.references)} source images it references is held"
            )
        elif k.frame_of_reference:
            ok = any(o.frame_of_reference == k.frame_of_reference for o in originals)
            reason = (
                "an original series of the same frame of reference is held"
                if ok
                else "no original series of its frame of reference is held"
            )
        else:
            ok = bool(originals)
            reason = "an original image series is held" if ok else "the study holds no original image series"
        out.append(DerivedSeries(k.series_uid, k.series_number, k.description, k.image_type, ok, reason))
    return out
