from __future__ import annotations

from detector.kafka import message_limit
from detector.kafka.clients import MESSAGE_OVERHEAD_BYTES
from detector.settings import IngestSettings


def test_a_message_carries_the_largest_record_the_detector_reads_with_room_for_framing() -> None:
    limit = IngestSettings().max_record_bytes
    assert limit < message_limit(limit) <= limit + MESSAGE_OVERHEAD_BYTES


def test_a_lower_record_limit_does_not_lower_the_message_size_below_kafkas_default() -> None:
    # Records over the detector's limit must reach it, to become dead letters, rather than be refused.
    assert message_limit(4096) == 1024 * 1024
