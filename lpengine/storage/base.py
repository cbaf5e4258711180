"""The one interface every storage backend implements.

DashScope only takes inputs by URL, so a backend's job is to turn a local file into a URL the service can fetch,
for as long as the batch needs it. Backends are async context managers owned by the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

DETECT_MODEL = "liveportrait-detect"
SYNTHESIS_MODEL = "liveportrait"


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A checked local input: its bytes' hash decides object keys and dedupe."""

    path: Path
    sha256: str
    size: int
    content_type: str
    suffix: str  # normalised from the real format, e.g. ".png" for a PNG named .jpg
    data: bytes | None = field(default=None, repr=False, compare=False)
    """The checked bytes of a small file (see `lpengine.media.ImageInfo.data`); None: read `path` when needed."""


@dataclass(frozen=True, slots=True)
class Published:
    """Where the service can fetch a file, and what the batch created to get there."""

    url: str
    # True when the URL is an `oss://` temporary upload: calls carrying it need the resolve header (§8).
    needs_resolve_header: bool = False
    # Object key this batch created (for clean-up); None when nothing was created (dedupe hit, pass-through).
    created_key: str | None = None
    # How long (local seconds) the URL stays usable, for durable backends whose URLs a re-run may reuse.
    lifetime_s: float | None = None


class Storage(Protocol):
    """A place that publishes local files for the API."""

    name: str
    durable: bool
    """Its URLs outlive the process, so the state store may hand them to a re-run."""
    model_bound: bool
    """A published file works only with the model it was published for (DashScope temporary storage, §8)."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def publish(self, file: LocalFile, *, model: str, valid_for: timedelta) -> Published:
        """Make `file` fetchable by `model` for at least `valid_for`.

        Backends that are not model-bound ignore `model`. Raises `StorageError`.
        """
        ...

    async def cleanup(self, keys: list[str]) -> int:
        """Delete objects this batch created (never anything else); returns how many were deleted."""
        ...

    def release(self, published: Published) -> None:
        """The item that `published` was made for is finished and no task of it will fetch the file again, so a
        backend holding per-file state for the run may drop it (memory must not grow with the batch)."""
        ...

    async def probe(self) -> str:
        """Write, read back through the URL the API would get, and delete one probe object.

        Returns a one-line description of what was verified; raises `StorageError` with the fix.
        """
        ...


class NothingToRelease:
    """Lifecycle for backends that hold no connection or server of their own, and create nothing to clean up."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def cleanup(self, keys: list[str]) -> int:
        return 0

    def release(self, published: Published) -> None:
        return None
