"""Structured logs: the per-batch JSONL file the engine writes, and the stderr setup only the CLI applies.

The library never configures global logging (it may live inside someone else's service). Each engine writes its
own JSONL file through a private structlog logger, and forwards the same events to the host's logging: to
`structlog.get_logger("lpengine")` when the host (or `lpengine.cli`) configured structlog, otherwise to the stdlib
logger `lpengine`, whose default shows only warnings (an unconfigured structlog would print debug lines to stdout).
Every event passes through `Redactor`, so a secret that slipped into a message is masked before any sink.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import orjson
import structlog

_MASK = "***"
_MASK_BYTES = _MASK.encode()
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_LINE = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS


class Redactor:
    """Replaces every occurrence of the given secrets in an event's string values, nested ones included."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = [s for s in secrets if s and len(s) >= 6]
        self._encoded = [s.encode() for s in self._secrets]
        # A secret that JSON writes escaped (a quote, a backslash, a control or non-ASCII character) would not be
        # found in the rendered line: such secrets are masked field by field before rendering instead.
        self.line_maskable = all(orjson.dumps(s) == b'"' + s.encode() + b'"' and s.isascii() for s in self._secrets)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, _MASK)
            return value
        if isinstance(value, dict):
            return {k: self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(v) for v in value]
        if value is None or isinstance(value, int | float):
            return value
        # Any other object (an exception, a URL): shown by its repr, masked, if a secret hides in it.
        text = repr(value)
        masked = self._clean(text)
        return masked if masked != text or self._clean(str(value)) != str(value) else value

    def __call__(self, fields: dict[str, Any]) -> dict[str, Any]:
        return {key: self._clean(value) for key, value in fields.items()}

    def mask(self, line: bytes) -> bytes:
        """The same for a rendered JSON line: one byte search per secret instead of a walk over the fields (API
        keys and access secrets are plain ASCII, which JSON writes unescaped; see `line_maskable`)."""
        for secret in self._encoded:
            if secret in line:
                line = line.replace(secret, _MASK_BYTES)
        return line


class BatchLog:
    """Writes every engine event as one JSON line to `<output>/lpengine-<run>.jsonl` and forwards it to stderr.

    The file line is rendered here rather than by a structlog pipeline: with four events per item, the pipeline
    (and a second redaction pass for the forward) cost 6 % of the engine's CPU at 100k items. Same line format:
    the event's fields, then `event`, `ts`, `level`.
    """

    def __init__(self, path: Path | None, redactor: Redactor) -> None:
        self.path = path
        self._file: BinaryIO | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("ab", buffering=0)  # one write per line: a kill loses no line
        self._redactor = redactor
        self._stdlib = logging.getLogger("lpengine")

    def emit(self, level: str, event: str, **fields: Any) -> None:
        if self._file is not None:
            shown = fields if self._redactor.line_maskable else self._redactor(fields)
            line = {**shown, "event": event, "ts": round(time.time(), 3), "level": level}
            self._file.write(self._redactor.mask(orjson.dumps(line, default=repr, option=_LINE)))
        if structlog.is_configured():
            logger = structlog.get_logger("lpengine").bind()
            enabled = getattr(logger, "is_enabled_for", None)  # filtering loggers (the CLI's) have it
            if enabled is None or enabled(_LEVELS[level]):  # a dropped event needs no redaction either
                getattr(logger, level)(event, **self._redactor(fields))
        else:
            numeric = _LEVELS[level]
            if self._stdlib.isEnabledFor(numeric):  # the library default shows warnings only: most events stop here
                details = " ".join(f"{k}={v}" for k, v in self._redactor(fields).items() if v not in (None, ""))
                self._stdlib.log(numeric, "%s %s", event, details)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _without_traceback(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    event.pop("exc_info", None)
    return event


def configure(*, fmt: str = "console", level: str = "info", stream: TextIO | None = None) -> None:
    """stderr rendering for the CLI: human console lines or JSON lines. The library never calls this.

    Tracebacks are rendered at the debug level only: anything else sees one line naming the error, which is all a
    user can act on (a traceback on the terminal reads like a crash even when the item was retried and succeeded).
    """
    renderer: Any = (
        structlog.processors.JSONRenderer(ensure_ascii=False)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=(stream or sys.stderr).isatty())
    )
    tracebacks = [structlog.processors.format_exc_info] if fmt == "json" else []
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *(tracebacks if level == "debug" else [_without_traceback]),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
