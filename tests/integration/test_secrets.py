"""Secrets and exposure: the API key and the storage secret never appear in anything lpengine writes or prints;
the servers it starts listen on loopback only and give away nothing but the batch's own files; TLS stays verified;
presigned URLs live no longer than the batch needs plus the configured margin.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import ssl
import subprocess
import sys
import time
import traceback
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import anyio
import botocore.retries.standard
import pytest
import structlog
from aiohttp import web
from pydantic import SecretStr

from lpengine import Engine, ItemState, load_config
from lpengine.client import DashScopeClient
from lpengine.config import ApiConfig, BatchConfig, FileServerStorageConfig, RetryConfig, S3StorageConfig, Secrets
from lpengine.emulator import EmulatorSettings, FaultRule, FaultSettings, run_emulator
from lpengine.emulator.app import RunningEmulator
from lpengine.errors import AuthError, LPEngineError, NetworkError, QuotaError, StorageError
from lpengine.storage.base import LocalFile
from lpengine.storage.fileserver import FileServerStorage
from lpengine.storage.s3 import S3Storage
from tests.s3server import S3Server, unique_bucket_name

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
VOICE = ROOT / "lpengine" / "assets" / "voice.wav"
SPEEDUP = 500.0
# Recognisable, so that a leak anywhere (even a fragment of a traceback) is found by a plain byte search.
API_KEY = "sk-LEAKCHECK-apikey-5f0c2b9e7d41a6"
S3_KEY_ID = "AKIDLEAKCHECK00000001"
S3_SECRET = "LEAKCHECK-s3-secret-Zq7wX2pR9tYb4Kd8"
SECRETS = (API_KEY.encode(), S3_SECRET.encode())


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_no_secret(blob: bytes | str, where: str) -> None:
    data = blob.encode("utf-8", "surrogateescape") if isinstance(blob, str) else blob
    for secret in SECRETS:
        assert secret not in data, f"secret {secret[:12]!r}… found in {where}"


def scan_tree(root: Path) -> int:
    """Every byte of every file under `root` (logs, reports, the SQLite store with its -wal/-shm, videos)."""
    scanned = 0
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert_no_secret(path.read_bytes(), str(path))
            scanned += 1
    return scanned


def test_the_scanner_finds_a_planted_secret(tmp_path: Path) -> None:
    """The scans below would notice a leak: a secret planted in a nested file is found."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "state.db-wal").write_bytes(b"\x00" * 100 + S3_SECRET.encode() + b"\x00")
    with pytest.raises(AssertionError, match="found in"):
        scan_tree(tmp_path)


def scan_exception(exc: BaseException) -> None:
    text = "".join(traceback.format_exception(exc))
    assert_no_secret(text, f"exception {type(exc).__name__}")
    assert_no_secret(repr(exc), f"repr of {type(exc).__name__}")


