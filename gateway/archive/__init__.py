"""The archive core: a catalog (what we hold) and a blob store (the bytes), chosen by config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.archive.blobstore import BlobStore, FolderBlobStore
from gateway.archive.catalog import Catalog
from gateway.config import DatabaseSection, EncryptionSection, StorageSection

if TYPE_CHECKING:
    from gateway.archive.encrypted import DataKeys, EncryptedBlobStore
    from gateway.security.columns import ColumnCipher
    from gateway.security.kms import Kms


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


def open_kms(cfg: EncryptionSection, catalog: Catalog | None = None) -> Kms:
    """The configured KMS. The local key file is made on first use only while no object is sealed
    (a missing key file with sealed data is a mistake to report, not to paper over)."""
    from sqlalchemy import func, select

    from gateway.archive.schema import data_keys
    from gateway.security.kms import KmsError, LocalKms

    create = False
    if not cfg.key_file.exists() and catalog is not None:
        with catalog.engine.connect() as conn:
            sealed = conn.execute(select(func.count()).select_from(data_keys)).scalar_one()
        if sealed:
            raise KmsError(f"{cfg.key_file}: missing, but {sealed} stored objects are sealed under its keys")
        create = True
    return LocalKms(cfg.key_file, create=create)


def sealed_store(store: BlobStore, catalog: Catalog, cfg: EncryptionSection) -> EncryptedBlobStore:
    """``store`` behind envelope encryption with keys from the configured KMS (R-SE-10, R-SE-14)."""
    from gateway.archive.encrypted import DataKeys, EncryptedBlobStore

    keys = DataKeys(catalog, open_kms(cfg, catalog))
    sealed = EncryptedBlobStore(store, keys, cache_seconds=cfg.cache_seconds)
    sealed.check()
    return sealed


def column_cipher(catalog: Catalog, cfg: EncryptionSection, keys: DataKeys | None = None) -> ColumnCipher:
    """The sealed columns' cipher, on the same KMS and ``data_keys`` as the objects (R-SE-10); for
    tools that open only the catalog (``ybyx admin``), set it as ``catalog.columns`` when enabled."""
    from gateway.archive.encrypted import DataKeys
    from gateway.security.columns import ColumnCipher

    return ColumnCipher(keys or DataKeys(catalog, open_kms(cfg, catalog)), cache_seconds=cfg.cache_seconds)


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
    def open(
        cls,
        storage: StorageSection,
        database: DatabaseSection,
        *,
        outbox: bool = False,
        encryption: EncryptionSection | None = None,
    ) -> Archive:
        """Open both, or raise :class:`ArchiveUnavailable` naming the config key and the reason.

        With ``encryption.enabled`` the store seals every object (R-SE-10, issue 6 §5)."""
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
        if encryption is not None and encryption.enabled:
            try:
                store = sealed_store(store, catalog, encryption)
                catalog.columns = column_cipher(catalog, encryption, store.keys)
            except OSError as exc:
                catalog.close()
                raise ArchiveUnavailable("encryption.key_file", str(exc)) from exc
        return cls(catalog, store)

    def close(self) -> None:
        self.catalog.close()
