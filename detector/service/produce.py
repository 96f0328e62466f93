"""`produce`: publish a JSON Lines file to a topic, keyed by client id."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import orjson

from detector.domain import RawRecord
from detector.ingest.jsonl import read_jsonl_batches
from detector.kafka import KafkaPublisher
from detector.settings import Settings


def client_key(line: bytes) -> bytes | None:
    """The Kafka key of a query-log record: its client id, so that a client's events share a partition."""
    try:
        record = orjson.loads(line)
        client_id = record["client"]["id"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None  # still produced: the consumer dead-letters it with the precise reason
    return str(client_id).encode() if client_id is not None else None


class LinesNotSent(Exception):
    """Lines of a file too long for any message the topic takes, not sent; every other line was (`sent`
    of them). Its message names each line left out (`lines`: line number and size), the first `SHOWN`."""

    SHOWN = 5

    def __init__(self, path: Path, sent: int, lines: list[tuple[int, int]], bound: int) -> None:
        shown = ", ".join(f"line {number} ({size:,} bytes)" for number, size in lines[: self.SHOWN])
        more = f" and {len(lines) - self.SHOWN} more" if len(lines) > self.SHOWN else ""
        super().__init__(
            f"{len(lines)} line(s) of {path} longer than the {bound:,} bytes a message may carry "
            f"(MIA_INGEST_MAX_RECORD_BYTES and Kafka's framing) not sent: {shown}{more}; "
            f"the other {sent} were"
        )


def produce_file(
    settings: Settings, path: Path, topic: str, progress: Callable[[list[RawRecord]], None] | None = None
) -> int:
    """Publish every non-blank line of a JSON Lines file to `topic`, keyed by client id; return the count.

    Lines over the detector's record limit (`ingest.max_record_bytes`) are sent: the daemon dead-letters
    them, naming their sender. A line too long for any message the topic takes (see
    `KafkaPublisher.max_value_bytes`) is read only to past that bound and not sent: the rest of the file
    is, then `LinesNotSent` names the lines left out.
    """
    publisher = KafkaPublisher(settings.kafka, max_message_bytes=settings.ingest.max_record_bytes)
    bound = publisher.max_value_bytes
    sent = 0
    too_large: list[tuple[int, int]] = []  # (line number, size): a cut line's first bytes are not kept
    try:
        for batch in read_jsonl_batches([str(path)], 5000, max_line_bytes=bound):
            for record in batch:
                if record.full_size is not None:
                    too_large.append((record.origin.position, record.full_size))
                    continue
                publisher.send(topic, record.value, client_key(record.value))
                sent += 1
            publisher.flush()
            if progress is not None:
                progress(batch)
    finally:
        publisher.close()
    if too_large:
        raise LinesNotSent(path, sent, too_large, bound)
    return sent
