"""Kafka source (a consumer group with manual commits) and publisher (dead-letter topic, `produce`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.structs import OffsetAndMetadata

from detector.ingest.kafka_connect import KafkaUnreachable, bootstrap_servers, check_connection, ssl_context
from detector.ingest.records import DeadLetter, Origin, RawRecord
from detector.settings import SASL_PROTOCOLS, KafkaSettings

log = logging.getLogger(__name__)

Positions = dict[tuple[str, int], int]  # (topic, partition) -> next offset to read
StoredPositions = Callable[[], Positions]


# The constructors of kafka-python's clients bootstrap (connect, learn the broker's API versions) before
# they return, bounded by `bootstrap_timeout_ms` in kafka-python 3 and by `api_version_auto_timeout_ms` in
# 2.x; each refuses the other's name as an unknown option.
BOOTSTRAP_TIMEOUT_OPTION = (
    "bootstrap_timeout_ms"
    if "bootstrap_timeout_ms" in KafkaConsumer.DEFAULT_CONFIG
    else "api_version_auto_timeout_ms"
)

_Client = TypeVar("_Client", KafkaConsumer, KafkaProducer)


def client_options(settings: KafkaSettings, *, timeout_seconds: float | None = None) -> dict[str, Any]:
    """Connection and security options shared by consumers and producers, under names that kafka-python
    2.3 and 3.0 both take: the brokers, the security protocol, the TLS context, the SASL mechanism and
    credentials, and the bound on the bootstrap (`timeout_seconds`, by default `connect_timeout_seconds`).

    TLS goes in as one `ssl_context` built from the `ssl_*` settings: the same verification in either
    kafka-python version (2.3 builds its own context with a weaker default) and in `check_connection`.
    """
    timeout = settings.connect_timeout_seconds if timeout_seconds is None else timeout_seconds
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers(settings),
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
        BOOTSTRAP_TIMEOUT_OPTION: max(int(timeout * 1000), 1),
    }
    context = ssl_context(settings)
    if context is not None:
        options["ssl_context"] = context
    if settings.security_protocol in SASL_PROTOCOLS:
        if settings.sasl_username is None or settings.sasl_password is None:
            # Settings validation refuses this; settings built without validation must not reach a broker.
            raise ValueError("SASL needs MIA_KAFKA_SASL_USERNAME and MIA_KAFKA_SASL_PASSWORD")
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        options["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    return options


def open_client(
    factory: type[_Client], settings: KafkaSettings, *, timeout_seconds: float | None = None, **options: Any
) -> _Client:
    """`factory` (KafkaConsumer or KafkaProducer) with `client_options` and `options`, once
    `check_connection` has reached a broker.

    Returns within about twice the connect timeout (`timeout_seconds`, by default
    `connect_timeout_seconds`), or raises `KafkaUnreachable` with a one-line reason (a client that could not
    bootstrap is closed first).
    """
    check_connection(settings, timeout_seconds)
    timeout = settings.connect_timeout_seconds if timeout_seconds is None else timeout_seconds
    clients: list[Any] = []

    def new_client(**config: Any) -> Any:
        # Kept, so that a client that cannot start does not leave its sockets and IO thread behind.
        clients.append(factory.DEFAULT_CONFIG["kafka_client"](**config))
        return clients[-1]

    try:
        if (
            BOOTSTRAP_TIMEOUT_OPTION == "api_version_auto_timeout_ms"
            and settings.security_protocol in SASL_PROTOCOLS
        ):
            _log_in(settings, timeout)
        return factory(
            **client_options(settings, timeout_seconds=timeout), kafka_client=new_client, **options
        )
    except KafkaError as exc:
        for client in clients:
            client.close()
        raise KafkaUnreachable(_bootstrap_failure(settings, exc, timeout)) from None


def _log_in(settings: KafkaSettings, timeout: float) -> None:
    """Authenticate once with a client of kafka-python 2.x's own, within `timeout` seconds, or raise
    `KafkaError`.

    kafka-python 2.x's consumers and producers return once they know the broker's API versions, which come
    before SASL authentication: a rejected password would show only when a first request times out (after a
    minute, for a producer). The client is a throwaway one, driven from this thread alone: a producer's
    sender thread would read from the same connection.
    """
    from kafka.client_async import KafkaClient  # kafka-python 2.x

    client = KafkaClient(
        **client_options(settings, timeout_seconds=timeout), request_timeout_ms=max(int(timeout * 1000), 1)
    )
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            node = client.least_loaded_node()
            if node is not None and client.ready(node):
                return
            client.poll(timeout_ms=100)
        raise KafkaTimeoutError(f"not authenticated within {timeout:g} s")
    finally:
        client.close()


def _bootstrap_failure(settings: KafkaSettings, exc: KafkaError, timeout: float) -> str:
    servers = ",".join(bootstrap_servers(settings))
    reason = (str(exc) or type(exc).__name__).splitlines()[0]
    if settings.security_protocol in SASL_PROTOCOLS:
        reason += (
            f" (the broker answered but the client did not get through within {timeout:g} s: are "
            "MIA_KAFKA_SASL_MECHANISM, MIA_KAFKA_SASL_USERNAME and MIA_KAFKA_SASL_PASSWORD right?)"
        )
    return f"cannot connect to Kafka at {servers} over {settings.security_protocol}: {reason}"


def _names(partitions: Iterable[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}/{tp.partition}" for tp in partitions)


RebalanceHook = Callable[[list[TopicPartition]], None]


class _RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands rebalances to the source. kafka-python 3 calls it on its network thread (while `poll` waits),
    where a blocking broker call is refused: nothing the hooks do may block on the broker."""

    def __init__(self, revoked: RebalanceHook, assigned: RebalanceHook) -> None:
        self._revoked = revoked
        self._assigned = assigned

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        if revoked:
            log.info("partitions revoked: %s", _names(revoked))
            self._revoked(list(revoked))

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        log.info("partitions assigned: %s", _names(assigned))
        self._assigned(list(assigned))


