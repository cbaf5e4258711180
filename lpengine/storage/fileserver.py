"""A loopback HTTP server that publishes exactly the batch's files behind an unguessable prefix.

Useful with the emulator (which runs on the same machine) or when the machine is reachable by the service through
a public address (`public_base_url`). It serves only files registered by `publish`, by content hash, so path
traversal and guessing get 404 whatever the request looks like.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Self

from aiohttp import web

from lpengine.config import FileServerStorageConfig
from lpengine.errors import StorageError
from lpengine.media import INLINE_IO_BYTES
from lpengine.storage.base import LocalFile, Published


def _read_if_small(path: Path) -> bytes | None:
    """Small files are read on the loop's thread (`INLINE_IO_BYTES`): FileResponse stats and opens every file
    through the default executor, two thread hand-offs per fetch (docs/benchmarks.md)."""
    if os.stat(path).st_size > INLINE_IO_BYTES:
        return None
    with open(path, "rb") as fh:
        return fh.read()


def _not_found() -> web.Response:
    """A fresh response each time: aiohttp prepares (and so binds) a response to the request it answers."""
    return web.Response(status=404, text="404: Not Found")


_CACHE_BYTES = 32 * 1024 * 1024
"""Bound on the bytes of small files kept in memory (the items in flight rarely come near it)."""


@dataclass(slots=True)
class _Served:
    path: Path
    content_type: str
    users: int = 0
    """Unfinished items that published this content (copies of one image share an entry)."""
    body: bytes | None = None
    """A small file's bytes, as checked (from `LocalFile.data`) or else after its first fetch: the service fetches
    each image twice (detect, synthesis) and the voice track once per task. Kept while the entry lives; the name is
    the content's hash, so the bytes are exactly what was checked even if the file changes on disk meanwhile."""


class FileServerStorage:
    name = "fileserver"
    durable = False  # URLs die with the process: never cache them across runs
    model_bound = False

    def __init__(self, config: FileServerStorageConfig) -> None:
        self._config = config
        self._prefix = secrets.token_urlsafe(24)
        self._files: dict[str, _Served] = {}
        self._cached_bytes = 0
        self._runner: web.ServerRunner | None = None
        self.base_url = ""

    async def __aenter__(self) -> Self:
        # aiohttp's low-level server: one route needs no application, router or middleware chain per fetch.
        self._runner = web.ServerRunner(web.Server(self._serve), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._config.host, self._config.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise StorageError(
                f"file server cannot bind {self._config.host}:{self._config.port} ({exc.strerror}); "
                "choose another storage.port"
            ) from None
        port = int(self._runner.addresses[0][1])
        root = self._config.public_base_url or f"http://{self._config.host}:{port}"
        self.base_url = f"{root.rstrip('/')}/{self._prefix}"
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _serve(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, text="405: Method Not Allowed", headers={"Allow": "GET, HEAD"})
        prefix, _, name = request.path[1:].partition("/")
        served = self._files.get(name) if prefix == self._prefix else None
        if served is None:
            return _not_found()
        body = served.body
        if body is None:
            try:
                body = _read_if_small(served.path)
            except OSError:
                return _not_found()
            if body is not None:
                self._keep(served, body)
        if body is not None:
            return web.Response(body=body, content_type=served.content_type)
        return web.FileResponse(served.path, headers={"Content-Type": served.content_type})

    async def publish(self, file: LocalFile, *, model: str, valid_for: timedelta) -> Published:
        name = f"{file.sha256}{file.suffix}"
        served = self._files.get(name)
        if served is None:
            served = self._files[name] = _Served(file.path, file.content_type)
            if file.data is not None:
                self._keep(served, file.data)  # the bytes that were checked: not even the first fetch reads the file
        served.users += 1
        return Published(url=f"{self.base_url}/{name}")

    def _keep(self, served: _Served, body: bytes) -> None:
        if self._cached_bytes + len(body) <= _CACHE_BYTES:
            served.body = body
            self._cached_bytes += len(body)

    def release(self, published: Published) -> None:
        """Serve a file only while an unfinished item uses it, so the table holds the items in flight, not the
        whole batch (it was the last per-item growth at 100k items)."""
        base, _, name = published.url.rpartition("/")
        served = self._files.get(name) if base == self.base_url else None
        if served is not None:
            served.users -= 1
            if served.users <= 0:
                del self._files[name]
                if served.body is not None:
                    self._cached_bytes -= len(served.body)

    async def cleanup(self, keys: list[str]) -> int:
        return 0

    async def probe(self) -> str:
        return f"file server listening, publishing under {self.base_url.rsplit('/', 1)[0]}/<secret prefix>"
