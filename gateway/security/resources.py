"""Resource checks: which studies a user may see (issue 6 §3; R-SE-2, R-SE-3, R-SE-16; IDOR).

One mechanism for every route: :class:`StudyAccess` turns a user into ONE SQL condition over the
catalog's ``studies`` table. QIDO-RS adds it to its one search statement (results are filtered in
the database, never after); every route below ``/dicom-web/studies/{study}`` (WADO-RS retrieve,
metadata, frames, bulk data, rendered, thumbnail, and QIDO-RS inside a study) is checked by the
guard with the same condition before the route runs, and answers **404** when the study is not
visible — exactly as for a study that does not exist, so nobody learns what exists elsewhere.

**How a study knows its institution.** A study belongs to institution X when

* an exam record of X names it (``exams.hospital_code`` = X: the HIS of X posted it, the
  front-end forwarded it to the center), or
* (front-end) one of its instances came from an AE that ``[[dicom.peers]]`` assign to X; an AE not
  listed there, and STOW-RS, count as the front-end's own institution (``institution``).

The center knows institutions from exam records only: a study whose record has not arrived yet is
visible to no institution-bound user there (fail closed), only to roles that reach every study.

**Cache copies are nobody's here.** A study in ``cached_studies`` (another institution's study
fetched into this node's cache, issue 5 R-CE-7) belongs to no institution of this node, whatever
its instances' source or records say: a doctor sees it only through a live patient grant
(R-RT-4, R-CQ-5) — ``gateway/security/grant_policy.py``, registered as a :class:`ResourcePolicy`.

**Reach** (``permissions.Reach``): ``all`` — no condition; ``institution`` — the user's
institution, OR any extra :class:`ResourcePolicy` (the hook for patients' retrieval grants,
issue 5 ``RetrievalGrant``: a policy returning "studies granted to this doctor"); ``own`` — a
patient's own studies: those whose exam records carry the patient's pseudonym (``person_key``).
A :class:`StudyReadObserver` hears every single-study check of an institution-bound user (the
grant policy records retrievals of cache copies for the national index, R-RT-4).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy import ColumnElement, and_, exists, false, or_, select

from gateway.archive.catalog import Catalog
from gateway.archive.schema import cached_studies, exams, instances, series, studies
from gateway.security.permissions import Reach, permission


class Viewer(Protocol):
    """The facts about a user a resource check uses (``guard.Principal`` of kind ``user``)."""

    @property
    def id(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def institution(self) -> str: ...
    @property
    def person_key(self) -> str: ...


class ResourcePolicy(Protocol):
    """An extra reason a user may see studies (e.g. a patient's grant to a doctor, issue 5).

    Return a condition over ``gateway.archive.schema.studies`` (it is OR-ed with the user's own
    institution's), or None when the policy grants this user nothing. It must be one SQL condition
    (a subquery on a grants table, typically): it runs inside QIDO's single statement.
    """

    def visible_studies(self, viewer: Viewer) -> ColumnElement[bool] | None: ...


class StudyReadObserver(Protocol):
    """Told of every single-study check (``may_see``) of an institution-bound user, with its
    outcome: e.g. to record a retrieval of a cache copy for the national index (R-RT-4)."""

    def study_checked(self, viewer: Viewer, action: str, study_uid: str, visible: bool) -> None: ...


@dataclass(frozen=True)
class StudyOwnership:
    """Which institution a study belongs to (module docstring). ``home``: the front-end's own
    institution (None at a center); ``peers``: AE title → institution from ``[[dicom.peers]]``."""

    home: str | None = None
    peers: Mapping[str, str] = field(default_factory=dict)

    def of_institution(self, institution: str) -> ColumnElement[bool]:
        by_record = studies.c.study_uid.in_(
            select(exams.c.study_uid).where(exams.c.hospital_code == institution)
        )
        conditions: list[ColumnElement[bool]] = [by_record]
        if self.home is not None:
            s, i = series.alias("scope_series"), instances.alias("scope_instances")
            if institution == self.home:
                foreign = sorted(ae for ae, inst in self.peers.items() if inst != self.home)
                source = i.c.source_ae.not_in(foreign) if foreign else None
            else:
                theirs = sorted(ae for ae, inst in self.peers.items() if inst == institution)
                source = i.c.source_ae.in_(theirs) if theirs else None
            if source is not None or institution == self.home:
                where = [s.c.study_pk == studies.c.id, i.c.series_pk == s.c.id]
                if source is not None:
                    where.append(source)
                conditions.append(exists().where(*where))
        # a cache copy is another institution's study, never ours (R-RT-4: only a grant shows it)
        copy = studies.c.study_uid.in_(select(cached_studies.c.study_uid))
        return and_(or_(*conditions), ~copy)


def own_studies(person_key: str) -> ColumnElement[bool]:
    if not person_key:
        return false()
    return studies.c.study_uid.in_(select(exams.c.study_uid).where(exams.c.person_key == person_key))


class StudyAccess:
    """The studies a user may see for an action, as one SQL condition (module docstring)."""

    def __init__(
        self, catalog: Catalog, ownership: StudyOwnership, policies: Sequence[ResourcePolicy] = ()
    ) -> None:
        self.catalog = catalog
        self.ownership = ownership
        self.policies = list(policies)  # the grants hook: append a ResourcePolicy
        self.observers: list[StudyReadObserver] = []  # told of each single-study check
        # The built-in conditions, per institution / pseudonym: building one costs ~1 ms (aliases,
        # subqueries), more than running it; the same object also lets SQLAlchemy reuse its
        # compiled statement. (Policies are asked every time: theirs may change with time.)
        self._built: dict[tuple[str, str], ColumnElement[bool]] = {}

    def condition(self, viewer: Viewer, action: str) -> ColumnElement[bool] | None:
        """None: every study; else the condition a study must meet (``false()`` for none)."""
        granted = permission(viewer.role, action)
        if granted is None:
            return false()
        if granted.reach is Reach.ALL:
            return None
        if granted.reach is Reach.OWN:
            return self._once(("own", viewer.person_key), lambda: own_studies(viewer.person_key))
        conditions = []
        if viewer.institution:
            institution = viewer.institution
            conditions.append(
                self._once(("institution", institution), lambda: self.ownership.of_institution(institution))
            )
        for policy in self.policies:
            extra = policy.visible_studies(viewer)
            if extra is not None:
                conditions.append(extra)
        return or_(*conditions) if conditions else false()

    def _once(self, key: tuple[str, str], build: Callable[[], ColumnElement[bool]]) -> ColumnElement[bool]:
        found = self._built.get(key)
        if found is None:
            if len(self._built) > 10_000:  # bounded: institutions are few, patients many
                self._built.clear()
            found = self._built[key] = build()
        return found

    def may_see(self, viewer: Viewer, action: str, study_uid: str) -> bool:
        """Whether the study exists here AND the user may see it (one indexed query)."""
        condition = self.condition(viewer, action)
        query = select(studies.c.id).where(studies.c.study_uid == study_uid)
        if condition is not None:
            query = query.where(condition)
        with self.catalog.engine.connect() as conn:
            visible = conn.execute(query.limit(1)).first() is not None
        if self.observers and condition is not None:  # not for reach "all"
            for observer in self.observers:
                observer.study_checked(viewer, action, study_uid, visible)
        return visible
