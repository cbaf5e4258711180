"""The `url` backend: every input already has a public URL, so there is nothing to publish."""

from __future__ import annotations

from datetime import timedelta
from types import TracebackType
from typing import Self

from lpengine.errors import StorageError
from lpengine.storage.base import LocalFile, Published


class PassThroughStorage:
    name = "url"
    durable = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def publish(self, file: LocalFile, *, model: str, valid_for: timedelta) -> Published:
        raise StorageError(
            f"{file.path}: storage backend `url` cannot publish local files; give an http(s) URL in the manifest "
            "or choose storage.backend: dashscope_temp, s3 or fileserver"
        )

    async def cleanup(self, keys: list[str]) -> int:
        return 0

    async def probe(self) -> str:
        return "pass-through: inputs must already be public URLs"
