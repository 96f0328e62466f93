"""JSON Lines source: files (or stdin, as `-`), read in batches of raw records with their file and line."""

from __future__ import annotations

import sys
import time
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from detector.domain import Origin, RawRecord

STDIN = "-"
# A batch stops growing at this many bytes of records, as a Kafka fetch does (`kafka.fetch_max_bytes`'s
# default): records of megabytes (batches of images) must not make a batch of thousands of lines gigabytes.
MAX_BATCH_BYTES = 64 * 1024 * 1024
# The rest of a line too long to be a record is skipped in reads of this size.
SKIP_CHUNK_BYTES = 1024 * 1024


def _open(path: str) -> BinaryIO:
    return sys.stdin.buffer if path == STDIN else Path(path).open("rb")


def _lines(stream: BinaryIO, max_line_bytes: int | None) -> Iterator[tuple[bytes, int | None]]:
    """Each line of `stream` without its line break, and None; or, for a line longer than
    `max_line_bytes`, its first bytes (just past the limit) and its full size: the rest is skipped, never
    held in memory whole."""
    if max_line_bytes is None:
        for line in stream:
            yield line.rstrip(b"\r\n"), None
        return
    cap = max_line_bytes + 3  # room for a line one byte too long and its "\r\n": its size is told exactly
    while line := stream.readline(cap):
        if len(line) < cap or line.endswith(b"\n"):
            yield line.rstrip(b"\r\n"), None
            continue
        size, tail = len(line), line[-2:]
        while not tail.endswith(b"\n"):
            rest = stream.readline(SKIP_CHUNK_BYTES)
            if not rest:
                break
            size, tail = size + len(rest), (tail + rest)[-2:]  # a "\r\n" may straddle two reads
        yield line, size - (len(tail) - len(tail.rstrip(b"\r\n")))


def read_jsonl_batches(
    paths: Sequence[str],
    batch_size: int,
    max_bytes: int = MAX_BATCH_BYTES,
    max_line_bytes: int | None = None,
) -> Generator[list[RawRecord], None, None]:
    """Yield the non-blank lines of `paths`, in order, as batches of at most `batch_size` raw records; a
    batch ends early once its records reach `max_bytes` (a single longer record is a batch of its own).
    A line longer than `max_line_bytes` (no bound by default) is a record of its first bytes, with its
    full size (`RawRecord.size`), which the decoder rejects as too large.

    Lines are kept as bytes: decoding (and rejecting what is not UTF-8 JSON) is the decoder's job.
    """
    batch: list[RawRecord] = []
    size = 0
    for path in paths:
        stream = _open(path)
        try:
            for line_number, (value, full_size) in enumerate(_lines(stream, max_line_bytes), start=1):
                if full_size is None and not value.strip():
                    continue  # blank (a line cut past the limit is a record, whatever its first bytes)
                origin = Origin("file", path, 0, line_number)
                batch.append(RawRecord(value, None, origin, time.time(), full_size))
                size += len(value)
                if len(batch) >= batch_size or size >= max_bytes:
                    yield batch
                    batch, size = [], 0
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


class FileSource:
    """JSON Lines files as a source (`detector.ingest.source.Source`): each `poll` reads the next batch of at
    most `batch_size` records; `exhausted` once every file has been read. While held, `poll` waits
    `hold_seconds` and reads nothing: a file can wait, it has no group membership to keep alive."""

    def __init__(
        self,
        paths: Sequence[str],
        batch_size: int,
        hold_seconds: float = 0.5,
        max_line_bytes: int | None = None,
    ) -> None:
        self._batches = read_jsonl_batches(paths, batch_size, max_line_bytes=max_line_bytes)
        self._hold_seconds = hold_seconds
        self._held = False
        self.exhausted = False

    @property
    def assigned(self) -> bool:
        """Always: a file has no group to join."""
        return True

    def poll(self) -> list[RawRecord]:
        """The next batch; [] while held or once exhausted."""
        if self._held:
            time.sleep(self._hold_seconds)
            return []
        batch = next(self._batches, None)
        if batch is None:
            self.exhausted = True
            return []
        return batch

    def hold(self, held: bool) -> None:
        """Stop (True) or resume (False) reading."""
        self._held = held

    def lag(self) -> dict[tuple[str, int], int]:
        """Nothing to report: a file has no partitions."""
        return {}

    def left_to_read(self) -> dict[tuple[str, int], int] | None:
        """Nothing by partition: a file has none (it is read to its end, `exhausted`)."""
        return {}

    def close(self) -> None:
        """Stop reading (the open file closes with its generator)."""
        self._batches.close()
