"""Logging set-up: readable lines for a terminal, or one JSON object a line for log shippers.

Either way a record is one line whatever its message holds (a console record with a traceback adds the
traceback's lines, each indented): messages and fields quote client ids and model names, which come from
the callers of the prediction API, and a newline in one must not forge a record of its own, nor an escape
sequence reach the terminal (see `detector.text`).
"""

from __future__ import annotations

import json
import logging
import sys
from types import TracebackType
from typing import TextIO

from detector.domain.times import rfc3339
from detector.text import json_line, visible

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]

_STANDARD_ATTRIBUTES = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
# Prefixed to each line of a traceback in console logs, so that no line of it can pass for a record.
_TRACEBACK_INDENT = "  | "


def extra_fields(record: logging.LogRecord) -> dict[str, object]:
    """The fields a log call added with `extra=`."""
    return {key: value for key, value in record.__dict__.items() if key not in _STANDARD_ATTRIBUTES}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (RFC 3339, UTC), level, logger, message, extra fields, exception.

    Strings are escaped as JSON escapes them, and so are DEL, C1 controls, bidirectional overrides and line
    separators (`detector.text.json_line`): the line parses back to exactly what was logged."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(extra_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        try:
            return json_line(entry, default=str)
        except TypeError:
            # orjson refuses lone surrogates; the standard library writes them as \ud800 escapes.
            return json.dumps(entry, default=str, ensure_ascii=True)


class ConsoleFormatter(logging.Formatter):
    """`time level logger: message` on one line (the time in RFC 3339, UTC, as every time the detector
    writes), control characters of the message shown as escapes
    (`\\n`, `\\x1b`: `detector.text.visible`). Extra fields are left to the JSON format. A traceback follows
    on lines of its own, each prefixed with `  | `."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return rfc3339(record.created)

    def formatMessage(self, record: logging.LogRecord) -> str:
        return visible(super().formatMessage(record))

    def formatException(self, ei: _ExcInfo) -> str:
        text = super().formatException(ei)
        return "\n".join(_TRACEBACK_INDENT + visible(line) for line in text.splitlines())

    def formatStack(self, stack_info: str) -> str:
        return "\n".join(_TRACEBACK_INDENT + visible(line) for line in stack_info.splitlines())


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to `sys.stderr` as it is when a record is emitted, not as it was when logging was set up: a
    progress bar that redirects stderr (rich's does, in a terminal) keeps log lines above itself."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        """Ignored: the stream is always the current `sys.stderr`."""


def configure_logging(fmt: str, level: str) -> None:
    """Send the detector's logs to stderr in `fmt` ("console" or "json") at `level`."""
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # kafka-python logs every reconnect at WARNING and alembic every migration step at INFO: keep that
    # noise out of operators' logs unless they ask for DEBUG.
    if level != "DEBUG":
        logging.getLogger("kafka").setLevel(logging.ERROR)
        logging.getLogger("alembic").setLevel(logging.WARNING)
    # httpx logs every request with its URL, and receivers' URLs carry credentials (a Slack webhook URL is
    # its own secret): never below WARNING, whatever the level asked for.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
