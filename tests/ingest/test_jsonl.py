from __future__ import annotations

from pathlib import Path

from detector.ingest.jsonl import read_jsonl_batches


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
