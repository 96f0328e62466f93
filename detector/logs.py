"""Logging set-up: readable lines for a terminal, or one JSON object a line for log shippers."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import orjson

_STANDARD_ATTRIBUTES = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (RFC 3339, UTC), level, logger, message, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(
            (key, value) for key, value in record.__dict__.items() if key not in _STANDARD_ATTRIBUTES
        )
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(fmt: str, level: str) -> None:
    """Send the detector's logs to stderr in `fmt` ("console" or "json") at `level`."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
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