@pytest.fixture(scope="module")
def portraits(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from lpengine.demo_assets import make_portraits

    return make_portraits(tmp_path_factory.mktemp("portraits"), 8)


@pytest.fixture
async def emulator() -> AsyncIterator[RunningEmulator]:
    settings = EmulatorSettings(api_keys=[API_KEY], speedup=SPEEDUP, video="stub", detector="rule")
    async with run_emulator(settings) as emu:
        yield emu


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("OSS_ACCESS_KEY_ID", S3_KEY_ID)
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", S3_SECRET)
    yield


def every_failure(emu: RunningEmulator, images: list[Path]) -> None:
    """One image per failure path (the first one succeeds)."""
    _, permanent, retryable, expired, truncated, noface, detect_error, lost = images[:8]
    emu.set_faults(
        FaultSettings(
            rules=[
                FaultRule(match=sha(permanent), action="fail_task", code="DataInspectionFailed"),
                FaultRule(match=sha(retryable), action="fail_task", code="InternalError.Algo"),
                FaultRule(match=sha(expired), action="expire_result"),
                FaultRule(match=sha(truncated), action="truncate_download"),
                FaultRule(match=sha(noface), action="detect_fail"),
                FaultRule(match=sha(detect_error), action="error", code="InvalidParameter.DataInspection"),
                FaultRule(match=sha(lost), action="lose_submit_response", times=1),
                FaultRule(match="", action="error", code="Throttling.RateQuota", endpoint="task", times=2),
            ]
        )
    )


def batch_yaml(root: Path, images: list[Path], base_url: str, storage: str) -> Path:
    photos = root / "photos"
    photos.mkdir(parents=True)
    for image in images:
        shutil.copy(image, photos / image.name)
    (photos / "broken.jpg").write_bytes(b"not an image")
    path = root / "batch.yaml"
    path.write_text(
        f"""
inputs:
  images: photos
audio: {VOICE}
api:
  base_url: {base_url}
  speedup: {SPEEDUP}
  retry:
    attempts: 3
    initial_wait_s: 0
    max_wait_s: 0
storage:
  {storage}
output:
  dir: out
"""
    )
    return path


def s3_block(server: S3Server, bucket: str, extra: str = "") -> str:
    return (
        f"backend: s3\n  endpoint_url: {server.endpoint_url}\n  region: us-east-1\n  bucket: {bucket}\n"
        f"  addressing_style: path\n  cleanup: never{extra}"
    )


# -- nothing written or printed holds a secret ------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["s3", "dashscope_temp"])
async def test_library_batches_leak_no_secret_on_any_path(
    tmp_path: Path,
    portraits: list[Path],
    emulator: RunningEmulator,
    s3_server: S3Server,
    s3_env: None,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    fast_retries: None,
    backend: str,
) -> None:
    """A batch where every item takes another path (success, local refusal, no face, detect refused, permanent and
    retryable task failure, expired URL, truncated video, lost submit answer, 429s), then a re-run: no secret in
    the output folder (logs, reports, state store with WAL), the host's log records, stdout/stderr, or reports."""
    caplog.set_level(logging.DEBUG)  # everything anyone logs, lpengine and its libraries alike
    bucket = s3_server.create_bucket(unique_bucket_name())
    storage = s3_block(s3_server, bucket) if backend == "s3" else "backend: dashscope_temp"
    every_failure(emulator, portraits)
    config = load_config(batch_yaml(tmp_path, portraits[:8], emulator.base_url, storage))
    for _ in range(2):  # the re-run takes the resume paths
        async with Engine(config, api_key=API_KEY) as engine:
            report = await engine.run()
            assert scan_tree(tmp_path) > 5  # while the store is open: its -wal file is there too
        assert {r.state for r in report.items} >= {ItemState.SUCCEEDED, ItemState.TASK_FAILED}
    assert len({r.state for r in report.items}) >= 5
    scan_tree(tmp_path)
    assert_no_secret("\n".join(r.getMessage() for r in caplog.records), "log records")
    out, err = capfd.readouterr()
    assert_no_secret(out + err, "stdout/stderr")


async def test_account_errors_and_bad_storage_leak_no_secret(
    tmp_path: Path,
    portraits: list[Path],
    emulator: RunningEmulator,
    s3_server: S3Server,
    s3_env: None,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    fast_retries: None,
) -> None:
    """The errors that stop a batch (a key the service refuses, a quota error, a storage that refuses the bucket)
    carry no secret in their message, repr, traceback or chained causes, nor in what was logged on the way."""
    caplog.set_level(logging.DEBUG)
    config = load_config(batch_yaml(tmp_path, portraits[:2], emulator.base_url, "backend: fileserver"))
    raised: list[BaseException] = []

    wrong = API_KEY.replace("apikey", "wrongk")  # a near miss, as a typo would be
    with pytest.raises((AuthError, BaseExceptionGroup)) as auth:
        async with Engine(config, api_key=wrong) as engine:
            await engine.run()
    raised.append(auth.value)
    assert leaves(auth.value) == [AuthError]

    emulator.set_faults(FaultSettings(rules=[FaultRule(match="", action="error", code="Arrearage")]))
    with pytest.raises((QuotaError, BaseExceptionGroup)) as quota:
        async with Engine(config, api_key=API_KEY) as engine:
            await engine.run()
    raised.append(quota.value)
    assert leaves(quota.value) == [QuotaError]

    missing_bucket = config.model_copy(
        update={
            "storage": S3StorageConfig(
                bucket=unique_bucket_name("absent"),
                endpoint_url=s3_server.endpoint_url,
                region="us-east-1",
                addressing_style="path",
            )
        }
    )
    with pytest.raises(LPEngineError) as storage:
        async with Engine(missing_bucket, api_key=API_KEY):
            pass
    raised.append(storage.value)

    for exc in raised:
        scan_exception(exc)
    scan_tree(tmp_path)
    assert_no_secret("\n".join(r.getMessage() for r in caplog.records), "log records")
    out, err = capfd.readouterr()
    assert_no_secret(out + err, "stdout/stderr")
    assert wrong not in out + err


def leaves(exc: BaseException) -> list[type[BaseException]]:
    if isinstance(exc, BaseExceptionGroup):
        return [t for e in exc.exceptions for t in leaves(e)]
    return [type(exc)]


async def test_auth_error_leaves_the_engine_as_itself(
    tmp_path: Path, portraits: list[Path], emulator: RunningEmulator
) -> None:
    """docs/library.md: `run()` raises AuthError/QuotaError after writing the report; callers catch them by type."""
    config = load_config(batch_yaml(tmp_path, portraits[:1], emulator.base_url, "backend: fileserver"))
    with pytest.raises(AuthError):
        async with Engine(config, api_key="sk-refused-by-the-service") as engine:
            await engine.run()


async def test_cli_refused_key_is_one_line_and_exit_2(
    tmp_path: Path, portraits: list[Path], emulator: RunningEmulator
) -> None:
    """docs/troubleshooting.md: `error: InvalidApiKey: Invalid API-key provided. — the batch stopped; state is saved`,
    exit 2."""
    config = batch_yaml(tmp_path, portraits[:1], emulator.base_url, "backend: fileserver")
    proc = await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-m", "lpengine", "run", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "DASHSCOPE_API_KEY": "sk-refused-by-the-service"},
        )
    )
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 2
    # warnings logged on the way (a rejected file, the abort event) may precede it; the verdict is one line
    errors = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert errors == ["error: InvalidApiKey: Invalid API-key provided. — the batch stopped; state is saved"]


