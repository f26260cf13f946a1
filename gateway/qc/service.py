"""Image QC on one node, wired: rules, engine, results book, worker, forward gate (R-QC-1, R-CE-5).

The front-end and the center open one :class:`QcService` each when ``[qc] enabled`` (before
ingest starts, so every stored instance is queued); the front-end also gives its forwarder the
:attr:`gate`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.archive import Archive, ArchiveUnavailable
from gateway.config import ConfigError, QcSection
from gateway.qc.book import QcBook
from gateway.qc.engine import QcEngine
from gateway.qc.gate import QcGate
from gateway.qc.result import QcResult
from gateway.qc.rules import load_rules
from gateway.qc.worker import QcWorker
from gateway.workpool import resolve_workers


class StudyRegistrar(Protocol):
    """What QC needs of the center's index registrar (``gateway.registration.IndexRegistrar``)."""

    qc_grade: Callable[[str], str | None]

    def study_ready(self, study_uid: str) -> bool: ...


@dataclass
class QcService:
    book: QcBook
    engine: QcEngine
    worker: QcWorker
    gate: QcGate

    @classmethod
    def open(cls, cfg: QcSection, archive: Archive) -> QcService:
        """Load the rules (and AI hook) and queue stored instances from now on; errors name
        ``qc.rules``."""
        try:
            rules = load_rules(cfg.rules)
        except ConfigError as exc:
            raise ArchiveUnavailable("qc.rules", "; ".join(exc.problems)) from exc
        try:
            engine = QcEngine(rules)
        except (ImportError, AttributeError, TypeError) as exc:
            raise ArchiveUnavailable("qc.rules", f"ai_hook {rules.ai_hook}: {exc}") from exc
        book = QcBook(archive.catalog, series_sample=rules.series_sample)
        book.install()
        worker = QcWorker(book, engine, archive.store, workers=resolve_workers(cfg.workers), processes=True)
        return cls(book, engine, worker, QcGate(book))

    def start(self) -> None:
        self.worker.start()

    def link_registrar(self, registrar: StudyRegistrar) -> None:
        """At the center: the index registration carries the study's grade, and a study is
        offered for registration again when its last queued instance is graded (R-CE-5)."""

        def grade(study_uid: str) -> str | None:
            study = self.book.study(study_uid)
            return study.grade.value if study is not None else None

        def graded(result: QcResult) -> None:
            if self.book.queued(result.study_uid) == 0:
                registrar.study_ready(result.study_uid)

        registrar.qc_grade = grade
        self.worker.on_graded = graded

    def stop(self) -> None:
        self.worker.stop()

    def study_json(self, study_uid: str, *, grade_now: bool = False) -> dict[str, Any] | None:
        """The study's QC as JSON, with ``pending_instances`` still to be graded (``grade_now``:
        first grade what is queued, for up to 10 s)."""
        pending = self.worker.grade_study(study_uid) if grade_now else self.book.queued(study_uid)
        study = self.book.study(study_uid)
        return {**study.to_json(), "pending_instances": pending} if study is not None else None
