"""The blob store: where the bytes of every stored object live (the Orthanc "storage area").

Two backends behind one interface, chosen by config (``[storage] backend``):

* :class:`FolderBlobStore` — the embedded default; one file per object below a root folder.
  Streams go to a temporary name in the same folder, are fsynced, then renamed into place, so a
  crash never leaves a half-written object under its real key. Received files (``put_file``) are
  complete before they are hard-linked under their key, then fsynced (with their folder, on file
  systems where the file's fsync does not carry its new names: see :data:`NAMES_WITH_FILE`).
* :class:`gateway.archive.s3.S3BlobStore` — production (MinIO; SeaweedFS in tests).

Every ``put`` returns ``(size, sha256)`` of what was written; the catalog keeps both and every
later copy is checked against them (ARCHITECTURE "the data path").
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

CHUNK = 1 << 20


class BlobNotFound(KeyError):
    """No object is stored under this key."""


class BlobStore(Protocol):
    """What the archive needs of a storage area."""

    def put(self, key: str, stream: BinaryIO) -> tuple[int, str]:
        """Store everything readable from ``stream`` under ``key``; return (size, sha256 hex)."""
        ...

    def put_file(self, key: str, path: Path, *, known: tuple[int, str] | None = None) -> tuple[int, str]:
        """Store the file at ``path`` under ``key`` (may hard-link it); return (size, sha256).

        ``known`` is the (size, sha256) the caller already computed, so the file is not hashed twice.
        """
        ...

    def get(self, key: str) -> Iterator[bytes]:
        """The object's bytes, in chunks. Raises :class:`BlobNotFound`."""
        ...

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer at the end of the object)."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error."""
        ...

    def check(self) -> None:
        """Raise ``OSError`` with a reason if the store cannot be written (used at start)."""
        ...


def sha256_file(path: Path) -> tuple[int, str]:
    """Size and SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux/glibc: no early write-back, fsync does it all
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start write-out of the dirty pages; do not wait (linux/fs.h)


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing the file ``fd``'s data to disk now, without waiting for it.

    Not a durability step (:meth:`FolderBlobStore.put_file`'s fsync is): it lets the disk work
    while the header is checked and the record built, so that the fsync finds the data mostly
    written (~0.3 ms less per 526 KB CT slice, measured). Linux only; elsewhere a no-op.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# File systems whose fsync of a file also makes durable every change to the metadata made before
# it — the file's new names included: ext4's fsync commits the journal transaction holding them
# (transactions commit in order); XFS forces its log up to the file's last change, which follows
# them. Elsewhere the folders are fsynced too, as POSIX alone requires.
NAMES_WITH_FILE = frozenset({"ext4", "ext3", "xfs"})


def file_system_type(path: Path) -> str:
    """The type of the file system holding ``path`` (``/proc/self/mounts``); "" if unknown."""
    try:
        target = os.path.realpath(path)
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as fh:
            mounts = [line.split() for line in fh]
    except OSError:
        return ""
    best, found = -1, ""
    for fields in mounts:
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > best:
            best, found = len(point), fields[2]
    return found


class FolderBlobStore:
    """Objects as files below ``root``; the key is the relative path."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # whether put_file's fsync of the linked file makes its new names durable (one flush
        # per received instance instead of two or three); otherwise the folders are fsynced
        self.names_with_file = file_system_type(self.root) in NAMES_WITH_FILE

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"invalid blob key {key!r}")
        return self.root / key

    def _tmp_path(self, final: Path) -> Path:
        return final.with_name(f".{final.name}.{uuid.uuid4().hex}.part")

    def put(self, key: str, stream: BinaryIO) -> tuple[int, str]:
        final = self._path(key)
        made = self._make_parents(final)
        tmp = self._tmp_path(final)
        digest = hashlib.sha256()
        size = 0
        try:
            with tmp.open("wb") as out:
                while chunk := stream.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)
        for folder in made:
            _fsync_dir(folder.parent)
        return size, digest.hexdigest()

    def put_file(
        self, key: str, path: Path, *, known: tuple[int, str] | None = None, also_link: Path | None = None
    ) -> tuple[int, str]:
        """Hard-link the file into place without copying the bytes, then make it durable: the
        file (its data and the new link, one journal commit on ext4/XFS) and, on other file
        systems, its folder.

        ``also_link``: one more name for the file, made durable with it (the ingest intake
        journal, :mod:`gateway.intake`: a record that the instance still needs its catalog row
        made durable). It must be on this store's file system.

        The spool sits inside the store root (same file system), so a link is enough; the caller
        may then delete its own name for the file. Falls back to a copy across devices. Keys are
        content-addressed by the archive, so an existing object under ``key`` holds these bytes
        already; otherwise the file replaces it atomically.
        """
        final = self._path(key)
        made = self._make_parents(final)
        size, sha = known or sha256_file(path)
        # Linked before the fsync: the fsync then also carries the new name to disk in the same
        # journal commit, and the folder's fsync finds nothing left to commit (measured with two
        # associations: ~8% more instances/s than fsync, link, fsync of the folder). A crash before
        # the fsyncs leaves a name without a catalog row (never acknowledged); a retry replaces it.
        try:
            os.link(path, final)
        except FileExistsError:
            tmp = self._tmp_path(final)
            os.link(path, tmp)
            os.replace(tmp, final)
        except OSError:
            if also_link is not None:
                raise  # the journal's name must be a link to the stored file: no copy
            with path.open("rb") as src:
                return self.put(key, src)
        if also_link is not None:
            os.link(path, also_link)
        fd = os.open(final, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if not self.names_with_file:
            _fsync_dir(final.parent)
            for folder in made:  # a new folder's entry lives in its parent: make that durable too
                _fsync_dir(folder.parent)
            if also_link is not None:
                _fsync_dir(also_link.parent)
        return size, sha

    def _make_parents(self, final: Path) -> list[Path]:
        """Create the missing folders above ``final``; the ones created, deepest first."""
        made: list[Path] = []
        folder = final.parent
        while not folder.is_dir() and folder != self.root:
            made.append(folder)
            folder = folder.parent
        final.parent.mkdir(parents=True, exist_ok=True)
        return made

    def get(self, key: str) -> Iterator[bytes]:
        path = self._path(key)
        try:
            fh = path.open("rb")
        except FileNotFoundError:
            raise BlobNotFound(key) from None
        return _chunks(fh)

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        try:
            with self._path(key).open("rb") as fh:
                fh.seek(offset)
                return fh.read(length)
        except FileNotFoundError:
            raise BlobNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def local_path(self, key: str) -> Path:
        """The file behind a key (folder backend only; used to hand files to local tools)."""
        return self._path(key)

    def check(self) -> None:
        probe = self.root / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
        if shutil.disk_usage(self.root).free < 64 * CHUNK:
            raise OSError(f"{self.root}: less than 64 MiB free")


def _chunks(fh: BinaryIO) -> Iterator[bytes]:
    with fh:
        while chunk := fh.read(CHUNK):
            yield chunk
