"""The batch's JSONL log masks secrets wherever they slipped into an event, in the file and in what it forwards."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from lpengine.logs import BatchLog, Redactor, configure

KEY = "sk-0123456789abcdef"
OSS = "oss/Secret+Value=="


@pytest.fixture
def structlog_unconfigured() -> Iterator[None]:
    """The library's default: no structlog configuration, events go to the stdlib logger (CLI tests configure it)."""
    configured, saved = structlog.is_configured(), structlog.get_config()
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()  # whatever the test configured does not outlive it
    if configured:
        structlog.configure(**saved)


def _emit_leaky_event(log: BatchLog) -> None:
    log.emit(
        "warning",
        "upload.failed",
        error=f"403 for https://x/?k={KEY}",
        nested={"headers": [f"Bearer {KEY}", OSS]},
        exc=ValueError(OSS),  # not JSON: written as its repr, masked all the same
        item="short",  # under 6 characters: never treated as a secret
    )


def test_a_secret_anywhere_in_an_event_is_masked_in_the_file_and_the_stdlib_forward(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, structlog_unconfigured: None
) -> None:
    log = BatchLog(tmp_path / "run.jsonl", Redactor([KEY, OSS, "short"]))
    with caplog.at_level(logging.INFO, logger="lpengine"):
        _emit_leaky_event(log)
    log.close()
    raw = (tmp_path / "run.jsonl").read_bytes()
    assert KEY.encode() not in raw and OSS.encode() not in raw
    line = json.loads(raw)
    assert line["error"] == "403 for https://x/?k=***"
    assert line["nested"] == {"headers": ["Bearer ***", "***"]}
    assert line["exc"] == "ValueError('***')"
    assert (line["item"], line["event"], line["level"]) == ("short", "upload.failed", "warning")
    assert KEY not in caplog.text and OSS not in caplog.text
    assert "k=***" in caplog.text


def test_the_structlog_forward_is_masked_too(tmp_path: Path) -> None:
    log = BatchLog(None, Redactor([KEY, OSS]))
    with capture_logs() as events:
        _emit_leaky_event(log)
    assert KEY not in repr(events) and OSS not in repr(events)
    assert events[0]["error"] == "403 for https://x/?k=***"
    assert events[0]["exc"] == "ValueError('***')"


def test_a_secret_that_json_escapes_is_masked_before_rendering(tmp_path: Path) -> None:
    odd = 'pa"ss\\wörd-123'  # quote, backslash, non-ASCII: the rendered line holds it escaped
    log = BatchLog(tmp_path / "run.jsonl", Redactor([odd]))
    log.emit("info", "x", error=f"denied for {odd}")
    log.close()
    line = json.loads((tmp_path / "run.jsonl").read_bytes())
    assert line["error"] == "denied for ***"


def test_an_event_below_the_forward_level_is_neither_forwarded_nor_redacted(structlog_unconfigured: None) -> None:
    """The CLI's filtering logger drops debug events: they must not pay for redaction first (four events per item)."""
    captured = structlog.testing.LogCapture()
    structlog.configure(processors=[captured], wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    shown: list[str] = []

    class Watched:
        def __repr__(self) -> str:
            shown.append("repr")
            return "watched"

    log = BatchLog(None, Redactor([KEY]))
    log.emit("debug", "stage.done", obj=Watched())
    assert captured.entries == [] and shown == []
    log.emit("info", "submit.accepted", obj=Watched(), error=KEY)
    assert [e["event"] for e in captured.entries] == ["submit.accepted"]
    assert captured.entries[0]["error"] == "***" and shown  # shown: the forwarded event was redacted


@pytest.mark.parametrize(("level", "shown"), [("warning", False), ("info", False), ("debug", True)])
@pytest.mark.parametrize("fmt", ["console", "json"])
def test_a_traceback_reaches_the_terminal_only_at_debug(
    structlog_unconfigured: None, fmt: str, level: str, shown: bool
) -> None:
    """`lpengine run` renders an error event as one line; its traceback only with `--debug` (level debug)."""
    stream = io.StringIO()
    configure(fmt=fmt, level=level, stream=stream)
    try:
        raise RuntimeError("a bug")
    except RuntimeError as error:
        structlog.get_logger("lpengine").error("stage.internal_error", error=repr(error), exc_info=True)
    text = stream.getvalue()
    assert "stage.internal_error" in text and "a bug" in text
    assert ("Traceback" in text) is shown, text
