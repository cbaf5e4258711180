"""The loopback file server serves a file exactly while an unfinished item uses it."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest

from lpengine.config import FileServerStorageConfig
from lpengine.storage.base import LocalFile, Published
from lpengine.storage.fileserver import FileServerStorage

pytestmark = pytest.mark.anyio


def _local(path: Path, body: bytes) -> LocalFile:
    path.write_bytes(body)
    return LocalFile(path, hashlib.sha256(body).hexdigest(), len(body), "image/png", ".png")


async def test_a_file_is_served_until_the_last_item_using_it_is_released(tmp_path: Path) -> None:
    body = b"\x89PNG\r\n\x1a\n" + bytes(64)
    first, copy = _local(tmp_path / "a.png", body), _local(tmp_path / "copy-of-a.png", body)
    hour = timedelta(hours=1)
    async with FileServerStorage(FileServerStorageConfig()) as files, aiohttp.ClientSession() as http:

        async def status(url: str) -> int:
            async with http.get(url) as resp:
                return resp.status

        one = await files.publish(first, model="liveportrait", valid_for=hour)
        two = await files.publish(copy, model="liveportrait", valid_for=hour)
        assert one.url == two.url  # same content, one entry with two users

        files.release(Published(url="http://elsewhere.example/x/" + one.url.rsplit("/", 1)[1]))  # not ours: ignored
        files.release(one)
        assert await status(one.url) == 200  # the copy's item still needs it
        async with http.get(one.url) as resp:
            assert await resp.read() == body

        files.release(two)
        assert await status(one.url) == 404
        files.release(two)  # a second release of a forgotten file is harmless
        assert await status(one.url) == 404


async def test_a_small_file_is_served_as_it_was_checked_even_if_it_changes_on_disk(tmp_path: Path) -> None:
    """The service fetches each image twice (detect, then synthesis): the second fetch gets the bytes whose hash
    names the URL, not whatever the file holds by then."""
    body = b"\x89PNG\r\n\x1a\n" + bytes(64)
    local = _local(tmp_path / "a.png", body)
    async with FileServerStorage(FileServerStorageConfig()) as files, aiohttp.ClientSession() as http:
        published = await files.publish(local, model="liveportrait", valid_for=timedelta(hours=1))
        async with http.get(published.url) as resp:
            assert await resp.read() == body
        local.path.write_bytes(b"edited meanwhile")
        async with http.get(published.url) as resp:
            assert await resp.read() == body
        files.release(published)
        async with http.get(published.url) as resp:
            assert resp.status == 404


async def test_checked_bytes_are_served_without_reading_the_file(tmp_path: Path) -> None:
    """A file published with the bytes the local checks read is served from them, first fetch included."""
    body = b"\x89PNG\r\n\x1a\n" + bytes(64)
    local = _local(tmp_path / "a.png", body)
    checked = LocalFile(local.path, local.sha256, local.size, local.content_type, local.suffix, data=body)
    local.path.unlink()  # any read of the file would now fail (404)
    async with FileServerStorage(FileServerStorageConfig()) as files, aiohttp.ClientSession() as http:
        published = await files.publish(checked, model="liveportrait", valid_for=timedelta(hours=1))
        async with http.get(published.url) as resp:
            assert resp.status == 200
            assert await resp.read() == body
        async with http.post(published.url) as resp:
            assert resp.status == 405  # publishing is read-only
