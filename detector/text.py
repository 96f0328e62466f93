"""Text from outside made safe for where it is shown: a terminal, a log line, a JSON line, a notification.

Client ids, model names, user agents, IPs and event ids come from the callers of a public prediction API, and
so do the alert titles, reasons and evidence built from them. Shown as they are, a newline forges a log line,
an escape sequence clears the terminal or plants a hyperlink in it, a bidirectional override makes
`exe.txt` read as `txt.exe`, and rich markup (`[link=...]`) is parsed, or fails to parse and ends the
program. Everything shown goes through one of these functions:

- `visible`: the text on one line, every control, format or separator character shown as an escape (`\\x1b`,
  `\\n`, `\\u202e`); printable text is left as it is, so an ordinary id reads and copies unchanged;
- `terminal_text`: `visible` as a rich `Text`, which rich never parses for markup or emoji codes;
- `json_line`: a value as one line of JSON holding only printable characters, exactly the same value once
  parsed;
- `shorten`: at most so many characters, for receivers that limit their fields.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from typing import Any

import orjson
from rich.text import Text

# Control characters (C0, DEL, C1), format characters (bidirectional overrides and isolates, zero-width
# characters, the byte-order mark), lone surrogates, and the line and paragraph separators that some
# viewers break lines at.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
ELLIPSIS = "…"


def _hidden(char: str) -> bool:
    return unicodedata.category(char) in _HIDDEN_CATEGORIES


def _escape(char: str) -> str:
    """`char` as Python writes it in a string literal: `\\n`, `\\x1b`, `\\u202e`, `\\U000e0001`."""
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _json_escape(char: str) -> str:
    """`char` as a JSON string escape (a surrogate pair beyond the Basic Multilingual Plane)."""
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def visible(text: str) -> str:
    """`text` on one line with nothing hidden: every control character (C0 such as ESC, CR and LF, DEL,
    C1), format character (bidirectional overrides U+202A-U+202E and isolates U+2066-U+2069, zero-width
    characters), lone surrogate and line or paragraph separator is replaced by its escape as in a Python
    string literal (`\\x1b`, `\\n`, `\\u202e`). Printable text, backslashes included, is returned unchanged,
    and so is the result when passed again."""
    if text.isprintable():
        return text
    return "".join(_escape(char) if _hidden(char) else char for char in text)


def terminal_text(text: str) -> Text:
    """`visible(text)` as a rich `Text`: printed by rich, in a table cell or alone, it is never parsed as
    markup (`[link=...]`, `[/]`) nor as emoji codes, and shows as it reads."""
    return Text(visible(text))


def shorten(text: str, limit: int) -> str:
    """`text` if it has at most `limit` characters, else its first `limit - 1` and `…`."""
    if len(text) <= limit:
        return text
    return text[: max(limit - 1, 0)] + ELLIPSIS


def json_line(value: Any, *, default: Callable[[Any], Any] | None = None) -> str:
    """`value` as one line of JSON (no newline at the end) in which every character is printable: on top of
    what JSON escapes anyway, DEL, C1 controls, format characters and line separators inside strings are
    written as `\\uXXXX`, so the line parses back to exactly `value`. `default` converts what orjson cannot
    serialise."""
    encoded = orjson.dumps(value, default=default).decode()
    if encoded.isprintable():
        return encoded
    # Outside strings, orjson writes nothing but ASCII punctuation, digits and letters: every hidden
    # character is inside a string, where its escape stands for the same character.
    return "".join(_json_escape(char) if _hidden(char) else char for char in encoded)
