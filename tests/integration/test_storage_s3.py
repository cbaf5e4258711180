"""S3Storage against a real S3 server (moto on 127.0.0.1), with an aiohttp fake only for OSS refusals."""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import anyio
import botocore.retries.standard
import pytest
import yarl
from aiohttp import web
from pydantic import SecretStr

from lpengine.config import S3StorageConfig, Secrets
from lpengine.errors import StorageError
from lpengine.storage.base import DETECT_MODEL, SYNTHESIS_MODEL, LocalFile, Storage
from lpengine.storage.s3 import MAX_URL_LIFETIME, S3Storage
from tests.s3server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server, unique_bucket_name

pytestmark = pytest.mark.anyio

SECRETS = Secrets(
    oss_access_key_id=SecretStr(ACCESS_KEY_ID),
    oss_access_key_secret=SecretStr(SECRET_ACCESS_KEY),
)
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64
CREDENTIALS_REJECTED = "storage credentials rejected: check OSS_ACCESS_KEY_ID / OSS_ACCESS_KEY_SECRET"
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(4000)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def no_retry_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's standard retries keep their attempt count but stop sleeping: failure tests take no time."""
    monkeypatch.setattr(botocore.retries.standard.ExponentialBackoff, "delay_amount", lambda self, ctx: 0)


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    name = s3_server.create_bucket(unique_bucket_name())
    s3_server.reset_counts()
    return name


def s3_config(endpoint_url: str, bucket: str, **overrides: Any) -> S3StorageConfig:
    # moto on 127.0.0.1 cannot do virtual-hosted addressing (bucket.127.0.0.1 does not resolve); OSS needs it.
    fields: dict[str, Any] = {
        "bucket": bucket,
        "endpoint_url": endpoint_url,
        "region": "us-east-1",
        "addressing_style": "path",
    }
    return S3StorageConfig(**(fields | overrides))


def local_file(folder: Path, data: bytes, name: str, content_type: str) -> LocalFile:
    path = folder / name
    path.write_bytes(data)
    return LocalFile(
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        content_type=content_type,
        suffix=path.suffix,
    )


async def fetch(url: str) -> tuple[int, bytes]:
    """GET a presigned URL the way a remote fetcher would: over HTTP, without re-quoting the signed query."""
    async with aiohttp.ClientSession() as session, session.get(yarl.URL(url, encoded=True)) as resp:
        return resp.status, await resp.read()


