"""The `url` backend: every input already has a public URL, so there is nothing to publish."""

from __future__ import annotations

from datetime import timedelta

from lpengine.errors import StorageError
from lpengine.storage.base import LocalFile, NothingToRelease, Published


class PassThroughStorage(NothingToRelease):
    name = "url"
    durable = False
    model_bound = False

    async def publish(self, file: LocalFile, *, model: str, valid_for: timedelta) -> Published:
        raise StorageError(
            f"{file.path}: storage backend `url` cannot publish local files; give an http(s) URL in the manifest "
            "or choose storage.backend: dashscope_temp, s3 or fileserver"
        )

    async def probe(self) -> str:
        return "pass-through: inputs must already be public URLs"
