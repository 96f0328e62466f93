"""Allow-list files: TOML in the configuration's own allow-list format, one `[[detection.allowlist]]` table
per entry (`client_id`, optional `kind`, `reason`), so that an entry can also be pasted into a configuration
file. `mia-detector train` writes the ones it suggests; `MIA_DETECTION_ALLOWLIST_FILE` loads one, once an
operator has reviewed it."""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detector.domain import AllowEntry
from detector.text import visible

TABLE = "detection.allowlist"


def read_allowlist_file(path: Path) -> list[dict[str, Any]]:
    """The entries of the allow-list file at `path`, as tables (their fields are the caller's to check).

    Raises `ValueError` with one line naming the file when it cannot be read or is not an allow-list file.
    """
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read allow-list file {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"allow-list file {path} is not TOML: {str(exc).splitlines()[0]}") from None
    detection = document.get("detection", {})
    entries = detection.get("allowlist", []) if isinstance(detection, dict) else None
    if (
        set(document) - {"detection"}
        or not isinstance(detection, dict)
        or set(detection) - {"allowlist"}
        or not isinstance(entries, list)
        or not all(isinstance(entry, dict) for entry in entries)
    ):
        raise ValueError(f"allow-list file {path}: expected only [[{TABLE}]] tables")
    return entries


def toml_string(text: str) -> str:
    """`text` as a TOML basic string, read back as the same text; every control or format character is
    escaped, so the file shows no hidden text (a lone surrogate, which TOML cannot hold, becomes U+FFFD)."""
    return '"' + "".join(_toml_char(char) for char in text) + '"'


def _toml_char(char: str) -> str:
    if char in '"\\':
        return "\\" + char
    if char.isprintable():
        return char
    code = ord(char)
    if 0xD800 <= code <= 0xDFFF:
        return "\\ufffd"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def allowlist_document(
    entries: Sequence[AllowEntry], header: Sequence[str] = (), notes: Sequence[str] = ()
) -> str:
    """An allow-list file holding `entries`, with `header` lines as comments on top and, when given, one
    comment line per entry (`notes`, in the same order) above it."""
    lines = [f"# {visible(line)}".rstrip() for line in header]
    for index, entry in enumerate(entries):
        lines.append("")
        if index < len(notes):
            lines.append(f"# {visible(notes[index])}")
        lines.append(f"[[{TABLE}]]")
        lines.append(f"client_id = {toml_string(entry.client_id)}")
        if entry.kind is not None:
            lines.append(f"kind = {toml_string(entry.kind.value)}")
        lines.append(f"reason = {toml_string(entry.reason)}")
    return "\n".join(lines) + "\n"
