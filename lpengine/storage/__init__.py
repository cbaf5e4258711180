"""Storage backends: turn local files into URLs the service can fetch (docs/storage.md)."""

from __future__ import annotations

from lpengine.client.api import DashScopeClient
from lpengine.config import (
    BatchConfig,
    DashScopeTempStorageConfig,
    FileServerStorageConfig,
    S3StorageConfig,
    Secrets,
    UrlStorageConfig,
)
from lpengine.storage.base import LocalFile, Published, Storage
from lpengine.storage.dashscope_temp import DashScopeTempStorage
from lpengine.storage.fileserver import FileServerStorage
from lpengine.storage.passthrough import PassThroughStorage

__all__ = [
    "DashScopeTempStorage",
    "FileServerStorage",
    "LocalFile",
    "PassThroughStorage",
    "Published",
    "Storage",
    "open_storage",
]


def open_storage(config: BatchConfig, client: DashScopeClient, secrets: Secrets) -> Storage:
    """The backend the config names (not yet entered: use `async with`)."""
    storage = config.storage
    if isinstance(storage, S3StorageConfig):
        from lpengine.storage.s3 import S3Storage  # aioboto3 is imported only by batches that use it

        return S3Storage(storage, secrets, verify_tls=config.api.verify_tls)
    if isinstance(storage, DashScopeTempStorageConfig):
        return DashScopeTempStorage(client, speedup=config.speedup)
    if isinstance(storage, UrlStorageConfig):
        return PassThroughStorage()
    assert isinstance(storage, FileServerStorageConfig)
    return FileServerStorage(storage)
