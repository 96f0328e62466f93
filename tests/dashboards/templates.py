"""Grafana's template variables in dashboard text, as its template service finds them: `$name`,
`${name}`, `${name:format}` and the old `[[name]]`."""

from __future__ import annotations

import re

VARIABLE = re.compile(r"\$\{(\w+)(?:[:.][^}]*)?\}|\$(\w+)|\[\[(\w+)(?::\w+)?\]\]")


def variable_name(match: re.Match[str]) -> str:
    """The variable a `VARIABLE` match refers to."""
    return next(group for group in match.groups() if group)


def variables_in(text: str) -> set[str]:
    """The template variables `text` refers to, Grafana's built-ins (`$__interval`, `${__value.raw}`, ...)
    left out."""
    names = {variable_name(match) for match in VARIABLE.finditer(text)}
    return {name for name in names if not name.startswith("__")}
