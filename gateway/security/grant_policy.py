"""Patients' retrieval grants as a resource policy (issue 5 §6 × issue 6 §3; R-RT-4, R-CQ-5, R-SE-2).

A cache copy (``cached_studies``: another institution's study fetched into this node's cache — a
front-end's, or a center's out-of-province copy) is no institution's study here
(``resources.StudyOwnership``). :class:`GrantPolicy` makes it visible to a user only while a
grant on record (``retrieval_grants``) allows it:

* the grant is the patient's (its ``person_key`` is the cache copy's),
* granted to the user's institution, and, if it names a doctor, to this user (username),
* live: not revoked, issued (5 minutes' clock skew allowed, as :func:`gateway.grants.check_grant`)
  and not expired by the node's one clock,
* in scope: a listed study, or — for a window grant — a study whose date is in the window (a
  study without a date is outside any window: fail closed).

It is ONE SQL condition (an ``EXISTS`` over the grants joined to the cache marks), so QIDO-RS
filters in its single statement and every route below ``/dicom-web/studies/{study}`` (WADO-RS
retrieve, metadata, frames, bulk data, rendered, thumbnail) is answered 404 without it, as for a
study that does not exist; the audit hook records that 404 like any other denied retrieval.

It also observes single-study checks (``resources.StudyReadObserver``): a user's WADO-RS read of
a cache copy, allowed or not, becomes a retrieval record (``gateway/retrievals.py``) that goes up
to the national index (R-RT-4 "every retrieval, allowed or not, is recorded locally and sent to
the index"). A viewer makes hundreds of requests for one study (frames, thumbnails), so one record
per user, study and outcome is written per ``every`` (default 10 minutes), not one per request.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import ColumnElement, exists, literal, or_, select

from gateway.archive.catalog import Catalog
from gateway.archive.schema import cached_studies, retrieval_grants, studies
from gateway.grants import GrantBook, GrantDenied, check_grant
from gateway.retrievals import RetrievalLog, RetrievalRecord
from gateway.security.permissions import Reach, permission
from gateway.security.resources import StudyAccess, Viewer

Clock = Callable[[], datetime]
SKEW = timedelta(minutes=5)  # as check_grant: a grant issued "just now" by a clock a bit ahead


class GrantPolicy:
    """:class:`~gateway.security.resources.ResourcePolicy` and ``StudyReadObserver`` of one
    node's grants (module docstring). ``node``: where the retrievals happen (the record's node);
    ``on_record``: wakes the retrieval sender."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        clock: Clock,
        retrievals: RetrievalLog | None = None,
        node: str = "",
        on_record: Callable[[], None] = lambda: None,
        every: timedelta = timedelta(minutes=10),
    ) -> None:
        self.catalog = catalog
        self.clock = clock
        self.book = GrantBook(catalog, clock=clock)
        self.retrievals = retrievals
        self.node = node
        self.on_record = on_record
        self.every = every
        self._recorded: dict[tuple[str, str, bool], datetime] = {}
        self._lock = threading.Lock()

    def install(self, access: StudyAccess | None) -> None:
        """Make this policy one of a node's resource policies and study-read observers — the one
        wiring both roles use (a front-end's hospital users; a center's institutions' users)."""
        if access is None:
            return
        access.policies.append(self)
        access.observers.append(self)

    # ---- ResourcePolicy ------------------------------------------------------------------------

    def visible_studies(self, viewer: Viewer) -> ColumnElement[bool] | None:
        """Cache copies a live grant shows this user; None for a user of no institution."""
        if not viewer.institution:
            return None
        now = self.clock().astimezone(UTC)
        g, cs = retrieval_grants.alias("policy_grants"), cached_studies.alias("policy_cached")
        listed = g.c.studies.like(literal('%"') + cs.c.study_uid + literal('"%'))  # JSON list of UIDs
        return exists().where(
            cs.c.study_uid == studies.c.study_uid,
            g.c.person_key == cs.c.person_key,
            g.c.institution == viewer.institution,
            or_(g.c.doctor.is_(None), g.c.doctor == viewer.id),
            g.c.issued_at <= now + SKEW,
            g.c.expires_at > now,
            g.c.revoked_at.is_(None),
            or_(g.c.studies.is_(None), listed),
            or_(g.c.window_from.is_(None), studies.c.study_date >= g.c.window_from),
            or_(g.c.window_to.is_(None), studies.c.study_date <= g.c.window_to),
            _dated(g.c.window_from, g.c.window_to),
        )

    # ---- StudyReadObserver: retrieval records of cache copies ----------------------------------

    def study_checked(self, viewer: Viewer, action: str, study_uid: str, visible: bool) -> None:
        if self.retrievals is None or action != "wado" or not viewer.institution:
            return
        granted = permission(viewer.role, action)
        if granted is None or granted.reach is not Reach.INSTITUTION:
            return
        now = self.clock()
        key = (viewer.id, study_uid, visible)
        with self._lock:
            last = self._recorded.get(key)
            if last is not None and now - last < self.every:
                return
            if len(self._recorded) > 10_000:  # bounded: a debounce, not a log
                self._recorded.clear()
            self._recorded[key] = now  # claimed: a viewer's parallel requests make one record
        try:
            if not self._record(viewer, study_uid, visible, now):
                with self._lock:
                    self._recorded.pop(key, None)  # not a cache copy (yet): ask again next time
        except Exception:
            with self._lock:
                self._recorded.pop(key, None)
            raise

    def _record(self, viewer: Viewer, study_uid: str, visible: bool, now: datetime) -> bool:
        """Record a user's read of a cache copy; False if the study is not a cache copy."""
        assert self.retrievals is not None
        with self.catalog.engine.connect() as conn:
            row = conn.execute(
                select(cached_studies.c.person_key, studies.c.study_date)
                .select_from(cached_studies.join(studies, studies.c.study_uid == cached_studies.c.study_uid))
                .where(cached_studies.c.study_uid == study_uid)
            ).first()
        if row is None:
            return False  # not a cache copy: the institution rule decided, nothing to record
        grant_id, reason = None, ""
        try:
            grant = check_grant(
                self.book.for_person(row.person_key),
                person_key=row.person_key,
                institution=viewer.institution,
                doctor=viewer.id,
                now=now,
                study_uid=study_uid,
                study_date=_date(row.study_date),
            )
            grant_id = grant.grant_id if visible else None
            if not visible:
                reason = "the study is outside the scope the patient authorized"
        except GrantDenied as denied:
            reason = denied.reason
        rec = RetrievalRecord.model_validate(
            {
                "at": now,
                "person_key": row.person_key,
                "study_uid": study_uid,
                "institution": viewer.institution,
                "doctor": viewer.id[:64],
                "action": "retrieve",
                "result": "allowed" if visible else "denied",
                "reason": "" if visible else reason,
                "grant_id": grant_id,
                "node": self.node,
            }
        )
        self.retrievals.record(rec)
        self.on_record()
        return True


def _dated(window_from: ColumnElement[str], window_to: ColumnElement[str]) -> ColumnElement[bool]:
    """A window grant covers only studies with a date (fail closed on an empty StudyDate)."""
    return or_(
        (window_from.is_(None) & window_to.is_(None)),
        studies.c.study_date != "",
    )


def _date(value: str | None) -> date | None:
    try:
        return datetime.strptime(value, "%Y%m%d").date() if value else None
    except ValueError:
        return None
