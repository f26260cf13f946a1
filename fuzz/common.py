"""What the atheris targets share: a throw-away archive, the invariants, seeds and the launcher."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import atheris

from gateway.archive.blobstore import FolderBlobStore
from gateway.archive.catalog import Catalog
from gateway.ingest import Accepted, Ingest, Refused
from tests.test_fuzz import STOW_TYPE, archive_state, instance

ROOT = Path(__file__).resolve().parents[1]
#: The refusal kinds the sender is told about (``storage`` would be our fault, never the input's).
SENDER_KINDS = frozenset({"malformed", "missing-attribute", "mismatch"})
#: Set to fail on the first refusal: proves that a broken invariant stops the run with the input saved.
CANARY = os.environ.get("YBYX_FUZZ_CANARY") == "1"
MAX_LEN = 8192


class Archive:
    """A catalog (SQLite) and a folder blob store in a temporary folder, with its ingest."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.catalog = Catalog.open(f"sqlite:///{work / 'catalog.db'}")
        self.store = FolderBlobStore(work / "blobs")
        self.ingest = Ingest(self.catalog, self.store, quarantine=work / "quarantine")
        self.spool = work / "spool"
        self.spool.mkdir(exist_ok=True)

    def state(self) -> tuple[set[str], set[str]]:
        return archive_state(self.catalog, self.store)

    def accept(self, path: Path, source: str) -> None:
        """Ingest ``path`` and check the invariants (see the package docstring)."""
        before = self.state()
        result = self.ingest.accept_file(path, source=source)
        assert isinstance(result, Accepted | Refused), f"accept_file returned {result!r}"
        if isinstance(result, Refused):
            assert not CANARY, f"canary: refused ({result.kind}): {result.reason}"
            assert result.reason.strip(), "a refusal without a reason"
            assert result.kind in SENDER_KINDS, f"refused as {result.kind!r}: {result.reason}"
            assert self.state() == before, "a refused input changed the catalog or the blob store"
        else:
            assert self.catalog.locate({"SOPInstanceUID": result.sop_uid}), "accepted but not catalogued"
        keys, held = self.state()
        assert keys == held, f"catalog and blob store differ: {sorted(keys ^ held)[:5]}"


def work_folder() -> Path:
    """``$YBYX_FUZZ_WORK`` (kept), else a temporary folder removed at exit."""
    given = os.environ.get("YBYX_FUZZ_WORK")
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        return path
    path = Path(tempfile.mkdtemp(prefix="ybyx-fuzz-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def stow_seed(content_type: str, parts: list[bytes], chunk: int = 7) -> bytes:
    """A :mod:`fuzz.stow` input: ``Content-Type`` line, one byte of chunk size, the body."""
    boundary = content_type.rsplit("boundary=", 1)[-1].strip('"')
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
        for p in parts
    )
    body += b"--" + boundary.encode() + b"--\r\n"
    return content_type.encode("latin-1") + b"\n" + bytes([chunk]) + body


def write_seeds(folder: Path, target: str) -> Path:
    """The seed corpus of ``target`` (``stow`` or ``cstore``) in ``folder``: the small instances of
    ``tests/test_fuzz.py`` and the first bytes of each demo sample (``gateway.sample``)."""
    from gateway.sample import write_samples

    folder.mkdir(parents=True, exist_ok=True)
    small = [instance(i) for i in range(3)]
    samples = folder.parent / f".{folder.name}-samples"
    write_samples(samples, ct_slices=1)
    heads = [p.read_bytes()[:MAX_LEN] for p in sorted(samples.rglob("*_0001.dcm"))]
    shutil.rmtree(samples, ignore_errors=True)
    if target == "cstore":
        seeds = small + heads
    else:
        seeds = [
            stow_seed(STOW_TYPE.format("b0undary"), small[:1]),
            stow_seed(STOW_TYPE.format('"a\'b(c)d+e_f,g-h.i/j:k=l?m n"'), small[1:], chunk=255),
            stow_seed("multipart/related; boundary=x", [small[2], heads[0][:2000]], chunk=1),
            stow_seed('multipart/related; type="application/dicom+json"; boundary=j', small[:1]),
            stow_seed("application/dicom", small[:1]),
        ]
    for i, seed in enumerate(seeds):
        (folder / f"seed-{i:02d}").write_bytes(seed)
    return folder


def run(target: str, one_input: Callable[[bytes], None], argv: list[str]) -> None:
    """Start libFuzzer: corpus dirs from ``argv`` (else a temporary copy of the seeds), inputs up to
    :data:`MAX_LEN` bytes unless ``-max_len`` is given."""
    logging.disable(logging.WARNING)  # every refusal logs a warning: thousands a second
    warnings.simplefilter("ignore")  # pydicom warns about every damaged value
    args = list(argv)
    if not any(not a.startswith("-") for a in args[1:]):
        args.append(str(write_seeds(work_folder() / "corpus", target)))
    if not any(a.startswith("-max_len=") for a in args):
        args.append(f"-max_len={MAX_LEN}")
    atheris.Setup(args, one_input)
    atheris.Fuzz()
