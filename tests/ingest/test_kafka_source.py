"""`KafkaSource` against the embedded broker, on kafka-python and on confluent-kafka: assigned partitions are
claimed before anything is fetched and resume at the positions the claim returns; a claim that fails holds
them; `rejoin` gives up what was read and reads on from the claim again; offsets commit and lag is known."""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson
import pytest
from kafka.errors import KafkaError

from detector.broker import EmbeddedBroker
from detector.domain import RawRecord
from detector.ingest.kafka import KafkaSource
from detector.kafka import KafkaPublisher, ensure_topic
from detector.kafka.confluent import ConfluentConsumer
from detector.kafka.consumers import KafkaPythonConsumer
from detector.settings import Settings
from tests.faults.harness import wait_until
from tests.support import make_settings

pytestmark = pytest.mark.kafka

CLIENTS = {"kafka-python": KafkaPythonConsumer, "confluent": ConfluentConsumer}

RECORDS = 60
STORED = 10  # the position the claim says is stored


class Claims:
    """Stands in for the database's claims: refuses the first `refusals`, then returns `STORED`."""

    def __init__(self, topic: str, refusals: int = 0) -> None:
        self.topic = topic
        self.refusals = refusals
        self.made: list[list[tuple[str, int]]] = []

    def __call__(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int] | None:
        self.made.append(partitions)
        if self.refusals > 0:
            self.refusals -= 1
            return None
        return {(self.topic, 0): STORED}


def poll_until(
    source: KafkaSource, done: Callable[[list[RawRecord]], bool], timeout: float = 60
) -> list[int]:
    """Poll until `done(records so far)`; the offsets read, in order."""
    read: list[RawRecord] = []
    deadline = time.monotonic() + timeout
    while not done(read):
        assert time.monotonic() < deadline, f"read {len(read)} records in {timeout:.0f} s"
        read += source.poll()
    return [record.origin.position for record in read]


@pytest.fixture(params=sorted(CLIENTS))
def client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def settings_with_records(broker: EmbeddedBroker, client: str, partitions: int) -> Settings:
    """Settings reading with `client` from a fresh topic of `partitions` holding `RECORDS` records (keys
    spread over the partitions)."""
    settings = make_settings(
        "sqlite://", broker, kafka={"poll_timeout_ms": 200, "max_poll_records": 20, "client": client}
    )
    topic = settings.kafka.topics[0]
    ensure_topic(settings.kafka, topic, partitions)
    publisher = KafkaPublisher(settings.kafka)
    for index in range(RECORDS):
        publisher.send(topic, orjson.dumps({"n": index}), f"client-{index}".encode())
        # One batch a record: the embedded broker reports an end offset short of the true one after a
        # batch of many records, and a claimed position beyond the end is not sought.
        publisher.flush()
    publisher.close()
    return settings


def source_on(
    broker: EmbeddedBroker, request: pytest.FixtureRequest, client: str, claims_refused: int = 0
) -> tuple[KafkaSource, Claims]:
    """A source reading with `client` from a fresh 1-partition topic holding `RECORDS` records, claiming
    through `Claims`."""
    settings = settings_with_records(broker, client, partitions=1)
    claims = Claims(settings.kafka.topics[0], claims_refused)
    source = KafkaSource(settings.kafka, on_revoke=lambda: None, claim=claims)
    request.addfinalizer(source.close)
    assert isinstance(source._consumer, CLIENTS[client])
    return source, claims


def test_an_assigned_partition_is_claimed_and_resumes_at_the_claimed_position(
    broker: EmbeddedBroker, request: pytest.FixtureRequest, client: str
) -> None:
    source, claims = source_on(broker, request, client)
    offsets = poll_until(source, lambda read: len(read) >= 20)
    assert claims.made == [[(claims.topic, 0)]]
    assert offsets[0] == STORED and offsets == sorted(offsets)


def test_a_seek_the_client_refuses_is_tried_again_at_the_next_poll(
    broker: EmbeddedBroker, request: pytest.FixtureRequest
) -> None:
    # librdkafka refuses a seek until the partition's fetch has started ("Erroneous state"): the refusal
    # came out of `poll` as librdkafka's own exception and ended the daemon.
    source, _ = source_on(broker, request, "confluent")
    consumer = source._consumer
    with pytest.raises(KafkaError):
        consumer.seek(("not-assigned", 0), 10)  # refused by librdkafka as a seek too early is

    seek = consumer.seek
    refusals = [1]

    def refused_once(partition: tuple[str, int], offset: int) -> None:
        if refusals:
            refusals.pop()
            seek(("not-assigned", 0), offset)  # the client's own refusal, raised from here
        seek(partition, offset)

    consumer.seek = refused_once  # type: ignore[method-assign]
    offsets = poll_until(source, lambda read: len(read) >= 20)
    assert not refusals and offsets[0] == STORED, offsets[:3]


