"""JSON Lines source: files (or stdin, as `-`), read in batches of raw records with their file and line."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from detector.ingest.records import Origin, RawRecord

STDIN = "-"


def _open(path: str) -> BinaryIO:
    return sys.stdin.buffer if path == STDIN else Path(path).open("rb")


def read_jsonl_batches(paths: Sequence[str], batch_size: int) -> Iterator[list[RawRecord]]:
    """Yield the non-blank lines of `paths`, in order, as batches of at most `batch_size` raw records.

    Lines are kept as bytes: decoding (and rejecting what is not UTF-8 JSON) is the decoder's job.
    """
    batch: list[RawRecord] = []
    for path in paths:
        stream = _open(path)
        try:
            for line_number, line in enumerate(stream, start=1):
                value = line.rstrip(b"\r\n")
                if not value.strip():
                    continue
                batch.append(RawRecord(value, None, Origin("file", path, 0, line_number), time.time()))
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()
    if batch:
        yield batch


def total_bytes(paths: Sequence[str]) -> int | None:
    """The combined size of `paths` for a progress bar, or None when reading stdin."""
    if STDIN in paths:
        return None
    return sum(Path(path).stat().st_size for path in paths)
