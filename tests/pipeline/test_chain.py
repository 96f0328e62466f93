"""The pipeline on its own: the commit point's order, dead letters, de-duplication and back-pressure, with
an in-memory SQLite store and recording stand-ins for the source and the sinks (the real broker and
receivers are exercised by the service and sink tests)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson
import pytest

from detector.alerts.lifecycle import AlertChange
from detector.domain import DeadLetter, Detection, Origin, RawRecord
from detector.metrics import Metrics
from detector.pipeline import OutboxFull, Outputs, Pipeline
from detector.service import build_pipeline
from detector.simulate.sample import START, oip_record
from detector.storage import Store, open_store
from tests.support import make_settings

NOW = START + 3600.0


def record(event_id: str, client: str = "client-a", offset: float = 0.0, seed: int = 0) -> bytes:
    rows = np.random.default_rng(seed).normal(size=(1, 6)).astype(np.float32)
    probabilities = np.array([[0.3, 0.7]], dtype=np.float32)
    return orjson.dumps(oip_record(event_id, START + offset, client, rows, probabilities))


def raw(values: Sequence[bytes], first_offset: int = 0) -> list[RawRecord]:
    return [
        RawRecord(value, None, Origin("kafka", "logs", 0, first_offset + index), NOW)
        for index, value in enumerate(values)
    ]


@dataclass
class Recorder:
    """Stands in for the source's positions, the dead-letter topic, the terminal and the outbox, and checks
    at each call what the database holds by then."""

    store: Store
    group: str
    events: list[str] = field(default_factory=list)
    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    published: list[DeadLetter] = field(default_factory=list)
    opened_alerts: list[int] = field(default_factory=list)
    backlogged: bool = False
    fail_publish: bool = False

    # PositionCommitter: called after the transaction, which must hold the same positions by then.
    def commit(self, positions: Mapping[tuple[str, int], int]) -> None:
        assert self.store.checkpoints(self.group) == {**self.committed, **positions}
        self.events.append("positions")
        self.committed.update(positions)

    # DeadLetterPublisher: called before the transaction that stores them.
    def publish(self, letters: Sequence[DeadLetter]) -> None:
        if self.fail_publish:
            raise ConnectionError("dead-letter topic unreachable")
        stored = {letter.source for letter in self.store.list_dead_letters()}
        assert not stored & {letter.origin.describe() for letter in letters}
        self.events.append("dead letters")
        self.published += letters

    # AlertListener: told after the transaction, which holds the alerts by then.
    def opened(self, alerts: list[tuple[AlertChange, Detection]]) -> None:
        stored = {alert.id for alert in self.store.alerts.list_alerts()}
        assert {change.alert.id for change, _ in alerts} <= stored
        self.events.append("alerts")
        self.opened_alerts += [change.alert.id for change, _ in alerts]

    def escalated(self, alerts: list[tuple[AlertChange, Detection]]) -> None:
        self.opened(alerts)  # told after the transaction too

    # Outbox
    @property
    def sink_names(self) -> list[str]:
        return []

    def wake(self) -> None:
        self.events.append("wake")


@pytest.fixture
def wired() -> Iterator[tuple[Pipeline, Recorder, Store]]:
    settings = make_settings("sqlite://", commit={"min_records": 1_000_000, "min_interval_seconds": 3600.0})
    with open_store(settings) as store:
        recorder = Recorder(store, settings.kafka.group_id)
        outputs = Outputs(positions=recorder, dead_letters=recorder, alerts=recorder, outbox=recorder)
        pipeline = build_pipeline(
            settings, store, Metrics(), outputs=outputs, group_id=settings.kafka.group_id
        )
        yield pipeline, recorder, store


def test_the_commit_point_publishes_dead_letters_then_stores_then_commits_positions(
    wired: tuple[Pipeline, Recorder, Store],
) -> None:
    pipeline, recorder, store = wired
    pipeline.submit(raw([record("e1"), b"{not json", record("e2", offset=1)]))
    assert recorder.events == [] and store.count_seen_events() == 0  # nothing before the commit point

    pipeline.commit()

    assert recorder.events == ["dead letters", "positions"]
    assert recorder.committed == {("logs", 0): 3}
    assert [letter.reason.value for letter in recorder.published] == ["invalid_json"]
    assert store.count_seen_events() == 2 and store.dead_letter_counts() == {"invalid_json": 1}


def test_a_dead_letter_topic_that_fails_stores_and_commits_nothing_until_it_works(
    wired: tuple[Pipeline, Recorder, Store],
) -> None:
    pipeline, recorder, store = wired
    pipeline.submit(raw([record("e1"), b"[1, 2]"]))
    recorder.fail_publish = True

    with pytest.raises(ConnectionError):
        pipeline.commit()

    assert store.count_seen_events() == 0 and recorder.committed == {}
    recorder.fail_publish = False
    pipeline.commit()
    assert store.count_seen_events() == 1 and recorder.committed == {("logs", 0): 2}
    assert len(recorder.published) == 1  # published once, not once per attempt


def test_re_delivered_events_are_counted_once_within_and_across_commits(
    wired: tuple[Pipeline, Recorder, Store],
) -> None:
    pipeline, recorder, store = wired
    first = [record(f"e{index}", offset=index) for index in range(5)]
    pipeline.submit(raw([*first, first[0]]))
    pipeline.submit(raw(first[:3], first_offset=6))
    pipeline.commit()
    pipeline.submit(raw(first, first_offset=9))
    pipeline.commit()

    assert (pipeline.stats.events, pipeline.stats.duplicates) == (5, 9)
    assert store.count_seen_events() == 5
    assert sum(session.queries for session in store.list_sessions()) == 5
    assert recorder.committed == {("logs", 0): 14}


def test_a_full_outbox_holds_the_records_unprocessed_until_it_drains(
    wired: tuple[Pipeline, Recorder, Store],
) -> None:
    pipeline, recorder, store = wired
    recorder.backlogged = True

    with pytest.raises(OutboxFull) as pressure:
        pipeline.submit(raw([record("e1"), record("e2", offset=1)]))

    assert pressure.value.retry_after is not None
    assert pipeline.uncommitted_records == 2 and pipeline.stats.records == 0
    recorder.backlogged = False
    pipeline.resume()
    pipeline.commit()
    assert pipeline.stats.events == 2 and store.count_seen_events() == 2


def test_alerts_are_reported_once_stored(
    wired: tuple[Pipeline, Recorder, Store],
) -> None:
    pipeline, recorder, store = wired
    # One client asking for the probabilities of hundreds of distinct inputs: confidence harvesting.
    harvest = [record(f"h{index}", client="harvester", offset=index, seed=index) for index in range(400)]
    stored_after = []
    for start in range(0, len(harvest), 50):
        pipeline.submit(raw(harvest[start : start + 50], first_offset=start))
        stored_after.append(len(store.alerts.list_alerts()))
    pipeline.commit()

    [alert] = store.alerts.list_alerts()
    assert alert.kind.value == "confidence_harvesting"
    # Stored, with the positions, in the very batch its rule fired in: the commit policy (a million records
    # or an hour) was not waited for. Reported once, after the transaction.
    crossed = alert.detected_after_queries
    assert stored_after == [0 if (index + 1) * 50 < crossed else 1 for index in range(len(stored_after))]
    opened = recorder.events.index("alerts")
    assert recorder.events.count("alerts") == 1 and recorder.events[opened - 1] == "positions"
    assert recorder.opened_alerts == [alert.id]
