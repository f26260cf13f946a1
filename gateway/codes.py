"""Exam-item code mapping (R-CE-4, R-CQ-4): each hospital's own exam-item codes → the insurance
exam-item codes (医保检查项目编码) that make "the same exam" comparable across hospitals (R-RT-2).

One TOML file per hospital in ``[doctor] codes_dir`` (``config/codes/*.toml``)::

    hospital = "H50010300001"
    [codes]
    "CT001" = "250301001"      # hospital code = insurance code

Codes met without a mapping (an order, or another hospital's record) are remembered and listed
for the administrator (``GET /api/v1/code-maps``, ``GET /api/v1/code-maps/unmapped``).

Edits over HTTP (``PUT``/``DELETE /api/v1/code-maps/{hospital}/{code}``, R-CE-4) are written back
to that hospital's TOML file, so the files stay the one source of truth: what an operator reads
(and reviews, versions, backs up with the config) is what the same-exam reminder uses, with no
second store overriding them. A write is atomic and durable before it is acknowledged (temp file
in the same folder, fsync, rename, fsync of the folder); the line of the code is replaced in place,
so the file's comments (the exam names) stay. The in-memory map changes only after the rename.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

#: A hospital's or the insurance's exam-item code: letters, digits, ``.``, ``_``, ``-`` (no quotes,
#: no spaces: a code goes into a TOML key unescaped).
CODE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$")

_TABLE_HEADER = re.compile(r"^\s*\[")
_KEY_LINE = re.compile(
    r"""^\s*(?:"(?P<dq>[^"\\]*)"|'(?P<sq>[^']*)'|(?P<bare>[A-Za-z0-9_-]+))\s*=\s*"""
    r"""(?:"[^"\\]*"|'[^']*')\s*(?P<comment>\#.*)?$"""
)


class CodeMapError(ValueError):
    """A code map file that cannot be used; the message names the file, the key and why."""


class UnknownHospital(LookupError):
    """No code map file for that hospital (and it is not this front-end's own)."""


@dataclass
class CodeMap:
    maps: dict[str, dict[str, str]] = field(default_factory=dict)  # hospital → code → insurance
    files: dict[str, Path] = field(default_factory=dict)  # hospital → its TOML file
    folder: Path | None = None
    _unmapped: set[tuple[str, str]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, folder: Path) -> CodeMap:
        """Every ``*.toml`` in ``folder`` (none, or no folder: an empty map)."""
        maps: dict[str, dict[str, str]] = {}
        files: dict[str, Path] = {}
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
            files[hospital] = path
        return cls(maps, files, folder)

    def insurance(self, hospital: str, code: str) -> str | None:
        """The insurance code of a hospital's exam item, or None (remembered as unmapped)."""
        found = self.maps.get(hospital, {}).get(code)
        if found is None:
            with self._lock:
                self._unmapped.add((hospital, code))
        return found

    def snapshot(self) -> dict[str, dict[str, str]]:
        """A copy of every map (edits replace a hospital's dict, never mutate a shared one)."""
        with self._lock:
            return {h: dict(codes) for h, codes in self.maps.items()}

    def unmapped(self, seen: set[tuple[str, str]] | None = None) -> list[dict[str, str]]:
        """Codes met (plus ``seen``, e.g. from exam records) that have no mapping now."""
        with self._lock:
            pairs = self._unmapped | (seen or set())
            return [{"hospital": h, "code": c} for h, c in sorted(pairs) if c not in self.maps.get(h, {})]

    # ---- edits (R-CE-4) ----------------------------------------------------------------------------

    def put(self, hospital: str, code: str, insurance: str, *, own: str = "") -> str | None:
        """Map ``code`` of ``hospital`` to ``insurance``, durably: the previous insurance code or
        None. ``own`` (this front-end's institution) may get its file created; any other hospital
        needs a map file already (:class:`UnknownHospital`)."""
        return self._edit(hospital, code, insurance, own=own)

    def delete(self, hospital: str, code: str, *, own: str = "") -> str | None:
        """Remove a mapping, durably: the insurance code it had, or None (there was none). The
        code is listed as unmapped from then on."""
        before = self._edit(hospital, code, None, own=own)
        if before is not None:
            with self._lock:
                self._unmapped.add((hospital, code))
        return before

    def _edit(self, hospital: str, code: str, insurance: str | None, *, own: str) -> str | None:
        with self._lock:  # one writer at a time: read-modify-write of the file
            path = self.files.get(hospital)
            if path is None:
                if hospital != own or self.folder is None:
                    raise UnknownHospital(hospital)
                path = self.folder / f"{hospital}.toml"
            current = dict(self.maps.get(hospital, {}))
            before = current.get(code)
            if insurance is None:
                if before is None:
                    return None
                del current[code]
            else:
                if before == insurance:
                    return before
                current[code] = insurance
            path.parent.mkdir(parents=True, exist_ok=True)
            text = path.read_text(encoding="utf-8") if path.exists() else ""
            _write_atomically(path, _edited(text, hospital, code, insurance, current))
            self.maps = {**self.maps, hospital: current}
            self.files = {**self.files, hospital: path}
            return before


def _key_of(m: re.Match[str]) -> str:
    return m.group("dq") if m.group("dq") is not None else m.group("sq") or m.group("bare") or ""


def _edited(text: str, hospital: str, code: str, insurance: str | None, want: dict[str, str]) -> str:
    """``text`` with the line of ``code`` replaced, removed or added in its ``[codes]`` table (the
    other lines and their comments as they were). If the result does not read back as exactly the
    wanted map (a layout this editor does not understand), the file is written anew."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.strip() == "[codes]"), None)
    if start is not None:
        end = next((i for i in range(start + 1, len(lines)) if _TABLE_HEADER.match(lines[i])), len(lines))
        new = f'"{code}" = "{insurance}"' if insurance is not None else None
        hit: int | None = None
        comment: str | None = None
        last = start
        for i in range(start + 1, end):
            m = _KEY_LINE.match(lines[i].rstrip("\r\n"))
            if m is None:
                continue
            last = i
            if _key_of(m) == code:
                hit, comment = i, m.group("comment")
        if hit is not None:
            if new is None:
                del lines[hit]
            else:
                lines[hit] = new + (f"   {comment}" if comment else "") + "\n"
        elif new is not None:
            if lines and not lines[last].endswith("\n"):
                lines[last] += "\n"
            lines.insert(last + 1, new + "\n")
        out = "".join(lines)
        try:
            data = tomllib.loads(out)
        except tomllib.TOMLDecodeError:
            data = {}
        if (
            data.get("hospital") == hospital
            and data.get("codes") == want
            and set(data) <= {"hospital", "codes"}
        ):
            return out
    body = "".join(f'"{k}" = "{v}"\n' for k, v in sorted(want.items()))
    return (
        "# Exam-item code map of one hospital (R-CE-4): its own codes = insurance exam-item codes.\n"
        f'hospital = "{hospital}"\n\n[codes]\n{body}'
    )


def _write_atomically(path: Path, text: str) -> None:
    """Durable before the caller acknowledges: temp file, fsync, rename over, fsync the folder."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
