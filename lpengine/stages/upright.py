"""Upright copies of photos stored turned (EXIF Orientation), published in their place.

Every phone stores the sensor's pixels plus an Orientation tag that viewers apply. Whether the service applies it is
not documented, and a face lying on its side is a paid "No human face detected.", so what is published is the picture
the user sees: the pixels turned upright, without the tag (`lpengine.media.upright_image`). A photo without the tag
(or with Orientation 1) is published byte for byte as it is.

The item keeps its identity from the file as stored (its content hash): an item finished before copies existed stays
finished and is not paid again. What is sent, and so the face verdict and the published object, is known by the
copy's own hash.

A copy is a file, not bytes held in memory: every storage backend publishes a `LocalFile` by its path (S3 reads it
again and checks its hash; the file server serves it for as long as the item runs), and a batch of 3 MB phone photos
would otherwise hold megabytes per item in flight. Copies live in one folder per run, each deleted when the last
item using it finishes; the folder goes when the run ends, and a killed run's folder is swept by the next run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import anyio

from lpengine.config import BatchConfig
from lpengine.locks import KeyedLocks
from lpengine.media import INLINE_IO_BYTES, upright_image
from lpengine.storage.base import LocalFile


def upright_folder(config: BatchConfig) -> Path:
    """Where runs of the batch keep their copies, one subfolder each."""
    return config.output_dir / ".lpengine" / "upright"


@dataclass(slots=True)
class _Copy:
    file: LocalFile
    users: int = 0


class UprightCopies:
    """This run's upright copies, one per content however many items use it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._copies: dict[str, _Copy] = {}
        """By the hash of the file as stored."""
        self._locks: KeyedLocks[str] = KeyedLocks()
        # Decoding a 12 MP photo takes ~0.1 s of CPU and ~70 MB while it is turned: a few at a time, not one per
        # upload worker.
        self._limiter = anyio.CapacityLimiter(max(1, min(4, os.cpu_count() or 1)))

    async def take(self, image: LocalFile) -> LocalFile:
        """The upright copy of `image`, made (in a worker thread) unless an unfinished item already made it.
        Raises `MediaError` when the pixels cannot be decoded or the copy is over the size limit; OSError when it
        cannot be written."""
        async with self._locks.hold(image.sha256):
            copy = self._copies.get(image.sha256)
            if copy is None:
                made = await anyio.to_thread.run_sync(self._write, image, limiter=self._limiter)
                copy = self._copies[image.sha256] = _Copy(made)
            copy.users += 1
            return copy.file

    def release(self, image: LocalFile) -> None:
        """An item using the copy of `image` finished: the last one deletes it."""
        copy = self._copies.get(image.sha256)
        if copy is None:
            return
        copy.users -= 1
        if copy.users <= 0:
            del self._copies[image.sha256]
            copy.file.path.unlink(missing_ok=True)

    def close(self) -> None:
        """The run is over (or stopped): no copy is needed any more."""
        self._copies.clear()
        shutil.rmtree(self.folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # left while another worker's run (PostgreSQL state) has copies in it
            self.folder.parent.rmdir()

    def _write(self, image: LocalFile) -> LocalFile:
        data = upright_image(image.path, image.sha256, image.data)
        self.folder.mkdir(parents=True, exist_ok=True)
        # Named by the stored file's hash: two photos whose copies happen to be equal still own a file each.
        path = self.folder / f"{image.sha256}{image.suffix}"
        path.write_bytes(data)
        kept = data if len(data) <= INLINE_IO_BYTES else None
        return LocalFile(path, hashlib.sha256(data).hexdigest(), len(data), image.content_type, image.suffix, kept)
