"""The one clock of a node's date rules (STYLE: "one clock, injectable"): wall time by default,
settable in tests and demos (cache jobs on the next day, retention, grant expiry)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class NodeClock:
    """Callable like ``datetime.now(UTC)``; :meth:`set` pins it, :meth:`advance` moves it."""

    def __init__(self, fixed: datetime | None = None) -> None:
        self._fixed = fixed

    def __call__(self) -> datetime:
        return self._fixed if self._fixed is not None else datetime.now(UTC)

    def set(self, at: datetime | None) -> None:
        """Pin the clock at ``at`` (aware), or back to wall time with None."""
        if at is not None and at.tzinfo is None:
            raise ValueError("the clock takes aware datetimes")
        self._fixed = at

    def advance(self, by: timedelta) -> datetime:
        self._fixed = self() + by
        return self._fixed
