"""QC at the forward path (R-QC-1): what the front-end's forwarder may send, and what travels along.

The forwarder asks :meth:`QcGate.check` before sending a study: it waits while instances are
still being graded (their headers, then the pixel sample of each sampled series: the study has
settled, so its series are complete), holds the study while it has a reject no passing instance
has replaced yet (the hospital sees it at ``GET /api/v1/qc/failures``), and otherwise sends everything but the
replaced rejects, which are never sent. With the manifest it sends :meth:`QcGate.report` (the
front-end's own study QC, so the center knows what the hospital saw), and stores the QC the center
answers with in its upload-monitoring record (:meth:`QcGate.received`, R-CE-5).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from gateway.qc.book import QcBook

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hold:
    """The gate's answer for a study: ``reason`` set = not now; else send all but ``exclude``."""

    reason: str = ""
    exclude: frozenset[str] = field(default_factory=frozenset)
    retry_seconds: float = 1.0  # when to ask again (a replacement re-queues the study anyway)


class QcGate:
    def __init__(self, book: QcBook) -> None:
        self.book = book

    def check(self, study_uid: str) -> Hold:
        ungraded = self.book.ungraded(study_uid)
        if ungraded:
            return Hold(f"waiting for QC of {ungraded} instances")
        # every header is graded: the sampled series get their pixel measures now
        self.book.queue_samples(study_uid)
        sampling = self.book.queued(study_uid)
        if sampling:
            return Hold(f"waiting for QC pixel measures of {sampling} sampled instances")
        open_rejects, replaced = self.book.rejects(study_uid)
        if open_rejects:
            return Hold(
                f"held by QC: {len(open_rejects)} instances graded 废 (reject) wait for a replacement "
                "(GET /api/v1/qc/failures)",
                retry_seconds=5.0,
            )
        return Hold(exclude=frozenset(replaced))

    def report(self, study_uid: str) -> dict[str, Any] | None:
        """The front-end's QC of what it sends (replaced rejects left out)."""
        study = self.book.study(study_uid)
        return study.to_json() if study is not None else None

    def received(self, study_uid: str, record: dict[str, Any]) -> None:
        """The center's upload-monitoring record came back: keep its QC (R-CE-5)."""
        qc = record.get("qc")
        if isinstance(qc, dict) and qc.get("grade"):
            try:
                self.book.save_report(study_uid, "center", qc)
            except ValueError as exc:  # a grade we do not know: keep going, say so
                log.warning("study %s: the center's QC report was not understood: %s", study_uid, exc)