@pytest.mark.parametrize("log_format", ["json", "console"])
async def test_cli_runs_leak_no_secret(
    tmp_path: Path,
    portraits: list[Path],
    emulator: RunningEmulator,
    s3_server: S3Server,
    log_format: str,
) -> None:
    """`lpengine run` with every failure path at debug level (json and console logs), then once with a key the
    service refuses: stdout, stderr and every file written hold neither the API key nor the storage secret."""
    every_failure(emulator, portraits)
    bucket = s3_server.create_bucket(unique_bucket_name())
    config = batch_yaml(tmp_path, portraits[:8], emulator.base_url, s3_block(s3_server, bucket))
    env = {
        **os.environ,
        "DASHSCOPE_API_KEY": API_KEY,
        "OSS_ACCESS_KEY_ID": S3_KEY_ID,
        "OSS_ACCESS_KEY_SECRET": S3_SECRET,
    }

    def run(key: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lpengine", "run", str(config), "--log-format", log_format, "--log-level", "debug"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**env, "DASHSCOPE_API_KEY": key},
        )

    ok = await anyio.to_thread.run_sync(lambda: run(API_KEY))
    assert ok.returncode == 1, ok.stderr[-2000:]  # some items failed, on purpose
    assert "Traceback" not in ok.stderr
    assert_no_secret(ok.stdout + ok.stderr, "CLI stdout/stderr")
    assert len(ok.stderr.splitlines()) > 20  # debug logging really ran
    wrong = API_KEY.replace("apikey", "wrongk")
    refused = await anyio.to_thread.run_sync(lambda: run(wrong))
    assert refused.returncode != 0 and "InvalidApiKey" in refused.stderr
    assert wrong not in refused.stdout + refused.stderr
    assert_no_secret(refused.stdout + refused.stderr, "CLI stdout/stderr (refused key)")
    scan_tree(tmp_path)


# -- servers lpengine starts: loopback only, nothing but the batch's files ---------------------------------------


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket LISTENing on `port`, from the kernel's own tables."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A = LISTEN
                found.add(address)
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1


