"""The pipeline against hostile input: every rejected record becomes a dead letter with the decoder's reason
and the stream goes on; a flood of fresh client ids (one per request) leaves memory bounded and shows in the
churn metrics."""

from __future__ import annotations

import gc
import resource
import time
import tracemalloc
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from detector.domain import DeadLetter, DeadLetterReason, InvalidRecord, Origin, RawRecord
from detector.ingest import RecordDecoder
from detector.metrics import Metrics
from detector.pipeline import Outputs, Pipeline
from detector.service import build_pipeline
from detector.simulate.sample import oip_record
from detector.storage import Store, open_store
from tests.hostile import RECEIVED_AT, MiB, check_rejection, strategies
from tests.support import make_settings

# A failing example of hostile input is often large: let hypothesis print it rather than warn about it.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
TOPIC = "logs"


@dataclass
class Recorder:
    """The source's positions and the dead-letter topic."""

    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    published: list[DeadLetter] = field(default_factory=list)

    def commit(self, positions: Mapping[tuple[str, int], int]) -> None:
        self.committed.update(positions)

    def publish(self, letters: Sequence[DeadLetter]) -> None:
        self.published += letters


@dataclass
class Wired:
    pipeline: Pipeline
    recorder: Recorder
    store: Store
    metrics: Metrics
    offsets: Iterator[int] = field(default_factory=count)

    def records(self, values: Sequence[bytes]) -> list[RawRecord]:
        return [
            RawRecord(value, None, Origin("kafka", TOPIC, 0, next(self.offsets)), RECEIVED_AT)
            for value in values
        ]


@pytest.fixture(scope="module")
def wired() -> Iterator[Wired]:
    """One pipeline for the whole module, like a daemon's: every example feeds the same stream."""
    settings = make_settings("sqlite://", commit={"min_records": 1_000_000, "min_interval_seconds": 3600.0})
    with open_store(settings) as store:
        recorder, metrics = Recorder(), Metrics()
        outputs = Outputs(positions=recorder, dead_letters=recorder)
        yield Wired(build_pipeline(settings, store, metrics, outputs=outputs), recorder, store, metrics)


_valid = count()


def valid_record() -> bytes:
    """A record no example has sent before (its own event id): it must always get through."""
    index = next(_valid)
    rows = np.full((1, 4), index % 7, dtype=np.float32)
    return orjson.dumps(
        oip_record(f"valid-{index}", RECEIVED_AT - 60.0, "steady", rows, np.array([[0.4, 0.6]]))
    )


@given(st.lists(strategies().records, min_size=1, max_size=6))
def test_every_rejection_is_a_dead_letter_with_its_reason_and_the_stream_goes_on(
    wired: Wired, hostile: list[bytes]
) -> None:
    # What the decoder alone says of each record (a fresh decoder: it keeps no state).
    decoder = RecordDecoder(make_settings("sqlite://").ingest)
    expected: dict[int, DeadLetterReason | None] = {}
    values = [*hostile, valid_record()]
    records = wired.records(values)
    for record in records:
        try:
            decoder.decode(record)
            expected[record.origin.position] = None
        except InvalidRecord as error:
            check_rejection(error)
            expected[record.origin.position] = error.reason
    published_before = len(wired.recorder.published)
    seen_before = wired.store.count_seen_events()

    wired.pipeline.submit(records)
    wired.pipeline.commit()

    letters = {letter.origin.position: letter for letter in wired.recorder.published[published_before:]}
    for position, reason in expected.items():
        if reason is not None:
            assert letters[position].reason is reason
            assert letters[position].origin.describe() == f"kafka:{TOPIC}/0@{position}"
        elif position in letters:  # decodable, but another record already used its event id
            assert letters[position].reason is DeadLetterReason.CONFLICTING_DUPLICATE
    assert wired.recorder.committed[(TOPIC, 0)] == records[-1].origin.position + 1
    assert wired.pipeline.uncommitted_records == 0
    assert wired.store.count_seen_events() > seen_before  # the valid record at the end got through
    stored = wired.store.dead_letter_counts()
    assert sum(stored.values()) == len(wired.recorder.published)


# -- a flood of fresh client ids ----------------------------------------------------------------------------

FLOOD_CLIENTS = 200_000
WARM_UP = 120_000  # the trackers fill after a few thousand; SQLite's cache and the allocator take longer
TRACED = 40_000  # the last clients, sent with tracemalloc on
BATCH = 500


