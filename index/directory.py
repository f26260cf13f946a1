"""The province directory of the national index: province code → its sharing center's base URL
(R-CE-7: "ask the national index for the study's location"). Credentials are not here: a center
calling another is a client registered in that center's client registry (issue 6 §1)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gateway.config import ProvinceEntry


@dataclass(frozen=True)
class Province:
    code: str
    name: str
    center_url: str


class Directory:
    """The provinces an index knows, from its config (``[[provinces]]``)."""

    def __init__(self, entries: Iterable[ProvinceEntry]) -> None:
        self._by_code = {e.code: Province(e.code, e.name, e.center_url.rstrip("/")) for e in entries}

    def __contains__(self, code: object) -> bool:
        return code in self._by_code

    def get(self, code: str) -> Province | None:
        return self._by_code.get(code)

    def all(self) -> list[Province]:
        return sorted(self._by_code.values(), key=lambda p: p.code)

    def center_url(self, code: str) -> str | None:
        p = self._by_code.get(code)
        return p.center_url if p else None
