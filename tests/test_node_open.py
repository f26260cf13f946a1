"""A node that fails while opening leaves nothing behind (gateway/node.py, issue 2 §3 "the command
stops with a reason"): no audit thread or helper process still running, the trail closed with a
stop record, the database free for the next start."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from gateway.audit import EventType, read_records
from gateway.ingest import Ingest
from gateway.node import NodeCore
from tests.conftest import frontend_config


def test_a_failure_after_the_audit_started_stops_everything_it_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = frontend_config(tmp_path)
    before = set(threading.enumerate())

    def disk_gone(self: Ingest) -> int:
        raise OSError("intake journal unreadable")

    monkeypatch.setattr(Ingest, "recover", disk_gone)
    with pytest.raises(OSError, match="intake journal unreadable"):
        NodeCore.open(cfg, role="frontend", node_id="test-frontend")

    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert left == [], f"still running after a failed open: {left}"

    engine = create_engine(cfg.database.url)
    try:
        kinds = [r.event_type for r in read_records(engine)]
    finally:
        engine.dispose()
    assert kinds[0] == EventType.APPLICATION_START.value
    assert kinds[-1] == EventType.APPLICATION_STOP.value  # the trail says the node stopped

    monkeypatch.undo()
    core = NodeCore.open(cfg, role="frontend", node_id="test-frontend")  # a clean second start
    core.close()
