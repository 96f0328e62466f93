"""Reading training rows from the files data scientists have: `.npy` arrays, CSV with a header, JSON Lines.

Every problem is reported as one line naming the file and the offending line or column.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def load_training_rows(path: Path) -> np.ndarray:
    """The training rows in `path` as a float64 [n, d] matrix (n, d >= 1, all values finite).

    Reads by suffix: `.npy` (a 2-D numeric array, never unpickled), `.csv` (a header row, then numbers only),
    `.jsonl` / `.ndjson` (one row a line: an array of numbers, or an object name -> number, columns in sorted
    name order, every line with the same names). Raises `ValueError` with a one-line message naming the file
    and the offending line or column for anything else.
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            matrix, columns = _read_npy(path)
        elif suffix == ".csv":
            matrix, columns = _read_csv(path)
        elif suffix in (".jsonl", ".ndjson"):
            matrix, columns = _read_json_lines(path)
        else:
            raise ValueError(
                f"{path}: unsupported file type {suffix or '(none)'!r}; expected .npy, .csv or .jsonl"
            )
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"{path}: no training rows")
    bad = np.argwhere(~np.isfinite(matrix))
    if bad.size:
        row, column = (int(i) for i in bad[0])
        raise ValueError(f"{path}: non-finite value in row {row + 1}, column {columns[column]}")
    return matrix


def _read_npy(path: Path) -> tuple[np.ndarray, list[str]]:
    with path.open("rb") as handle:  # our own handle: np.load would leave its own open on an npz
        try:
            array = np.load(handle, allow_pickle=False)
        except (ValueError, EOFError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
            raise ValueError(f"{path}: not a numeric .npy array ({reason})") from exc
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{path}: not a .npy array")
    if array.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D array of rows, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{path}: expected a numeric array, got dtype {array.dtype}")
    return array.astype(np.float64), [str(i) for i in range(array.shape[1])]


def _read_csv(path: Path) -> tuple[np.ndarray, list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            raise ValueError(f"{path}: empty file (expected a header row)")
        rows: list[list[float]] = []
        for fields in reader:
            if not fields:
                continue  # a blank line
            if len(fields) != len(header):
                raise ValueError(
                    f"{path}: line {reader.line_num} has {len(fields)} fields, the header {len(header)}"
                )
            rows.append(
                [_csv_number(path, reader.line_num, name, f) for name, f in zip(header, fields, strict=True)]
            )
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(header)), header


def _csv_number(path: Path, line: int, column: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{path}: column {column!r} is not numeric (line {line}: {text!r})") from None


def _read_json_lines(path: Path) -> tuple[np.ndarray, list[str]]:
    rows: list[list[float]] = []
    names: list[str] | None = None  # set when the rows are objects
    for line, value in _json_lines(path):
        if isinstance(value, dict) and (names is not None or not rows):
            if names is None:
                names = sorted(value)
            if sorted(value) != names:
                raise ValueError(f"{path}: line {line} has keys {sorted(value)}, the first row {names}")
            values = [value[name] for name in names]
        elif isinstance(value, list) and names is None:
            if rows and len(value) != len(rows[0]):
                raise ValueError(f"{path}: line {line} has {len(value)} values, the first row {len(rows[0])}")
            values = value
        else:
            raise ValueError(
                f"{path}: line {line} is not a row like the first (an array or object of numbers)"
            )
        rows.append([_json_number(path, line, v) for v in values])
    width = len(rows[0]) if rows else 0
    return np.array(rows, dtype=np.float64).reshape(len(rows), width), names or [str(i) for i in range(width)]


def _json_number(path: Path, line: int, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{path}: line {line} holds {json.dumps(value)[:40]}, not a number")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{path}: line {line} holds an integer beyond float range") from None


def _json_lines(path: Path) -> Iterator[tuple[int, object]]:
    with path.open(encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