def test_a_claimed_position_is_committed_to_the_group_once_sought(
    broker: EmbeddedBroker, request: pytest.FixtureRequest, client: str
) -> None:
    # The group's committed offset had stayed where the last commit that landed left it (here: none) until
    # records came: another member waiting for the group to drain waited on records already stored.
    source, claims = source_on(broker, request, client)
    partition = (claims.topic, 0)
    poll_until(source, lambda read: bool(read))
    deadline = time.monotonic() + 20
    while source._consumer.committed(partition) != STORED:  # sent without waiting: a later poll sees it
        assert time.monotonic() < deadline, source._consumer.committed(partition)
        source.poll()


def test_nothing_is_fetched_until_a_claim_succeeds(
    broker: EmbeddedBroker, request: pytest.FixtureRequest, client: str
) -> None:
    source, claims = source_on(broker, request, client, claims_refused=3)
    offsets = poll_until(source, lambda read: len(read) >= 20)
    assert len(claims.made) == 4  # three refused (the partition held), then granted at a later poll
    assert offsets[0] == STORED


def test_rejoin_reads_again_from_the_claimed_position(
    broker: EmbeddedBroker, request: pytest.FixtureRequest, client: str
) -> None:
    source, claims = source_on(broker, request, client)
    first = poll_until(source, lambda read: bool(read) and read[-1].origin.position >= 40)
    source.rejoin()  # what was read after the stored position was not stored: it must come again
    again = poll_until(source, lambda read: len(read) >= 20)
    assert len(claims.made) == 2
    assert first[0] == STORED and again[0] == STORED


def test_positions_commit_to_the_broker_and_lag_counts_what_is_left(
    broker: EmbeddedBroker, request: pytest.FixtureRequest, client: str
) -> None:
    source, claims = source_on(broker, request, client)
    offsets = poll_until(source, lambda read: len(read) >= 20)
    partition = (claims.topic, 0)
    source.commit({partition: offsets[-1] + 1})

    # Read back from the broker, which may answer an offset fetch without the partition while the group
    # settles (four test workers on two cores miss heartbeats): the commit must show within a bound.
    wait_until(
        lambda: source._consumer.committed(partition) == offsets[-1] + 1, 15, "the commit at the broker"
    )
    assert source.assigned
    # The embedded broker may report an end short of the true one: the lag is bounded, not exact.
    assert 0 <= source.lag()[partition] <= RECORDS - (offsets[-1] + 1)


def test_records_left_to_the_group_count_every_partition_whoever_holds_it(
    broker: EmbeddedBroker, request: pytest.FixtureRequest, client: str
) -> None:
    # `--exit-when-idle` stops only when nothing is left: a member given part of the partitions (the others
    # still held by a killed member until its session times out) must not take its own share for the stream.
    settings = settings_with_records(broker, client, partitions=2)
    topic = settings.kafka.topics[0]

    first = KafkaSource(settings.kafka, on_revoke=lambda: None)
    request.addfinalizer(first.close)
    before = first.left_to_read()  # not in the group yet: all, from the log's start (nothing committed)
    assert before is not None and set(before) == {(topic, 0), (topic, 1)}
    assert sum(before.values()) == RECORDS
    read: dict[tuple[str, int], int] = {}
    deadline = time.monotonic() + 60
    while sum(read.values()) < RECORDS:
        assert time.monotonic() < deadline, f"read {read} of {before}"
        for record in first.poll():
            read[(topic, record.origin.partition)] = record.origin.position + 1
    assert read == before
    assert first.left_to_read() == {}  # read to the end by this member, though committed nowhere

    first.commit({(topic, 0): read[(topic, 0)]})
    first.close()
    second = KafkaSource(settings.kafka, on_revoke=lambda: None)  # same group, no partition yet
    request.addfinalizer(second.close)
    assert second.left_to_read() == {(topic, 1): read[(topic, 1)]}

    latest = settings.kafka.model_copy(
        update={"group_id": settings.kafka.group_id + "-new", "auto_offset_reset": "latest"}
    )
    late = KafkaSource(latest, on_revoke=lambda: None)
    request.addfinalizer(late.close)
    assert late.left_to_read() == {}  # a new group told to start at the end has nothing left
