"""Log records are one line each in both formats, whatever their message and fields hold."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import orjson
import pytest

from detector.logs import ConsoleFormatter, JsonFormatter, configure_logging

FORGING = (
    "evil\n2026-01-01T00:00:00.000Z ERROR   detector: forged"
    '\n{"level":"error","message":"forged"}\x1b[2J\u202e\x85'
)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def emit(fmt: str, capsys: pytest.CaptureFixture[str], *, exception: bool = False) -> str:
    """What logging one record in `fmt` writes to stderr (the handler writes to `sys.stderr` as it is)."""
    configure_logging(fmt, "INFO")
    capsys.readouterr()
    log = logging.getLogger("detector.test")
    if exception:
        try:
            raise ValueError(f"bad client {FORGING}")
        except ValueError:
            log.exception("failed on %s", FORGING)
    else:
        log.warning("ALERT client=%s", FORGING, extra={"client_ids": [FORGING], "alert_id": 3})
    return capsys.readouterr().err


def test_a_console_record_is_one_line_with_control_characters_escaped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    written = emit("console", capsys)
    lines = written.split("\n")
    assert lines[-1] == "" and len(lines) == 2
    assert lines[0].endswith(
        "detector.test: ALERT client=evil\\n2026-01-01T00:00:00.000Z ERROR   detector: forged"
        '\\n{"level":"error","message":"forged"}\\x1b[2J\\u202e\\x85'
    )
    assert "\x1b" not in written


def test_a_console_traceback_has_no_line_that_passes_for_a_record(capsys: pytest.CaptureFixture[str]) -> None:
    written = emit("console", capsys, exception=True)
    lines = written.split("\n")[:-1]
    assert "failed on evil\\n2026" in lines[0]
    assert len(lines) > 2 and all(line.startswith("  | ") for line in lines[1:])
    # The exception's own newline breaks the traceback's line, but the forged record stays indented in it.
    assert "  | ValueError: bad client evil" in lines
    assert "  | 2026-01-01T00:00:00.000Z ERROR   detector: forged" in lines
    assert "\x1b" not in written


def test_a_json_record_is_one_line_that_parses_back_to_what_was_logged(
    capsys: pytest.CaptureFixture[str],
) -> None:
    lines = emit("json", capsys).split("\n")
    assert lines[-1] == "" and len(lines) == 2 and lines[0].isprintable()
    entry = orjson.loads(lines[0])
    assert entry["message"] == f"ALERT client={FORGING}"
    assert entry["client_ids"] == [FORGING] and entry["alert_id"] == 3
    assert (entry["level"], entry["logger"]) == ("warning", "detector.test")


def test_a_json_traceback_stays_inside_its_record(capsys: pytest.CaptureFixture[str]) -> None:
    lines = emit("json", capsys, exception=True).split("\n")
    assert len(lines) == 2
    entry = orjson.loads(lines[0])
    assert f"ValueError: bad client {FORGING}" in entry["exception"]


def test_json_logs_survive_a_string_orjson_refuses() -> None:
    record = logging.LogRecord("detector", logging.INFO, __file__, 1, "lone %s", ("\ud800",), None)
    line = JsonFormatter().format(record)
    assert "\n" not in line and orjson.loads(line.replace("\\ud800", "?"))["message"] == "lone ?"


def test_console_formatter_keeps_ordinary_messages_as_they_are() -> None:
    record = logging.LogRecord("detector", logging.INFO, __file__, 1, "stopped: %d records", (3,), None)
    assert ConsoleFormatter().format(record).endswith("INFO    detector: stopped: 3 records")
