"""`detector.text`: attacker text shown on one line, with nothing hidden, and JSON lines that parse back."""

from __future__ import annotations

import orjson
import pytest
from rich.console import Console

from detector.text import json_line, shorten, terminal_text, visible

HOSTILE = (
    "a[/]b [link=https://attacker.example]x[/link] \x1b[2J\x1b]8;;https://e\x07y\x1b]8;;\x07\r\nFORGED\t"
    "\x00\x7f\x85\x9b \u202egnp.exe \u2066\u2069 \u200b\ufeff \u2028\u2029 \U000e0041 :skull:"
)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("key_8f2c", "key_8f2c"),
        (
            "python-requests/2.32 (C:\\temp) [x] <b> ünïcode 密钥 🙂",
            "python-requests/2.32 (C:\\temp) [x] <b> ünïcode 密钥 🙂",
        ),
        ("a\nb\rc\td", "a\\nb\\rc\\td"),
        ("\x1b[2J", "\\x1b[2J"),
        ("\x00\x7f\x85\x9b", "\\x00\\x7f\\x85\\x9b"),
        ("\u202egnp.exe\u2066\u2069", "\\u202egnp.exe\\u2066\\u2069"),
        ("zero\u200bwidth\ufeff", "zero\\u200bwidth\\ufeff"),
        ("line\u2028para\u2029", "line\\u2028para\\u2029"),
        ("tag\U000e0041", "tag\\U000e0041"),
        ("\u00a0no-break space stays", "\u00a0no-break space stays"),
    ],
)
def test_visible_shows_every_hidden_character_as_its_escape_and_leaves_the_rest(
    text: str, shown: str
) -> None:
    assert visible(text) == shown


def test_visible_is_one_printable_line_and_a_second_pass_changes_nothing() -> None:
    shown = visible(HOSTILE)
    assert shown.isprintable() and len(shown.splitlines()) == 1
    assert visible(shown) == shown
    assert shown.startswith("a[/]b [link=https://attacker.example]x[/link] \\x1b[2J")


def test_terminal_text_is_never_read_as_markup_or_emoji() -> None:
    console = Console(record=True, width=400, color_system="truecolor", force_terminal=True)
    console.print(terminal_text(HOSTILE))  # `[/]` would raise MarkupError if it were parsed
    text = console.export_text()
    assert "[link=https://attacker.example]x[/link]" in text and ":skull:" in text
    assert "\x1b]8;" not in console.export_text(styles=True)
    assert visible(HOSTILE) in text


def test_json_line_is_printable_and_parses_back_to_the_value() -> None:
    value = {"client": HOSTILE, "nested": [HOSTILE, {"k\u202e": 1.5}], "plain": "key_8f2c", "none": None}
    line = json_line(value)
    assert line.isprintable()
    assert orjson.loads(line) == value
    assert json_line({"plain": "key_8f2c"}) == '{"plain":"key_8f2c"}'


def test_shorten_cuts_with_an_ellipsis_within_the_limit() -> None:
    assert shorten("abc", 3) == "abc"
    assert shorten("abcd", 3) == "ab…"
    assert len(shorten("x" * 10_000, 256)) == 256
