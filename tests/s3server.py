"""A real S3-compatible server on 127.0.0.1 for the test suite: moto's server mode, counted server-side.

Storage behaviour such as "a second run uploads nothing" is only believable when the server says so, not when
the client reports what it thinks it sent. So moto's WSGI app is wrapped in a middleware that records every
request by method and S3 operation, with its headers (minus `Authorization`), before moto answers it.

Use it from a conftest with `from tests.s3server import s3_server`, or start an `S3Server` yourself. The server
only understands path-style addressing (`bucket.127.0.0.1` does not resolve), so tests use
`addressing_style: path`; production OSS needs `virtual` (docs/storage.md).

moto keeps its data in process-global backends: every `S3Server` in one process (and any `moto.mock_aws`) sees
the same buckets. Tests therefore use a fresh bucket each (`unique_bucket_name`) rather than resetting moto.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, unquote

import boto3  # type: ignore[import-untyped]
import pytest
from botocore.config import Config
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import BaseWSGIServer, make_server

__all__ = [
    "ACCESS_KEY_ID",
    "SECRET_ACCESS_KEY",
    "S3Request",
    "S3Server",
    "s3_server",
    "unique_bucket_name",
]

# moto does not check credentials; any non-empty pair signs requests it accepts.
ACCESS_KEY_ID = "AKIDLPENGINETEST0000"
SECRET_ACCESS_KEY = "lpengine-test-secret-do-not-leak-0123456789"
REGION = "us-east-1"

# Requests made by the helper itself (create_bucket, list_keys) carry this in their User-Agent and are not
# counted, so that setting up a test never shows up in what the test asserts.
_HELPER_AGENT = "lpengine-s3server-helper"

# Object-level operations whose HTTP method is what tests count as "PUT", "GET", "HEAD" and "DELETE".
_OBJECT_METHOD_KEYS = {
    "PutObject": "PUT",
    "CopyObject": "PUT",
    "UploadPart": "PUT",
    "GetObject": "GET",
    "HeadObject": "HEAD",
    "DeleteObject": "DELETE",
}

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


@dataclass(frozen=True, slots=True)
class S3Request:
    """One request as the server saw it."""

    method: str
    operation: str
    bucket: str | None
    key: str | None
    query: dict[str, list[str]]
    headers: dict[str, str] = field(repr=False)
    """Lower-cased names; `authorization` is left out on purpose."""
    helper: bool = False


def classify(method: str, path: str, query: dict[str, list[str]], headers: dict[str, str]) -> S3Request:
    """Name the S3 operation of a path-style request, well enough for counting (not a full S3 router)."""
    parts = path.lstrip("/").split("/", 1)
    bucket = unquote(parts[0]) or None
    key = unquote(parts[1]) if len(parts) > 1 and parts[1] else None
    if bucket is None:
        operation = "ListBuckets"
    elif key is None:
        if method == "POST" and "delete" in query:
            operation = "DeleteObjects"
        elif query:
            operation = f"{method}Bucket?{'&'.join(sorted(query))}"
        else:
            operation = {
                "HEAD": "HeadBucket",
                "PUT": "CreateBucket",
                "GET": "ListObjects",
                "DELETE": "DeleteBucket",
            }.get(method, f"{method}Bucket")
    elif method == "PUT":
        if "partNumber" in query:
            operation = "UploadPart"
        elif "x-amz-copy-source" in headers:
            operation = "CopyObject"
        elif query:
            operation = f"PutObject?{'&'.join(sorted(query))}"
        else:
            operation = "PutObject"
    elif method == "POST":
        operation = "CreateMultipartUpload" if "uploads" in query else "CompleteMultipartUpload"
    elif method == "DELETE":
        operation = "AbortMultipartUpload" if "uploadId" in query else "DeleteObject"
    else:
        operation = {"GET": "GetObject", "HEAD": "HeadObject"}.get(method, f"{method}Object")
    return S3Request(
        method=method,
        operation=operation,
        bucket=bucket,
        key=key,
        query=query,
        headers=headers,
        helper=_HELPER_AGENT in headers.get("user-agent", ""),
    )


class _Recorder:
    """WSGI middleware: writes down each request, then lets moto answer it.

    werkzeug serves each request on its own thread, hence the lock.
    """

    def __init__(self, app: WSGIApp) -> None:
        self._app = app
        self._lock = threading.Lock()
        self._requests: list[S3Request] = []

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if not path.startswith("/moto-api"):
            headers = {
                name[5:].replace("_", "-").lower(): str(value)
                for name, value in environ.items()
                if name.startswith("HTTP_") and name != "HTTP_AUTHORIZATION"
            }
            for name in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                if environ.get(name):
                    headers[name.replace("_", "-").lower()] = str(environ[name])
            query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
            request = classify(environ["REQUEST_METHOD"], path, query, headers)
            with self._lock:
                self._requests.append(request)
        return self._app(environ, start_response)

    def snapshot(self) -> list[S3Request]:
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()


class _QuietHandler(MotoRequestHandler):
    """moto's request handler without werkzeug's per-request access log line."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return None