def exception_texts(exc: BaseException) -> Iterator[str]:
    """Every string a traceback could show for `exc`, its causes and contexts included."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield str(current)
        yield repr(current)
        yield from (str(arg) for arg in current.args)
        current = current.__cause__ or current.__context__


def assert_no_secret(exc: BaseException) -> None:
    for text in exception_texts(exc):
        assert SECRET_ACCESS_KEY not in text
    assert ACCESS_KEY_ID not in str(exc)


# -- publishing ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signature_version", ["s3v4", "s3"])
async def test_publish_uploads_once_and_presigned_url_serves_exact_bytes(
    s3_server: S3Server, bucket: str, tmp_path: Path, signature_version: str
) -> None:
    """The presigned URL, fetched over HTTP, returns the uploaded bytes; the PUT had no streaming checksum."""
    image = local_file(tmp_path, PNG, "face.jpg", "image/png")
    config = s3_config(s3_server.endpoint_url, bucket, signature_version=signature_version)
    async with S3Storage(config, SECRETS) as storage:
        published = await storage.publish(image, model=DETECT_MODEL, valid_for=timedelta(hours=2))

    key = f"lpengine/{image.sha256[:2]}/{image.sha256}.jpg"
    assert published.created_key == key
    assert not published.needs_resolve_header
    assert await fetch(published.url) == (200, PNG)
    assert s3_server.list_keys(bucket) == [key]
    assert s3_server.client().head_object(Bucket=bucket, Key=key)["ContentType"] == "image/png"

    [put] = [r for r in s3_server.requests() if r.operation == "PutObject"]
    assert put.key == key
    assert "content-md5" in put.headers
    assert "aws-chunked" not in put.headers.get("content-encoding", "")
    assert not [h for h in put.headers if h.startswith("x-amz-checksum") or h.endswith("checksum-algorithm")]
    assert "STREAMING" not in put.headers.get("x-amz-content-sha256", "")


async def test_second_run_finds_the_object_and_puts_nothing(s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    """A new storage (a rerun) HEADs once, uploads nothing, reports nothing created; its URL still works."""
    audio = local_file(tmp_path, WAV, "voice.wav", "audio/wav")
    config = s3_config(s3_server.endpoint_url, bucket)
    async with S3Storage(config, SECRETS) as storage:
        first = await storage.publish(audio, model=SYNTHESIS_MODEL, valid_for=timedelta(hours=1))
    assert first.created_key is not None
    s3_server.reset_counts()

    async with S3Storage(config, SECRETS) as storage:
        again = await storage.publish(audio, model=SYNTHESIS_MODEL, valid_for=timedelta(hours=1))
        once_more = await storage.publish(audio, model=DETECT_MODEL, valid_for=timedelta(hours=1))

    counts = s3_server.counts()
    assert counts["PUT"] == 0
    assert counts["HEAD"] == 1  # the second publish of the same audio is answered from memory
    assert again.created_key is None
    assert once_more.created_key is None
    assert await fetch(again.url) == (200, WAV)


async def test_concurrent_publishes_of_one_file_upload_it_once(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """Twenty items sharing one audio track at once: one HEAD, one PUT, exactly one caller owns the key."""
    audio = local_file(tmp_path, WAV, "voice.wav", "audio/wav")
    results = []
    async with S3Storage(s3_config(s3_server.endpoint_url, bucket), SECRETS) as storage:

        async def publish() -> None:
            results.append(await storage.publish(audio, model=SYNTHESIS_MODEL, valid_for=timedelta(hours=1)))

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(publish)

    counts = s3_server.counts()
    assert (counts["HEAD"], counts["PUT"]) == (1, 1)
    assert len([r for r in results if r.created_key is not None]) == 1


async def test_publish_refuses_a_file_changed_since_it_was_hashed(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """A content-addressed key must never hold other bytes than its hash names."""
    image = local_file(tmp_path, PNG, "face.png", "image/png")
    image.path.write_bytes(PNG[:-1] + b"\x00")
    async with S3Storage(s3_config(s3_server.endpoint_url, bucket), SECRETS) as storage:
        with pytest.raises(StorageError, match="changed since it was checked"):
            await storage.publish(image, model=DETECT_MODEL, valid_for=timedelta(hours=1))
    assert s3_server.counts()["PUT"] == 0


@pytest.mark.parametrize(
    ("valid_for", "margin_s", "expected_s"),
    [
        (timedelta(hours=2), 3600.0, 3 * 3600),
        (timedelta(minutes=10), 0.0, 600),
        (timedelta(days=30), 3600.0, int(MAX_URL_LIFETIME.total_seconds())),
    ],
)
async def test_presigned_v4_url_lives_exactly_as_long_as_needed_plus_margin(
    s3_server: S3Server, bucket: str, tmp_path: Path, valid_for: timedelta, margin_s: float, expected_s: int
) -> None:
    """X-Amz-Expires is valid_for + url_margin_s, capped at the 7-day V4 limit."""
    image = local_file(tmp_path, PNG, "face.png", "image/png")
    config = s3_config(s3_server.endpoint_url, bucket, url_margin_s=margin_s)
    async with S3Storage(config, SECRETS) as storage:
        published = await storage.publish(image, model=DETECT_MODEL, valid_for=valid_for)
    query = parse_qs(urlsplit(published.url).query)
    assert int(query["X-Amz-Expires"][0]) == expected_s


async def test_presigned_v2_url_expires_no_later_than_needed_plus_margin(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """SigV2 (OSS's documented boto3 fallback) carries an absolute Expires at most valid_for + margin ahead."""
    image = local_file(tmp_path, PNG, "face.png", "image/png")
    config = s3_config(s3_server.endpoint_url, bucket, signature_version="s3", url_margin_s=600)
    async with S3Storage(config, SECRETS) as storage:
        before = time.time()
        published = await storage.publish(image, model=DETECT_MODEL, valid_for=timedelta(hours=1))
        after = time.time()
    expires = int(parse_qs(urlsplit(published.url).query)["Expires"][0])
    assert int(before) + 4200 <= expires <= after + 4200


# -- cleanup and probe ---------------------------------------------------------------------------------------


async def test_cleanup_deletes_exactly_the_given_keys(s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    """Unrelated objects, even under the same prefix, survive; nothing is listed; deleted keys upload anew."""
    image = local_file(tmp_path, PNG, "face.png", "image/png")
    audio = local_file(tmp_path, WAV, "voice.wav", "audio/wav")
    s3_server.put_object(bucket, "lpengine/zz/someone-elses.png", b"keep me")
    s3_server.put_object(bucket, "other/file.txt", b"keep me too")
    async with S3Storage(s3_config(s3_server.endpoint_url, bucket), SECRETS) as storage:
        first = await storage.publish(image, model=DETECT_MODEL, valid_for=timedelta(hours=1))
        second = await storage.publish(audio, model=SYNTHESIS_MODEL, valid_for=timedelta(hours=1))
        assert first.created_key and second.created_key
        s3_server.reset_counts()

        assert await storage.cleanup([first.created_key, first.created_key]) == 1

        counts = s3_server.counts()
        assert counts["DELETE"] == 1
        assert not [op for op in counts if op.startswith("List") or op == "DeleteObjects"]
        assert s3_server.list_keys(bucket) == sorted(
            [second.created_key, "lpengine/zz/someone-elses.png", "other/file.txt"]
        )
        republished = await storage.publish(image, model=DETECT_MODEL, valid_for=timedelta(hours=1))
        assert republished.created_key == first.created_key
        assert await storage.cleanup([]) == 0


async def test_cleanup_refuses_keys_outside_the_prefix(s3_server: S3Server, bucket: str) -> None:
    """A key outside storage.prefix stops the whole clean-up before any delete."""
    s3_server.put_object(bucket, "lpengine/aa/mine.png", b"x")
    s3_server.put_object(bucket, "photos/precious.jpg", b"y")
    async with S3Storage(s3_config(s3_server.endpoint_url, bucket), SECRETS) as storage:
        s3_server.reset_counts()
        with pytest.raises(StorageError, match=r"outside storage.prefix 'lpengine/'.*nothing was deleted"):
            await storage.cleanup(["lpengine/aa/mine.png", "photos/precious.jpg"])
    assert s3_server.counts()["DELETE"] == 0
    assert s3_server.list_keys(bucket) == ["lpengine/aa/mine.png", "photos/precious.jpg"]


async def test_probe_writes_fetches_through_presigned_url_and_deletes(s3_server: S3Server, bucket: str) -> None:
    """The probe leaves the bucket as it found it and says what it verified."""
    async with S3Storage(s3_config(s3_server.endpoint_url, bucket), SECRETS) as storage:
        s3_server.reset_counts()
        description = await storage.probe()
    assert description.startswith(f"s3: bucket {bucket} at {s3_server.endpoint_url}: wrote, fetched")
    assert "127.0.0.1 is not reachable from DashScope" in description
    assert "\n" not in description
    counts = s3_server.counts()
    assert (counts["PUT"], counts["GET"], counts["DELETE"]) == (1, 1, 1)
    assert s3_server.list_keys(bucket) == []


async def test_s3storage_satisfies_the_storage_protocol(s3_server: S3Server, bucket: str) -> None:
    """The engine holds backends as `Storage`; mypy checks this assignment too."""
    storage: Storage = S3Storage(s3_config(s3_server.endpoint_url, bucket), SECRETS)
    assert storage.name == "s3"


# -- fail fast at start-up ----------------------------------------------------------------------------------------


async def test_unreachable_endpoint_names_the_setting() -> None:
    """Connection refused on 127.0.0.1 (a bound, non-listening port) → check storage.endpoint_url."""
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{reserved.getsockname()[1]}"
        with pytest.raises(StorageError) as caught:
            async with S3Storage(s3_config(endpoint, "some-bucket"), SECRETS):
                pass
    assert str(caught.value) == f"cannot reach storage endpoint {endpoint}: check storage.endpoint_url"
    assert not caught.value.is_retryable
    assert_no_secret(caught.value)


async def test_missing_bucket_names_the_setting(s3_server: S3Server) -> None:
    """HeadBucket 404 → the bucket and endpoint are named."""
    name = unique_bucket_name("lpengine-missing")
    with pytest.raises(StorageError) as caught:
        async with S3Storage(s3_config(s3_server.endpoint_url, name), SECRETS):
            pass
    assert str(caught.value) == (
        f"bucket {name} does not exist at {s3_server.endpoint_url}: create it or fix storage.bucket"
    )
    assert_no_secret(caught.value)


@pytest.mark.parametrize(
    "secrets",
    [
        Secrets(),
        Secrets(oss_access_key_id=SecretStr(ACCESS_KEY_ID)),
        Secrets(oss_access_key_id=SecretStr(""), oss_access_key_secret=SecretStr(SECRET_ACCESS_KEY)),
    ],
)
async def test_missing_credentials_are_reported_before_any_request(s3_server: S3Server, secrets: Secrets) -> None:
    """No fallback to ~/.aws or instance metadata: missing OSS keys are a clear error, and nothing is sent."""
    s3_server.reset_counts()
    with pytest.raises(StorageError, match="OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET") as caught:
        async with S3Storage(s3_config(s3_server.endpoint_url, "any-bucket"), secrets):
            pass
    assert s3_server.requests() == []
    assert_no_secret(caught.value)


class FakeOSS:
    """An aiohttp server on 127.0.0.1 answering like OSS refusing a request: the edge moto cannot play."""

    def __init__(self, respond: Callable[[web.Request], web.Response]) -> None:
        self.respond = respond
        self.seen: list[tuple[str, str]] = []
        self.endpoint_url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.path))
        return self.respond(request)

    async def serve(self) -> AsyncIterator[FakeOSS]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        self.endpoint_url = f"http://127.0.0.1:{port}"
        try:
            yield self
        finally:
            await runner.cleanup()


