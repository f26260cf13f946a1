"""Exam-item code mapping (R-CE-4, R-CQ-4): each hospital's own exam-item codes → the insurance
exam-item codes (医保检查项目编码) that make "the same exam" comparable across hospitals (R-RT-2).

One TOML file per hospital in ``[doctor] codes_dir`` (``config/codes/*.toml``)::

    hospital = "H50010300001"
    [codes]
    "CT001" = "250301001"      # hospital code = insurance code

Codes met without a mapping (an order, or another hospital's record) are remembered and listed
for the administrator (``GET /api/v1/code-maps``).
"""

from __future__ import annotations

import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path


class CodeMapError(ValueError):
    """A code map file that cannot be used; the message names the file, the key and why."""


@dataclass
class CodeMap:
    maps: dict[str, dict[str, str]] = field(default_factory=dict)  # hospital → code → insurance
    _unmapped: set[tuple[str, str]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, folder: Path) -> CodeMap:
        """Every ``*.toml`` in ``folder`` (none, or no folder: an empty map)."""
        maps: dict[str, dict[str, str]] = {}
        for path in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError as exc:
                raise CodeMapError(f"{path}: (syntax): {exc}") from None
            hospital = data.get("hospital")
            if not isinstance(hospital, str) or not hospital:
                raise CodeMapError(f"{path}: hospital: the hospital's code is required")
            codes = data.get("codes", {})
            unknown = sorted(set(data) - {"hospital", "codes"})
            if unknown:
                raise CodeMapError(f"{path}: {unknown[0]}: unknown key")
            if not isinstance(codes, dict) or not all(
                isinstance(v, str) and v.strip() for v in codes.values()
            ):
                raise CodeMapError(f"{path}: codes: a table of hospital code = insurance code (text)")
            if hospital in maps:
                raise CodeMapError(f"{path}: hospital: {hospital} is mapped in another file too")
            maps[hospital] = {str(k).strip(): str(v).strip() for k, v in codes.items()}
        return cls(maps)

    def insurance(self, hospital: str, code: str) -> str | None:
        """The insurance code of a hospital's exam item, or None (remembered as unmapped)."""
        found = self.maps.get(hospital, {}).get(code)
        if found is None:
            with self._lock:
                self._unmapped.add((hospital, code))
        return found

    def unmapped(self) -> list[dict[str, str]]:
        with self._lock:
            return [{"hospital": h, "code": c} for h, c in sorted(self._unmapped)]