class _S3Only(DomainDispatcherApplication):
    """moto's dispatcher, told that every request is for S3 (the only service this server runs).

    Left to itself it guesses the service from the Authorization header as if it were a SigV4 credential scope:
    a SigV2 signature whose base64 happens to hold four '/' reads as some other service, and moto answers 500
    to every retry of that request (same second, same signature) — a rare, random test failure.
    """

    def infer_service_region_host(self, environ: dict[str, Any], path: str) -> str | None:
        return "s3.us-east-1.amazonaws.com"


class S3Server:
    """moto in server mode on 127.0.0.1 and a free port, in a daemon thread; also a context manager."""

    def __init__(self) -> None:
        self._recorder = _Recorder(_S3Only(create_backend_app))
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("S3Server already started")
        self._server = make_server("127.0.0.1", 0, self._recorder, threaded=True, request_handler=_QuietHandler)
        # make_server has bound and listens already, so the port is reachable when start() returns.
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def endpoint_url(self) -> str:
        if self._server is None:
            raise RuntimeError("S3Server not started")
        return f"http://127.0.0.1:{self._server.server_port}"

    # -- what the server saw ---------------------------------------------------------------------------------

    def requests(self) -> list[S3Request]:
        """Every counted request since the last reset, oldest first (helper requests excluded)."""
        return [r for r in self._recorder.snapshot() if not r.helper]

    def counts(self) -> dict[str, int]:
        """Requests by operation name ("PutObject", "HeadBucket", …) and by method for object-level requests.

        The method keys ("PUT" = object uploads, "GET", "HEAD", "DELETE") count requests on objects only, so a
        HeadBucket or CreateBucket never inflates "HEAD" or "PUT". Missing keys mean zero.
        """
        tally: Counter[str] = Counter()
        for request in self.requests():
            tally[request.operation] += 1
            method_key = _OBJECT_METHOD_KEYS.get(request.operation)
            if method_key is not None:
                tally[method_key] += 1
        return {name: tally.get(name, 0) for name in ("PUT", "GET", "HEAD", "DELETE")} | dict(tally)

    def reset_counts(self) -> None:
        self._recorder.clear()

    # -- setting up and inspecting buckets (not counted) -----------------------------------------------------

    def client(self) -> Any:
        """A plain boto3 client marked as the helper, for set-up and inspection outside the code tested."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
            config=Config(s3={"addressing_style": "path"}, user_agent_extra=_HELPER_AGENT),
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def put_object(self, bucket: str, key: str, body: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=body)

    def list_keys(self, bucket: str) -> list[str]:
        paginator = self.client().get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=bucket)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def unique_bucket_name(stem: str = "lpengine-test") -> str:
    """A valid, unused bucket name, so tests never see each other's objects in moto's shared state."""
    return f"{stem}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto server for the whole session; tests isolate by bucket and `reset_counts()`."""
    with S3Server() as server:
        yield server