class KafkaSource:
    """Reads raw records from `topics` in a consumer group; offsets move only through `commit`.

    `on_revoke` runs inside `poll` before partitions are taken away: the pipeline makes its pending results
    durable there (with their checkpoints) and commits, so the next owner of a partition starts after what
    was stored. It must not raise. `stored_positions` reads those checkpoints: a partition assigned to this
    consumer resumes at its stored position when there is one, since an offset commit made during a
    rebalance is sent without waiting for the broker and may not have landed; it must not raise either
    (an empty answer leaves the broker's committed offsets, which are never ahead of the stored ones).
    """

    def __init__(
        self,
        settings: KafkaSettings,
        on_revoke: Callable[[], None],
        topics: list[str] | None = None,
        group_id: str | None = None,
        stored_positions: StoredPositions | None = None,
    ) -> None:
        self.topics = topics or settings.topics
        self.group_id = group_id or settings.group_id
        self._max_records = settings.max_poll_records
        self._timeout_ms = settings.poll_timeout_ms
        self._on_revoke = on_revoke
        self._stored_positions = stored_positions
        self._in_rebalance = False
        self._consumer = open_client(
            KafkaConsumer,
            settings,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset=settings.auto_offset_reset,
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=max(settings.session_timeout_ms // 3, 100),
            max_poll_records=settings.max_poll_records,
            fetch_max_bytes=settings.fetch_max_bytes,
            max_partition_fetch_bytes=settings.max_partition_fetch_bytes,
            fetch_min_bytes=settings.fetch_min_bytes,
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
        )
        self._consumer.subscribe(self.topics, listener=_RebalanceListener(self._revoked, self._assigned))

    def poll(self) -> list[RawRecord]:
        """Up to `max_poll_records` records, waiting at most the poll timeout; [] when there are none."""
        fetched = self._consumer.poll(timeout_ms=self._timeout_ms, max_records=self._max_records)
        received_at = time.time()
        return [
            RawRecord(
                message.value,
                message.key,
                Origin("kafka", message.topic, message.partition, message.offset),
                received_at,
            )
            for messages in fetched.values()
            for message in messages
        ]

    @property
    def assigned(self) -> bool:
        """True once the group has given this consumer at least one partition."""
        return bool(self._consumer.assignment())

    def hold(self, held: bool) -> None:
        """Stop (True) or resume (False) fetching from the assigned partitions (back-pressure).

        `poll` must still be called meanwhile: it keeps the consumer in its group and returns nothing.
        """
        if held:
            self._consumer.pause(*self._consumer.assignment())
        else:
            self._consumer.resume(*self._consumer.paused())

    def lag(self) -> dict[tuple[str, int], int]:
        """Records behind the high watermark per assigned partition, as of the consumer's last fetch.

        No broker round trip: the high watermark comes with every fetch response. Partitions not fetched
        yet are left out. (Some brokers, tansu among them, report a high watermark below the true end.)
        """
        lag: dict[tuple[str, int], int] = {}
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            if highwater is None:
                continue
            # A fetched partition has its position; timeout 0 keeps a lookup that is still due from blocking.
            position = self._consumer.position(tp, timeout_ms=0)
            if position is not None:
                lag[(tp.topic, tp.partition)] = max(highwater - position, 0)
        return lag

    def commit(self, positions: Mapping[tuple[str, int], int]) -> None:
        """Commit `positions` (next offsets); a no-op when empty.

        Synchronous, raising `KafkaError` when the broker does not take them; during a rebalance (from
        `on_revoke`) the commit is sent without waiting, and a failure is only logged.
        """
        if not positions:
            return
        offsets = {
            TopicPartition(topic, partition): OffsetAndMetadata(offset, "", -1)
            for (topic, partition), offset in positions.items()
        }
        if self._in_rebalance:
            self._consumer.commit_async(offsets, callback=_log_failed_commit)
        else:
            self._consumer.commit(offsets)

    def _revoked(self, partitions: list[TopicPartition]) -> None:
        self._in_rebalance = True
        try:
            self._on_revoke()
        finally:
            self._in_rebalance = False

    def _assigned(self, partitions: list[TopicPartition]) -> None:
        stored = self._stored_positions() if self._stored_positions is not None else {}
        for tp in partitions:
            position = stored.get((tp.topic, tp.partition))
            if position is not None:
                self._consumer.seek(tp, position)

    def close(self) -> None:
        """Leave the group (without committing anything more)."""
        self._consumer.close(autocommit=False)


def _log_failed_commit(offsets: Mapping[TopicPartition, OffsetAndMetadata], response: Any) -> None:
    if isinstance(response, Exception):
        log.warning("offsets of %s not committed: %s", _names(offsets), response)


class KafkaPublisher:
    """A producer for whole JSON records keyed by client id, and for dead letters."""

    def __init__(self, settings: KafkaSettings) -> None:
        # Idempotence stays off: a producer id does not survive a restart of the embedded broker, and
        # consumers de-duplicate by event_id anyway.
        self._producer = open_client(
            KafkaProducer,
            settings,
            acks="all",
            enable_idempotence=False,
            retries=10,
            linger_ms=20,
            batch_size=256 * 1024,
            compression_type=None,
        )
        self._pending: list[Any] = []

    def send(self, topic: str, value: bytes, key: bytes | None) -> None:
        """Queue one message; `flush` makes it durable."""
        self._pending.append(self._producer.send(topic, value=value, key=key))

    def send_dead_letter(self, topic: str, letter: DeadLetter) -> None:
        """Queue a dead letter: the raw (truncated) bytes, with reason and origin as headers."""
        future = self._producer.send(
            topic,
            value=letter.raw,
            headers=[
                ("mia-reason", letter.reason.value.encode()),
                ("mia-detail", letter.detail.encode()[:1000]),
                ("mia-source", letter.origin.describe().encode()),
                ("mia-size", str(letter.raw_size).encode()),
            ],
        )
        self._pending.append(future)

    def flush(self, timeout: float | None = 30.0) -> None:
        """Block until every queued message is acknowledged; raise the first delivery error, if any."""
        self._producer.flush(timeout=timeout)
        pending, self._pending = self._pending, []
        for future in pending:
            future.get(timeout=timeout)

    def close(self) -> None:
        """Flush and close."""
        self._producer.close()
