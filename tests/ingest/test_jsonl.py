from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from detector.ingest import jsonl
from detector.ingest.jsonl import read_jsonl_batches
from detector.service import replay
from detector.settings import load_settings
from detector.storage import open_store


def write_lines(path: Path, sizes: list[int]) -> None:
    """One line of `size` bytes per size (a blank line between each), each line unique."""
    path.write_bytes(
        b"".join(f"{index:06d}".encode().ljust(size, b"x") + b"\n\n" for index, size in enumerate(sizes))
    )


def test_batches_hold_at_most_the_count_asked_and_skip_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    write_lines(path, [10] * 7)
    batches = list(read_jsonl_batches([str(path)], 3))
    assert [len(batch) for batch in batches] == [3, 3, 1]
    records = [record for batch in batches for record in batch]
    assert [record.origin.position for record in records] == [1, 3, 5, 7, 9, 11, 13]
    assert [record.value[:6] for record in records] == [f"{index:06d}".encode() for index in range(7)]


def test_a_batch_ends_once_its_records_reach_the_byte_budget(tmp_path: Path) -> None:
    # Records of megabytes (batches of images) must not gather thousands to a batch.
    path = tmp_path / "images.jsonl"
    write_lines(path, [400, 400, 400, 100, 100, 900, 50])
    batches = list(read_jsonl_batches([str(path)], 1000, max_bytes=1000))
    assert [[len(record.value) for record in batch] for batch in batches] == [
        [400, 400, 400],
        [100, 100, 900],
        [50],
    ]


def test_a_line_longer_than_any_record_is_cut_past_the_limit_and_keeps_its_size(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"short\n" + b"y" * 5_000_000 + b"\r\nnext\n" + b"z" * 1001 + b"\n" + b"w" * 1002)
    records = [
        record for batch in read_jsonl_batches([str(path)], 100, max_line_bytes=1000) for record in batch
    ]
    assert [record.origin.position for record in records] == [1, 2, 3, 4, 5]
    assert [record.size for record in records] == [5, 5_000_000, 4, 1001, 1002]
    assert [len(record.value) for record in records] == [5, 1003, 4, 1001, 1002]
    assert records[2].value == b"next" and [record.full_size for record in records[2:]] == [None] * 3


def test_reading_a_line_of_gigabytes_holds_a_record_past_the_limit_not_the_line(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as out:
        for _ in range(64):
            out.write(b"9" * 1024 * 1024)
        out.write(b"\n{}\n")
    tracemalloc.start()
    records = [
        record for batch in read_jsonl_batches([str(path)], 100, max_line_bytes=65_536) for record in batch
    ]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [record.size for record in records] == [64 * 1024 * 1024, 2]
    assert peak < 8 * 1024 * 1024, f"peak {peak / 2**20:.0f} MiB reading a 64 MiB line"


def test_a_replayed_line_too_long_is_a_dead_letter_with_its_full_size(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"event_id": "' + b"x" * 3000 + b'"}\n')
    settings = load_settings(
        None,
        database={"url": f"sqlite:///{tmp_path / 'mia.db'}"},
        metrics={"addr": ""},
        ingest={"max_record_bytes": 1000},
    )
    stats = replay(settings, [str(path)])
    with open_store(settings) as store:
        (letter,) = store.list_dead_letters()
    assert stats.dead_letters == {"record_too_large": 1}
    assert letter.raw_size == 3016 and "record is 3016 bytes" in letter.detail


def test_a_cut_line_is_a_record_whatever_its_first_bytes_and_its_size_is_exact_across_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Skipped in reads of 4 bytes, so that a "\r\n" straddles two of them.
    monkeypatch.setattr(jsonl, "SKIP_CHUNK_BYTES", 4)
    path = tmp_path / "events.jsonl"
    lines = [b" " * 1010 + b'{"a": 1}', b"x" * 1001, b"y" * 1013, b"ok"]
    path.write_bytes(b"".join(line + b"\r\n" for line in lines))
    records = [
        record for batch in read_jsonl_batches([str(path)], 100, max_line_bytes=1000) for record in batch
    ]
    assert [record.origin.position for record in records] == [1, 2, 3, 4]
    assert [record.size for record in records] == [len(line) for line in lines]