def oss_error(status: int, code: str, message: str) -> Callable[[web.Request], web.Response]:
    """OSS's XML error body; HEAD answers carry only the status, as on the real service."""

    def respond(request: web.Request) -> web.Response:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error>\n'
            f"  <Code>{code}</Code>\n  <Message>{message}</Message>\n"
            "  <RequestId>6763A9D1E0E5B83537C0A7F2</RequestId>\n  <HostId>127.0.0.1</HostId>\n"
            "  <EC>0003-00000001</EC>\n</Error>\n"
        )
        if request.method == "HEAD":
            return web.Response(status=status)
        return web.Response(status=status, body=body.encode(), content_type="application/xml")

    return respond


@pytest.fixture
async def fake_oss(request: pytest.FixtureRequest) -> AsyncIterator[FakeOSS]:
    async for fake in FakeOSS(request.param).serve():
        yield fake


@pytest.mark.parametrize(
    ("fake_oss", "expected"),
    [
        (
            oss_error(403, "SecondLevelDomainForbidden", "Please use virtual hosted style to access."),
            "this store refuses path-style addressing: set storage.addressing_style: virtual",
        ),
        (
            oss_error(403, "InvalidAccessKeyId", f"The OSS Access Key Id does not exist: {ACCESS_KEY_ID}"),
            f"{CREDENTIALS_REJECTED} (InvalidAccessKeyId)",
        ),
        (
            oss_error(403, "SignatureDoesNotMatch", "The request signature we calculated does not match."),
            f"{CREDENTIALS_REJECTED} (SignatureDoesNotMatch)",
        ),
        (
            oss_error(404, "NoSuchBucket", "The specified bucket does not exist."),
            "bucket wanted-bucket does not exist at {endpoint}: create it or fix storage.bucket",
        ),
    ],
    indirect=["fake_oss"],
    ids=["path-style-refused", "bad-key-id", "bad-secret", "no-such-bucket"],
)
async def test_refusals_at_start_up_name_the_setting_to_fix(fake_oss: FakeOSS, expected: str) -> None:
    """A 403 on HeadBucket says only "403", so the GET that follows reveals the code behind it."""
    config = s3_config(fake_oss.endpoint_url, "wanted-bucket")
    with pytest.raises(StorageError) as caught:
        async with S3Storage(config, SECRETS):
            pass
    assert str(caught.value) == expected.format(endpoint=fake_oss.endpoint_url)
    assert not caught.value.is_retryable
    assert_no_secret(caught.value)
    assert fake_oss.seen[0] == ("HEAD", "/wanted-bucket")


