"""The stream's event time: the slowest partition still being read, never moved far by one forged stamp."""

from __future__ import annotations

from detector.eventtime import Watermark

A, B, C = ("logs", 0), ("logs", 1), ("logs", 2)


def test_the_watermark_is_the_slowest_partition_being_read_and_never_goes_back() -> None:
    watermark = Watermark(max_skew_seconds=None)
    assert watermark.value is None
    watermark.observe(1000.0, 0.0, A)
    watermark.observe(5000.0, 0.0, B)  # a partition read ahead of the other
    assert watermark.value == 1000.0
    watermark.observe(2000.0, 0.0, A)
    assert watermark.value == 2000.0
    watermark.lag({A: 0, B: 7})  # A read to its end: it holds nothing back
    assert watermark.value == 5000.0
    watermark.observe(3000.0, 0.0, A)  # new events on it hold the watermark again, but never back
    assert watermark.value == 5000.0
    watermark.observe(7000.0, 0.0, A)
    watermark.observe(6000.0, 0.0, B)
    assert watermark.value == 6000.0
    watermark.lag({A: 0, B: 0})
    assert watermark.value == 7000.0  # every partition read to its end: the newest of all


def test_a_partition_with_records_not_read_yet_holds_the_watermark_where_it_is() -> None:
    watermark = Watermark(max_skew_seconds=None)
    watermark.observe(1000.0, 0.0, A)
    assert watermark.value == 1000.0
    watermark.lag({A: 500, B: 9000})  # B has records, none read yet: they may be the oldest
    watermark.observe(8000.0, 0.0, A)
    assert watermark.value == 1000.0
    watermark.observe(2000.0, 0.0, B)
    assert watermark.value == 2000.0


def test_revoked_partitions_are_forgotten_and_the_value_kept() -> None:
    watermark = Watermark(max_skew_seconds=None)
    watermark.observe(1000.0, 0.0, A)
    watermark.observe(9000.0, 0.0, B)
    watermark.release()
    assert watermark.value == 1000.0
    watermark.observe(4000.0, 0.0, C)
    assert watermark.value == 4000.0


def test_a_stamp_ahead_of_its_receipt_moves_the_watermark_only_to_receipt_plus_skew() -> None:
    watermark = Watermark(max_skew_seconds=60.0)
    watermark.observe(10_000_000.0, 1000.0)
    assert watermark.value == 1060.0
