"""The forward path: front-end → its province's sharing center, nothing lost, nothing twice.

Issue 3 §6–7, R-UP-3, R-UP-4, R-CE-9. The outbox (``forward_jobs``, one row per study) is filled
by the catalog in the same transaction as each stored instance. Workers claim due jobs with a
lease, send the study's unsent instances by STOW-RS (through a :class:`CenterLink`: the domain does
not speak HTTP), record the center's answer per instance, then reconcile: the center's inventory
(SOP Instance UID → SHA-256 of what it really holds) must equal ours, or the difference is sent
again. Transport errors back off exponentially with jitter and never fail a job for good; the
center's refusals of an instance are retried a few times, then the job is ``failed`` with the
reason, for an admin.

States: ``queued`` → ``sending`` → ``sent`` (all accepted) → ``confirmed`` (inventory matches);
``failed`` (an instance refused repeatedly). A crash while ``sending`` leaves a lease that
expires; the next claim takes the job again, and instances already accepted are not re-sent.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import and_, delete, func, or_, select, update

from gateway.archive.blobstore import BlobStore
from gateway.archive.catalog import Catalog, StoredInstance
from gateway.archive.schema import forward_jobs, forward_results
from gateway.audit import AuditLog, EventType, Result
from gateway.exams import ExamBook
from gateway.qc.gate import Hold, QcGate

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


class CenterUnavailable(Exception):
    """The center could not be reached or answered with a server error; try again later."""


@dataclass(frozen=True)
class InstanceOutcome:
    accepted: bool
    reason: str = ""


class CenterLink(Protocol):
    """What the forwarder needs of the center (implemented by ``dicomweb.client.DicomWebClient``)."""

    def stow(
        self, study_uid: str, items: Sequence[StoredInstance], store: BlobStore
    ) -> dict[str, InstanceOutcome]:
        """Send instances; the center's answer per SOP Instance UID. Raises CenterUnavailable."""
        ...

    def inventory(self, study_uid: str) -> dict[str, str]:
        """SOP Instance UID → SHA-256 of the bytes the center holds. Raises CenterUnavailable."""
        ...

    def report_manifest(
        self, study_uid: str, manifest: dict[str, str], qc: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Tell the center what we sent (and our QC of it, R-QC-1); its upload-monitoring record
        back (with its own QC, R-CE-5). Raises CenterUnavailable."""
        ...

    def post_exam(self, record: dict[str, Any]) -> None:
        """Send an exam record (with settlement, if any). Raises CenterUnavailable."""
        ...


@dataclass(frozen=True)
class ForwardPolicy:
    settle: timedelta = timedelta(seconds=3)  # quiet time before a study is sent
    lease: timedelta = timedelta(minutes=10)
    backoff_initial: timedelta = timedelta(seconds=5)
    backoff_max: timedelta = timedelta(minutes=30)
    max_refusals: int = 5  # attempts at an instance the center refuses, then `failed`
    reconcile_every: timedelta = timedelta(hours=24)  # confirmed studies are checked again
    reconcile_window: timedelta = timedelta(days=7)  # ... if confirmed within this window


def backoff(attempts: int, policy: ForwardPolicy, rnd: random.Random) -> timedelta:
    """Exponential backoff with full jitter, capped."""
    ceiling = min(
        policy.backoff_max.total_seconds(), policy.backoff_initial.total_seconds() * 2 ** max(attempts - 1, 0)
    )
    return timedelta(seconds=rnd.uniform(ceiling / 2, ceiling))


class Forwarder:
    """Drains the outbox of one front-end into its center."""

    def __init__(
        self,
        catalog: Catalog,
        store: BlobStore,
        center: CenterLink,
        *,
        policy: ForwardPolicy | None = None,
        workers: int = 2,
        clock: Clock = utcnow,
        exams: ExamBook | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.exams = exams
        self.audit = audit  # R-SE-4: a study confirmed by the center, or given up on
        self.catalog = catalog
        self.store = store
        self.center = center
        self.policy = policy or ForwardPolicy()
        self.workers = workers
        self.clock = clock
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._rnd = random.Random()
        # How many of a study's instances are not in their final bytes yet (lossless compression
        # pending, gateway/codec, R-UP-1); set by the front-end. Such a study waits.
        self.not_final: Callable[[str], int] | None = None
        # Image QC (gateway/qc/gate.py, R-QC-1): holds a study while instances are ungraded or a
        # reject waits for its replacement, names replaced rejects never to send, adds our QC to
        # the manifest and keeps the center's; set by the front-end when [qc] enabled.
        self.qc: QcGate | None = None

    # ---- running ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the workers, first taking back jobs a crashed run left ``sending``.

        One forwarder runs per front-end catalog (the front-end is one machine), so a job still
        marked ``sending`` at start belongs to a run that died; its lease need not be waited out.
        """
        with self.catalog.write() as conn:
            taken = conn.execute(
                update(forward_jobs)
                .where(forward_jobs.c.state == "sending")
                .values(state="queued", lease_until=None, next_attempt_at=self.clock())
            ).rowcount
        if taken:
            log.info("resuming %d studies interrupted while being sent", taken)
        for n in range(self.workers):
            t = threading.Thread(target=self._loop, name=f"forwarder-{n}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(30)
        # close the kept-alive connections: an HTTPS center otherwise waits on their TLS shutdown
        close = getattr(self.center, "close", None)
        if callable(close):
            close()

    def _loop(self) -> None:
        last_reconcile = datetime.min.replace(tzinfo=UTC)
        while not self._stop.is_set():
            try:
                if self.clock() - last_reconcile > timedelta(minutes=5):
                    self.schedule_reconciliation()
                    last_reconcile = self.clock()
                worked = self.run_once() | self.forward_exams()
            except Exception:  # a bug or a database hiccup must not kill the worker
                log.exception("forwarder pass failed")
                worked = False
            if not worked:
                self._wake.wait(0.5)
                self._wake.clear()

    # ---- one job -----------------------------------------------------------------------------

    def claim(self) -> str | None:
        """Take one due job (queued and settled, or with an expired lease); None if none is due."""
        now = self.clock()
        due = or_(
            and_(
                forward_jobs.c.state == "queued",
                forward_jobs.c.next_attempt_at <= now,
                forward_jobs.c.updated_at <= now - self.policy.settle,
            ),
            and_(forward_jobs.c.state == "sending", forward_jobs.c.lease_until < now),
        )
        with self.catalog.write() as conn:
            row = conn.execute(
                select(forward_jobs.c.id, forward_jobs.c.study_uid, forward_jobs.c.state)
                .where(due)
                .order_by(forward_jobs.c.next_attempt_at)
                .limit(1)
            ).first()
            if row is None:
                return None
            # compare-and-set on the state, so two workers (or processes) never take one job
            taken = conn.execute(
                update(forward_jobs)
                .where(forward_jobs.c.id == row.id, forward_jobs.c.state == row.state, due)
                .values(state="sending", lease_until=now + self.policy.lease, updated_at=now)
            ).rowcount
        return str(row.study_uid) if taken == 1 else None

    def run_once(self) -> bool:
        """Process one due job, if any; True if there was one."""
        study = self.claim()
        if study is None:
            return False
        try:
            self.process(study)
        except CenterUnavailable as exc:
            self._retry_later(study, f"center unavailable: {exc}")
        return True

    def forward_exams(self) -> bool:
        """Send exam records and settlements the center has not taken (R-UP-5); True if any."""
        if self.exams is None:
            return False
        rows = self.exams.unforwarded(limit=50)
        for row in rows:
            try:
                self.center.post_exam(ExamBook.as_forwarded(row))
            except CenterUnavailable as exc:
                log.warning("exam %s not forwarded yet: %s", row["accession_number"], exc)
                return False
            self.exams.forwarded(row["id"], row["updated_at"], at=self.clock())
        return bool(rows)

    def pending(self, study_uid: str) -> list[StoredInstance]:
        """The study's instances the center has not accepted in their current version."""
        held = self.catalog.locate({"StudyInstanceUID": study_uid})
        with self.catalog.engine.connect() as conn:
            sent = {
                (r.sop_uid, r.sha256)
                for r in conn.execute(
                    select(forward_results.c.sop_uid, forward_results.c.sha256).where(
                        forward_results.c.study_uid == study_uid, forward_results.c.status == "sent"
                    )
                )
            }
        return [i for i in held if (i.sop_uid, i.sha256) not in sent]

    def process(self, study_uid: str) -> None:
        if self._held_for_compression(study_uid):
            return
        hold = self.qc.check(study_uid) if self.qc is not None else Hold()
        if hold.reason:
            wait = timedelta(seconds=hold.retry_seconds)
            self._set(study_uid, state="queued", next_attempt_at=self.clock() + wait, last_error=hold.reason)
            return
        todo = [i for i in self.pending(study_uid) if i.sop_uid not in hold.exclude]
        refused: dict[str, str] = {}
        if todo:
            outcomes = self.center.stow(study_uid, todo, self.store)
            self._record(study_uid, todo, outcomes)
            refused = {sop: o.reason for sop, o in outcomes.items() if not o.accepted}
            unanswered = [i.sop_uid for i in todo if i.sop_uid not in outcomes]
            if unanswered:
                raise CenterUnavailable(f"no answer for {len(unanswered)} instances")
        if refused:
            self._refused(study_uid, refused)
            return
        if [i for i in self.pending(study_uid) if i.sop_uid not in hold.exclude]:  # new ones came meanwhile
            self._set(study_uid, state="queued", next_attempt_at=self.clock(), sent_at=self.clock())
            return
        self._set(study_uid, state="sent", sent_at=self.clock())
        self.reconcile(study_uid, exclude=hold.exclude)

    def _held_for_compression(self, study_uid: str) -> bool:
        """Put the study back for a second while instances are being compressed (R-UP-1): sent
        now, the center would get two different byte streams for one SOP Instance UID."""
        waiting = self.not_final(study_uid) if self.not_final is not None else 0
        if waiting:
            self._set(
                study_uid,
                state="queued",
                next_attempt_at=self.clock() + timedelta(seconds=1),
                last_error=f"waiting for lossless compression of {waiting} instances",
            )
        return waiting > 0

    def reconcile(self, study_uid: str, *, exclude: frozenset[str] = frozenset()) -> list[str]:
        """Compare with the center's inventory; re-queue what is missing or differs (R-UP-4).

        Returns the SOP Instance UIDs found missing or different. ``exclude``: instances never to
        be sent (QC rejects that were replaced, R-QC-1).
        """
        ours = {
            i.sop_uid: i.sha256
            for i in self.catalog.locate({"StudyInstanceUID": study_uid})
            if i.sop_uid not in exclude
        }
        theirs = self.center.inventory(study_uid)
        wrong = sorted(sop for sop, sha in ours.items() if theirs.get(sop) != sha)
        # the center keeps its own upload-monitoring record from what we say we sent (R-CE-9)
        if self.qc is None:
            self.center.report_manifest(study_uid, ours)
        else:  # our QC goes along; the center's comes back in its record (R-QC-1, R-CE-5)
            record = self.center.report_manifest(study_uid, ours, self.qc.report(study_uid))
            self.qc.received(study_uid, record)
        now = self.clock()
        if wrong:
            log.warning(
                "study %s: center lacks or differs on %d instances; sending them again", study_uid, len(wrong)
            )
            with self.catalog.write() as conn:
                conn.execute(delete(forward_results).where(forward_results.c.sop_uid.in_(wrong)))
            self._set(
                study_uid,
                state="queued",
                next_attempt_at=now,
                last_error=f"reconciliation: {len(wrong)} instances missing or different at the center",
            )
        else:
            self._set(study_uid, state="confirmed", confirmed_at=now, last_error="")
            self._audit(study_uid, Result.SUCCESS, {"state": "confirmed", "instances": len(ours)})
        return wrong

    def schedule_reconciliation(self) -> int:
        """Re-queue recently confirmed studies whose last check is older than the policy says."""
        now = self.clock()
        with self.catalog.write() as conn:
            return int(
                conn.execute(
                    update(forward_jobs)
                    .where(
                        forward_jobs.c.state == "confirmed",
                        forward_jobs.c.confirmed_at < now - self.policy.reconcile_every,
                        forward_jobs.c.enqueued_at > now - self.policy.reconcile_window,
                    )
                    .values(state="queued", next_attempt_at=now, updated_at=now - self.policy.settle)
                ).rowcount
            )

    # ---- bookkeeping -------------------------------------------------------------------------

    def _record(
        self, study_uid: str, todo: Sequence[StoredInstance], outcomes: dict[str, InstanceOutcome]
    ) -> None:
        now = self.clock()
        by_sop = {i.sop_uid: i for i in todo}
        with self.catalog.write() as conn:
            answered = [sop for sop in outcomes if sop in by_sop]
            if answered:
                conn.execute(delete(forward_results).where(forward_results.c.sop_uid.in_(answered)))
                conn.execute(
                    forward_results.insert(),
                    [
                        {
                            "study_uid": study_uid,
                            "sop_uid": sop,
                            "sha256": by_sop[sop].sha256,
                            "status": "sent" if outcomes[sop].accepted else "failed",
                            "reason": outcomes[sop].reason,
                            "at": now,
                        }
                        for sop in answered
                    ],
                )

    def _audit(self, study_uid: str, result: Result, detail: dict[str, Any]) -> None:
        if self.audit is None:
            return
        center = getattr(self.center, "base_url", None)
        self.audit.record_as(
            self.audit.system,
            EventType.FORWARD,
            resource=f"study:{study_uid}",
            result=result,
            detail={"study_instance_uid": study_uid, **({"center": center} if center else {}), **detail},
        )

    def _set(self, study_uid: str, **values: Any) -> None:
        values.setdefault("updated_at", self.clock())
        if values.get("state") != "sending":
            values.setdefault("lease_until", None)
        with self.catalog.write() as conn:
            conn.execute(update(forward_jobs).where(forward_jobs.c.study_uid == study_uid).values(**values))

    def _attempts(self, study_uid: str) -> int:
        with self.catalog.engine.connect() as conn:
            return int(
                conn.execute(
                    select(forward_jobs.c.attempts).where(forward_jobs.c.study_uid == study_uid)
                ).scalar_one()
            )

    def _retry_later(self, study_uid: str, error: str) -> None:
        attempts = self._attempts(study_uid) + 1
        delay = backoff(attempts, self.policy, self._rnd)
        log.warning(
            "study %s: %s; attempt %d, next in %.0f s", study_uid, error, attempts, delay.total_seconds()
        )
        # updated_at is not moved: the study has settled already
        with self.catalog.write() as conn:
            conn.execute(
                update(forward_jobs)
                .where(forward_jobs.c.study_uid == study_uid)
                .values(
                    state="queued",
                    attempts=attempts,
                    next_attempt_at=self.clock() + delay,
                    last_error=error,
                    lease_until=None,
                )
            )

    def _refused(self, study_uid: str, refused: dict[str, str]) -> None:
        attempts = self._attempts(study_uid) + 1
        sample = "; ".join(f"{sop}: {reason}" for sop, reason in list(refused.items())[:3])
        error = f"center refused {len(refused)} instances ({sample})"
        if attempts >= self.policy.max_refusals:
            log.error("study %s: %s; giving up after %d attempts", study_uid, error, attempts)
            self._set(study_uid, state="failed", attempts=attempts, last_error=error)
            self._audit(study_uid, Result.FAILURE, {"state": "failed", "attempts": attempts, "error": error})
            return
        self._set(
            study_uid,
            state="queued",
            attempts=attempts,
            last_error=error,
            next_attempt_at=self.clock() + backoff(attempts, self.policy, self._rnd),
        )

    # ---- status (GET /api/v1/forwarding, /metrics) ------------------------------------------

    def status(self, *, state: str | None = None, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Per study: state, attempts, last error, counts of sent/failed instances."""
        sent = (
            select(func.count())
            .where(
                forward_results.c.study_uid == forward_jobs.c.study_uid, forward_results.c.status == "sent"
            )
            .scalar_subquery()
        )
        failed = (
            select(func.count())
            .where(
                forward_results.c.study_uid == forward_jobs.c.study_uid, forward_results.c.status == "failed"
            )
            .scalar_subquery()
        )
        stmt = select(forward_jobs, sent.label("instances_sent"), failed.label("instances_failed"))
        if state:
            stmt = stmt.where(forward_jobs.c.state == state)
        stmt = (
            stmt.order_by(forward_jobs.c.enqueued_at.desc(), forward_jobs.c.id.desc())
            .limit(limit)
            .offset(offset)
        )
        with self.catalog.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    def metrics(self) -> dict[str, float]:
        """Queue depth, oldest queued age (s), failed jobs — for Prometheus."""
        now = self.clock()
        with self.catalog.engine.connect() as conn:
            rows = conn.execute(
                select(forward_jobs.c.state, func.count(), func.min(forward_jobs.c.enqueued_at)).group_by(
                    forward_jobs.c.state
                )
            ).all()
        out: dict[str, float] = {
            "queued": 0,
            "sending": 0,
            "sent": 0,
            "confirmed": 0,
            "failed": 0,
            "oldest_pending_seconds": 0,
        }
        for state, count, oldest in rows:
            out[state] = float(count)
            if state in ("queued", "sending") and oldest is not None:
                if oldest.tzinfo is None:
                    oldest = oldest.replace(tzinfo=UTC)
                out["oldest_pending_seconds"] = max(
                    out["oldest_pending_seconds"], (now - oldest).total_seconds()
                )
        return out

    def wake(self) -> None:
        self._wake.set()