async def test_servers_lpengine_starts_listen_on_loopback_only(tmp_path: Path, portraits: list[Path]) -> None:
    """The file server, the standalone emulator and the one a config embeds: all bound to 127.0.0.1 by default."""
    if not await anyio.Path("/proc/net/tcp").exists():
        pytest.skip("needs /proc/net/tcp to read the kernel's socket table")
    async with FileServerStorage(FileServerStorageConfig()) as files, run_emulator(EmulatorSettings()) as emu:
        for url in (files.base_url, emu.base_url):
            parts = urlsplit(url)
            assert parts.hostname == "127.0.0.1"
            assert parts.port is not None and listening_addresses(parts.port) <= LOOPBACK
            assert listening_addresses(parts.port)

    photos = tmp_path / "photos"
    photos.mkdir()
    (tmp_path / "b.yaml").write_text(
        f"inputs:\n  images: photos\naudio: {VOICE}\napi:\n  emulator:\n    video: stub\n  speedup: 100\n"
        "storage:\n  backend: fileserver\noutput:\n  dir: out\n"
    )
    async with Engine(load_config(tmp_path / "b.yaml")) as engine:
        assert engine.emulator_url is not None
        port = urlsplit(engine.emulator_url).port
        assert urlsplit(engine.emulator_url).hostname == "127.0.0.1" and port is not None
        assert listening_addresses(port) and listening_addresses(port) <= LOOPBACK
        storage = engine.ctx.storage
        assert isinstance(storage, FileServerStorage)
        files_port = urlsplit(storage.base_url).port
        assert files_port is not None and listening_addresses(files_port) <= LOOPBACK


async def raw_get(port: int, target: str) -> int:
    """Send a request line exactly as given (no client-side normalisation of `..` or `%2e`); the status code."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode("latin-1"))
        await writer.drain()
        status_line = await reader.readline()
        return int(status_line.split()[1])
    finally:
        writer.close()


async def test_file_server_serves_only_published_files_behind_its_secret_prefix(tmp_path: Path) -> None:
    """Path traversal (`..`, `%2e%2e`, encoded slashes), other prefixes, guessed names, directory listings, files next
    to a published one: 404. Only the exact published URL answers, with the exact bytes."""
    (tmp_path / "secret.txt").write_text("not for the service")
    image = tmp_path / "face.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    neighbour = tmp_path / "other.png"
    neighbour.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50))
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    local = LocalFile(image, digest, image.stat().st_size, "image/png", ".png")
    async with FileServerStorage(FileServerStorageConfig()) as one, FileServerStorage(FileServerStorageConfig()) as two:
        published = await one.publish(local, model="liveportrait", valid_for=timedelta(hours=1))
        url = urlsplit(published.url)
        port = url.port
        assert port is not None
        prefix, name = url.path.strip("/").split("/")
        assert len(prefix) >= 32 and prefix != urlsplit(two.base_url).path.strip("/")  # unguessable, per server
        assert await raw_get(port, url.path) == 200

        other_sha = hashlib.sha256(neighbour.read_bytes()).hexdigest()
        hostile = [
            f"/{prefix}/../{prefix}/{name}",
            f"/{prefix}/%2e%2e/{prefix}/{name}",
            f"/{prefix}/..%2f..%2f..%2fetc%2fpasswd",
            f"/{prefix}/%2e%2e%2f%2e%2e%2fsecret.txt",
            f"/{prefix}/../../../../etc/passwd",
            f"/{prefix}/....//....//etc/passwd",
            f"/{prefix}/face.png",
            f"/{prefix}/secret.txt",
            f"/{prefix}/{other_sha}.png",
            f"/{prefix}/{digest}.jpg",
            f"/{prefix}/{name}/",
            f"/{prefix}/{name}%00.txt",
            f"/{prefix}/",
            f"/{prefix}",
            f"/{prefix.upper()}/{name}",
            f"/x{prefix}/{name}",
            f"/{prefix[:-1]}/{name}",
            f"/guess/{name}",
            f"/{name}",
            "/",
            "/etc/passwd",
            "//etc/passwd",
            f"/{prefix}/%2fetc%2fpasswd",
            f"http://127.0.0.1:{port}/{prefix}/../../etc/passwd",
        ]
        for target in hostile:
            assert await raw_get(port, target) in (400, 404), target
        # the other server does not know this file, even under its own prefix
        two_port = urlsplit(two.base_url).port
        assert two_port is not None
        assert await raw_get(two_port, f"{urlsplit(two.base_url).path}/{name}") == 404


# -- TLS stays verified ----------------------------------------------------------------------------------------


def self_signed_context(folder: Path) -> ssl.SSLContext:
    """A server TLS context with a fresh self-signed certificate for 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return context


