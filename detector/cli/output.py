"""What every command group prints with: the consoles, listings as tables or JSON Lines, progress bars."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.progress import ProgressColumn, Task
from rich.text import Text

from detector.text import json_line, terminal_text

if TYPE_CHECKING:
    from detector.domain import RawRecord

# What is printed quotes client ids, model names and other text from the prediction API's callers: rich must
# never read it as markup (`[link=...]`, or a `[/]` that ends the program) or emoji codes. Such text is also
# shown through `visible`, or as `terminal_text` in tables, so that no control character reaches the terminal.
# Lines on stderr are never broken at the console's width: log lines (which a progress bar passes through
# this console) must stay one line each.
stderr = Console(stderr=True, markup=False, emoji=False, soft_wrap=True)
# Piped listings keep whole values instead of being squeezed to 80 columns.
stdout = Console(markup=False, emoji=False, width=None if sys.stdout.isatty() else 240)


class OutputFormat(StrEnum):
    """How listings are printed."""

    TABLE = "table"
    JSONL = "jsonl"


FORMAT_OPTION = click.option(
    "--format",
    "fmt",
    type=click.Choice([f.value for f in OutputFormat]),
    default=OutputFormat.TABLE.value,
    show_default=True,
    help="Table for people, JSON Lines for scripts.",
)
LIMIT_OPTION = click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="At most this many, newest first.",
)


def print_rows(rows: Iterable[dict[str, Any]], fmt: str, columns: list[str], title: str) -> None:
    """`rows` as JSON Lines (each line exactly its row, every character printable: `json_line`), or as a
    table of `columns`, every cell shown as `terminal_text` shows it."""
    if fmt == OutputFormat.JSONL:
        out = sys.stdout.buffer
        for row in rows:
            out.write(json_line(row).encode() + b"\n")
        out.flush()
        return
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(terminal_text("" if row[column] is None else str(row[column])) for column in columns))
    stdout.print(table)


class _RecordRate(ProgressColumn):
    """`12,345 records, 6,789/s`: the records counted so far and their rate since the start."""

    def render(self, task: Task) -> Text:
        records = task.fields.get("records", 0)
        rate = records / task.elapsed if task.elapsed else 0.0
        return Text(f"{records:,} records, {rate:,.0f}/s")


@contextmanager
def progress(
    description: str, total: int | None, unit_bytes: bool
) -> Iterator[Callable[[list[RawRecord]], None]]:
    """A progress bar on stderr (hidden when stderr is not a terminal) with the records read, their rate and,
    when `total` is known, the time left; yields `advance(records)`, which moves the bar by the records'
    bytes (with their newlines) when `unit_bytes`, else by their count."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [
        TextColumn(description),
        BarColumn(),
        _RecordRate(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    hidden = not stderr.is_terminal
    with Progress(*columns, console=stderr, disable=hidden, transient=True) as bar:
        task = bar.add_task(description, total=total, records=0)
        seen = 0

        def advance(records: list[RawRecord]) -> None:
            nonlocal seen
            seen += len(records)
            amount = sum(len(r.value) + 1 for r in records) if unit_bytes else len(records)
            bar.update(task, advance=amount, records=seen)

        yield advance