def flood(start: int, stop: int) -> Iterator[list[bytes]]:
    """Single-row records from clients `start`..`stop`, one record each, a batch at a time."""
    rng = np.random.default_rng(start)
    for first in range(start, stop, BATCH):
        rows = rng.normal(size=(BATCH, 8)).astype(np.float32)
        yield [
            orjson.dumps(
                oip_record(
                    f"flood-{index}",
                    RECEIVED_AT - 3000.0 + index * 0.01,
                    f"fresh-key-{index}",
                    rows[index - first : index - first + 1],
                    np.array([[0.5, 0.5]]),
                )
            )
            for index in range(first, min(first + BATCH, stop))
        ]


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def test_fresh_client_ids_show_in_the_churn_metrics() -> None:
    settings = make_settings("sqlite://", detection={"max_clients": 10})
    with open_store(settings) as store:
        metrics = Metrics()
        pipeline = build_pipeline(settings, store, metrics)
        offsets = count()

        def send(values: list[bytes]) -> None:
            origins = (Origin("kafka", TOPIC, 0, offset) for offset in offsets)
            pipeline.submit([RawRecord(value, None, next(origins), RECEIVED_AT) for value in values])
            pipeline.commit()

        send(next(flood(0, 30)))
        value = metrics.registry.get_sample_value
        assert value("mia_detector_tracked_clients") == 10
        assert (value("mia_detector_new_clients_total"), value("mia_detector_client_evictions_total")) == (
            30,
            20,
        )
        # A tracked client's next request is not a new client; an evicted one's is.
        again = next(flood(29, 30))[0].replace(b"flood-29", b"flood-29-again")
        evicted = next(flood(0, 1))[0].replace(b"flood-0", b"flood-0-again")
        send([again])
        assert (value("mia_detector_new_clients_total"), value("mia_detector_client_evictions_total")) == (
            30,
            20,
        )
        send([evicted])
        assert (value("mia_detector_new_clients_total"), value("mia_detector_client_evictions_total")) == (
            31,
            21,
        )
        assert value("mia_detector_tracked_clients") == 10


@pytest.mark.slow
def test_a_flood_of_fresh_client_ids_keeps_memory_bounded_and_shows_in_the_metrics(tmp_path: Path) -> None:
    max_sessions, max_clients = 5_000, 2_000
    # A database file: an in-memory one would hold every session and event id in this process's memory.
    settings = make_settings(
        f"sqlite:///{tmp_path / 'flood.db'}",
        commit={"min_records": 10_000, "min_interval_seconds": 3600.0},
        sessions={"max_active": max_sessions},
        detection={"max_clients": max_clients},
    )
    with open_store(settings) as store:
        metrics = Metrics()
        pipeline = build_pipeline(settings, store, metrics, group_id="flood")
        offsets = count()

        def send(start: int, stop: int) -> None:
            for values in flood(start, stop):
                pipeline.submit(
                    [
                        RawRecord(value, None, Origin("kafka", TOPIC, 0, next(offsets)), RECEIVED_AT)
                        for value in values
                    ]
                )
            pipeline.commit()

        started = time.perf_counter()
        send(0, WARM_UP)
        gc.collect()
        rss_warm = rss_bytes()
        send(WARM_UP, FLOOD_CLIENTS - TRACED)
        gc.collect()
        rss_end = rss_bytes()
        tracemalloc.start()
        send(FLOOD_CLIENTS - TRACED, FLOOD_CLIENTS)
        gc.collect()
        retained, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        seconds = time.perf_counter() - started

        tracker = pipeline.detect.tracker
        assert len(tracker) == max_clients and len(pipeline.sessions) <= max_sessions
        assert len(pipeline.detect.coordination) == 0
        value = metrics.registry.get_sample_value
        assert value("mia_detector_tracked_clients") == max_clients
        assert value("mia_detector_new_clients_total") == FLOOD_CLIENTS
        assert value("mia_detector_client_evictions_total") == FLOOD_CLIENTS - max_clients
        assert value("mia_detector_queries_total") == FLOOD_CLIENTS
        # Fresh clients beyond the warm-up cost no more memory: not per client, and not in the Python heap.
        print(
            f"\n{FLOOD_CLIENTS} fresh client ids in {seconds:.1f} s; RSS {rss_warm / MiB:.0f} MiB after "
            f"{WARM_UP}, {rss_end / MiB:.0f} MiB after {FLOOD_CLIENTS - TRACED}; of the last {TRACED}, the "
            f"Python heap kept {retained / MiB:.1f} MiB"
        )
        assert rss_end - rss_warm < 16 * MiB, (rss_warm, rss_end)
        assert retained < 16 * MiB, retained