def head_bucket_forbidden_objects_readable(request: web.Request) -> web.Response:
    """A least-privilege RAM key: no HeadBucket, but GetObject works (a missing key answers NoSuchKey)."""
    if request.path.count("/") == 1:
        return oss_error(403, "AccessDenied", "You have no right to access this object.")(request)
    return oss_error(404, "NoSuchKey", "The specified key does not exist.")(request)


@pytest.mark.parametrize("fake_oss", [head_bucket_forbidden_objects_readable], indirect=True)
async def test_a_key_without_head_bucket_permission_still_opens(fake_oss: FakeOSS) -> None:
    """The diagnostic GET proves credentials and bucket, so a policy without HeadBucket is not an error."""
    async with S3Storage(s3_config(fake_oss.endpoint_url, "wanted-bucket"), SECRETS) as storage:
        assert storage.name == "s3"
    assert [method for method, _ in fake_oss.seen] == ["HEAD", "GET"]


def head_bucket_ok_then(status: int, code: str) -> Callable[[web.Request], web.Response]:
    """HeadBucket succeeds, every object request fails: a store that breaks in the middle of a batch."""
    fail = oss_error(status, code, "try again")

    def respond(request: web.Request) -> web.Response:
        if request.method == "HEAD" and request.path.count("/") == 1:
            return web.Response(status=200)
        return fail(request)

    return respond


@pytest.mark.parametrize(
    ("fake_oss", "retryable"),
    [
        (head_bucket_ok_then(503, "ServiceUnavailable"), True),
        (head_bucket_ok_then(403, "AccessDenied"), False),
    ],
    indirect=["fake_oss"],
    ids=["503", "403"],
)
async def test_failures_during_publish_say_whether_retrying_helps(
    fake_oss: FakeOSS, tmp_path: Path, retryable: bool
) -> None:
    """5xx is retried by botocore (max_attempts=3 retries after the first try), then surfaces as retryable."""
    image = local_file(tmp_path, PNG, "face.png", "image/png")
    async with S3Storage(s3_config(fake_oss.endpoint_url, "wanted-bucket"), SECRETS) as storage:
        with pytest.raises(StorageError) as caught:
            await storage.publish(image, model=DETECT_MODEL, valid_for=timedelta(hours=1))
    assert caught.value.is_retryable is retryable
    object_heads = [seen for seen in fake_oss.seen if seen[0] == "HEAD" and seen[1].count("/") > 1]
    assert len(object_heads) == (4 if retryable else 1)
    assert image.sha256 in str(caught.value)
    assert_no_secret(caught.value)