@pytest.fixture
async def https_server(tmp_path: Path) -> AsyncIterator[str]:
    """An HTTPS server with an untrusted certificate that answers every GET like a DashScope task query."""

    async def task(request: web.Request) -> web.Response:
        return web.json_response({"output": {"task_id": "t", "task_status": "PENDING"}, "request_id": "r"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", task)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self_signed_context(tmp_path))
    await site.start()
    yield f"https://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_tls_is_verified_by_default_and_turning_it_off_is_logged(https_server: str, fast_retries: None) -> None:
    """`api.verify_tls` defaults to true: an untrusted certificate fails the request. Turned off, the client works
    but says so, as the warning `tls.verification_disabled`."""
    assert ApiConfig().verify_tls is True
    api = ApiConfig(retry=RetryConfig(attempts=1))
    with structlog.testing.capture_logs() as logs:
        async with DashScopeClient(api, SecretStr(API_KEY), base_url=https_server) as client:
            with pytest.raises(NetworkError):
                await client.get_task("t")
    assert not [e for e in logs if e["event"] == "tls.verification_disabled"]

    insecure = api.model_copy(update={"verify_tls": False})
    with structlog.testing.capture_logs() as logs:
        async with DashScopeClient(insecure, SecretStr(API_KEY), base_url=https_server) as client:
            assert (await client.get_task("t")).task_id == "t"
    [warning] = [e for e in logs if e["event"] == "tls.verification_disabled"]
    assert warning["log_level"] == "warning" and warning["base_url"] == https_server
    assert_no_secret(json.dumps(logs, default=str), "tls warning")


async def test_storage_tls_is_verified_too(https_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The S3 backend verifies its endpoint's certificate as well (it follows `api.verify_tls`)."""
    monkeypatch.setattr(botocore.retries.standard.ExponentialBackoff, "delay_amount", lambda self, ctx: 0)
    config = S3StorageConfig(bucket="b", endpoint_url=https_server, region="us-east-1", addressing_style="path")
    secrets = Secrets(oss_access_key_id=SecretStr(S3_KEY_ID), oss_access_key_secret=SecretStr(S3_SECRET))
    with pytest.raises(StorageError, match="TLS") as info:
        async with S3Storage(config, secrets, verify_tls=True):
            pass
    scan_exception(info.value)


# -- presigned URLs live no longer than needed --------------------------------------------------------------------


@pytest.mark.parametrize("signature_version", ["s3v4", "s3"])
async def test_presigned_urls_never_outlive_the_batch_by_more_than_the_margin(
    tmp_path: Path,
    portraits: list[Path],
    emulator: RunningEmulator,
    s3_server: S3Server,
    s3_env: None,
    signature_version: str,
) -> None:
    """Every presigned URL a batch hands out expires within what the batch needs (the engine's computed URL
    lifetime) plus `storage.url_margin_s`, and no earlier than the batch needs it."""
    margin = 120
    bucket = s3_server.create_bucket(unique_bucket_name())
    extra = f"\n  url_margin_s: {margin}\n  signature_version: {signature_version}"
    config: BatchConfig = load_config(
        batch_yaml(tmp_path, portraits[:3], emulator.base_url, s3_block(s3_server, bucket, extra))
    )
    started = time.time()
    async with Engine(config, api_key=API_KEY) as engine:
        needed = engine._url_lifetime().total_seconds()
        report = await engine.run()
    finished = time.time()
    assert sum(r.state is ItemState.SUCCEEDED for r in report.items) == 3
    with sqlite3.connect(config.state_path) as db:
        urls = [row[0] for row in db.execute("SELECT url FROM uploads")]
    assert len(urls) == 4  # three images and the voice track
    for url in urls:
        query = parse_qs(urlsplit(url).query)
        if signature_version == "s3v4":
            signed_at = datetime.datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ")
            lifetime = int(query["X-Amz-Expires"][0])
            expires = signed_at.replace(tzinfo=datetime.UTC).timestamp() + lifetime
        else:
            expires = int(query["Expires"][0])
        assert expires <= finished + needed + margin + 1, (url, needed, margin)
        assert expires >= started + needed + margin - 2, (url, needed, margin)  # not shorter either
