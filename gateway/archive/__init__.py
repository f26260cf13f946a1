"""The archive core: a catalog (what we hold) and a blob store (the bytes), chosen by config."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.archive.blobstore import BlobStore, FolderBlobStore
from gateway.archive.catalog import Catalog
from gateway.config import DatabaseSection, StorageSection


def open_store(cfg: StorageSection) -> BlobStore:
    """The configured blob store, checked writable (raises OSError naming the reason)."""
    store: BlobStore
    if cfg.backend == "s3":
        from gateway.archive.s3 import S3BlobStore

        assert cfg.s3 is not None  # the config model requires it
        s3 = cfg.s3
        store = S3BlobStore(
            s3.endpoint,
            s3.access_key,
            s3.secret_key,
            s3.bucket,
            secure=s3.secure,
            region=s3.region,
            prefix=s3.prefix,
        )
    else:
        store = FolderBlobStore(cfg.path)
    store.check()
    return store


class ArchiveUnavailable(Exception):
    """The configured catalog or blob store cannot be used; ``key`` is the config key to fix."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


@dataclass
class Archive:
    catalog: Catalog
    store: BlobStore

    @classmethod
    def open(cls, storage: StorageSection, database: DatabaseSection, *, outbox: bool = False) -> Archive:
        """Open both, or raise :class:`ArchiveUnavailable` naming the config key and the reason."""
        from sqlalchemy.exc import SQLAlchemyError

        try:
            store = open_store(storage)
        except OSError as exc:
            raise ArchiveUnavailable("storage", " ".join(str(exc).split())) from exc
        try:
            catalog = Catalog.open(database.url, outbox=outbox)
        except (SQLAlchemyError, OSError) as exc:
            reason = " ".join(str(exc.__cause__ or exc).split())
            raise ArchiveUnavailable("database.url", f"cannot open the catalog: {reason}") from exc
        return cls(catalog, store)

    def close(self) -> None:
        self.catalog.close()
