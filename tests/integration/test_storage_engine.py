"""Storage through the whole engine: S3 dedupe across runs, clean-up policy, and fail-fast misconfiguration."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lpengine import Engine, ItemState, StorageError, load_config
from lpengine.emulator import EmulatorSettings, run_emulator
from tests.helpers import write_batch
from tests.s3server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server, unique_bucket_name

pytestmark = pytest.mark.anyio

KEY = "sk-test-storage-0123456789"


@pytest.fixture
async def emulator() -> AsyncIterator[object]:
    async with run_emulator(EmulatorSettings(api_keys=[KEY], speedup=200.0, video="stub")) as emu:
        yield emu


@pytest.fixture(autouse=True)
def _credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OSS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", SECRET_ACCESS_KEY)


def s3_batch(tmp_path: Path, base_url: str, endpoint: str, bucket: str, cleanup: str, n: int = 4) -> Path:
    from lpengine.demo_assets import make_portraits

    make_portraits(tmp_path / "photos", n)
    storage = (
        f"\n  backend: s3\n  endpoint_url: {endpoint}\n  region: us-east-1\n  bucket: {bucket}"
        f"\n  addressing_style: path\n  cleanup: {cleanup}"
    )
    return write_batch(tmp_path, base_url, 200, storage=storage)


async def test_second_run_makes_zero_puts(tmp_path: Path, emulator: object, s3_server: S3Server) -> None:
    """Content-addressed keys + HEAD-before-PUT: a re-run (outputs removed, so it must publish again) PUTs nothing."""
    bucket = s3_server.create_bucket(unique_bucket_name())
    config = load_config(s3_batch(tmp_path, emulator.base_url, s3_server.endpoint_url, bucket, "never"))  # type: ignore[attr-defined]
    s3_server.reset_counts()
    async with Engine(config, api_key=KEY) as engine:
        first = await engine.run()
    assert all(r.state is ItemState.SUCCEEDED for r in first.items)
    assert s3_server.counts().get("PUT", 0) == 5  # 4 images + the shared audio, once
    # Fresh state and outputs: the second run has to publish every file again, and finds them all in the bucket.
    for path in (tmp_path / "out").iterdir():
        if path.is_file():
            path.unlink()
    (tmp_path / "out" / ".lpengine" / "state.db").unlink()
    s3_server.reset_counts()
    async with Engine(config, api_key=KEY) as engine:
        second = await engine.run()
    assert all(r.state is ItemState.SUCCEEDED for r in second.items)
    assert s3_server.counts().get("PUT", 0) == 0
    assert s3_server.counts().get("HEAD", 0) >= 5


async def test_cleanup_on_success_leaves_nothing_behind(tmp_path: Path, emulator: object, s3_server: S3Server) -> None:
    """`cleanup: on_success` deletes exactly the batch's objects; an unrelated object survives."""
    bucket = s3_server.create_bucket(unique_bucket_name())
    s3_server.put_object(bucket, "someone-else/keep.txt", b"not ours")
    config = load_config(s3_batch(tmp_path, emulator.base_url, s3_server.endpoint_url, bucket, "on_success"))  # type: ignore[attr-defined]
    async with Engine(config, api_key=KEY) as engine:
        report = await engine.run()
    assert report.ok
    assert s3_server.list_keys(bucket) == ["someone-else/keep.txt"]


async def test_misconfigured_storage_fails_before_any_paid_call(tmp_path: Path, emulator: object) -> None:
    """A missing bucket stops the run at start-up with one clear message; the service saw no request."""
    server_url = "http://127.0.0.1:9"  # discard port: nothing listens
    config = load_config(s3_batch(tmp_path, emulator.base_url, server_url, "nope", "never", n=1))  # type: ignore[attr-defined]
    with pytest.raises(StorageError) as info:
        async with Engine(config, api_key=KEY) as engine:
            await engine.run()
    assert "storage.endpoint_url" in str(info.value)
    assert SECRET_ACCESS_KEY not in str(info.value)
    assert sum(emulator.stats().requests.values()) == 0  # type: ignore[attr-defined]
