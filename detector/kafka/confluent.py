"""`GroupConsumer` on confluent-kafka (librdkafka), for volumes kafka-python cannot read: the optional extra
`mia-detector[confluent]`, chosen by `MIA_KAFKA_CLIENT=confluent`.

librdkafka runs the rebalance callbacks, the error and statistics callbacks and its own log lines inside
`consume`, on the calling thread, so the rebalance hooks may wait for the database and the broker. Its
failures come out as `ConfluentError`, a kafka-python `KafkaError`, so that the daemon and the command line
handle them as they handle kafka-python's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaException, Message, TopicPartition
from confluent_kafka import KafkaError as LibrdkafkaError
from kafka.errors import KafkaError, KafkaTimeoutError

from detector.domain import Origin, RawRecord
from detector.kafka.clients import bootstrap_failure, sasl_login
from detector.kafka.connect import KafkaUnreachable, bootstrap_servers, check_connection
from detector.kafka.consumers import OFFSETS_TIMEOUT_MS, Partition, RebalanceHook, names
from detector.settings import TLS_PROTOCOLS, KafkaSettings

log = logging.getLogger(__name__)

# How often librdkafka reports its brokers' states (read by `open_connections`), in milliseconds.
STATISTICS_INTERVAL_MS = 1000
# While leaving the group: records read a poll and the wait of each (rebalance callbacks run inside it).
CLOSE_POLL_RECORDS = 500
CLOSE_POLL_SECONDS = 0.1
# Errors of the client as a whole (not of one partition) that mean the brokers cannot be reached now.
_UNREACHABLE = {LibrdkafkaError._ALL_BROKERS_DOWN, LibrdkafkaError._TRANSPORT, LibrdkafkaError._RESOLVE}


class ConfluentError(KafkaError):  # type: ignore[misc]
    """A librdkafka error, retriable or not as librdkafka says."""

    def __init__(self, error: LibrdkafkaError) -> None:
        super().__init__(error.str())
        self.retriable = bool(error.retriable()) and not error.fatal()
        self.code = error.code()


def consumer_config(settings: KafkaSettings, group_id: str) -> dict[str, Any]:
    """librdkafka's configuration for a consumer of `group_id` with manual commits: the fetch sizes, session
    timeout and security settings of `settings` under librdkafka's names."""
    timeout_ms = max(int(settings.connect_timeout_seconds * 1000), 1)
    config: dict[str, Any] = {
        "bootstrap.servers": ",".join(bootstrap_servers(settings)),
        "client.id": settings.client_id,
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": settings.auto_offset_reset,
        # As kafka-python's consumer: a metadata request may create a topic absent yet (`subscribe`).
        "allow.auto.create.topics": True,
        "session.timeout.ms": settings.session_timeout_ms,
        "heartbeat.interval.ms": max(settings.session_timeout_ms // 3, 100),
        "fetch.max.bytes": settings.fetch_max_bytes,
        # librdkafka refuses a fetch size above its largest response size.
        "receive.message.max.bytes": max(settings.fetch_max_bytes + 512, 1_000_000),
        "max.partition.fetch.bytes": settings.max_partition_fetch_bytes,
        "fetch.min.bytes": settings.fetch_min_bytes,
        "fetch.wait.max.ms": settings.fetch_max_wait_ms,
        "socket.connection.setup.timeout.ms": max(timeout_ms, 1000),
        "security.protocol": settings.security_protocol.lower(),
        "statistics.interval.ms": STATISTICS_INTERVAL_MS,
    }
    if settings.security_protocol in TLS_PROTOCOLS:
        # The same verification as kafka-python's context (`detector.kafka.connect.ssl_context`): the chain
        # against the CA file or the system's trust store, the host name unless switched off.
        config["ssl.ca.location"] = str(settings.ssl_cafile) if settings.ssl_cafile else "probe"
        config["ssl.endpoint.identification.algorithm"] = "https" if settings.ssl_check_hostname else "none"
        if settings.ssl_certfile is not None:
            config["ssl.certificate.location"] = str(settings.ssl_certfile)
            config["ssl.key.location"] = str(settings.ssl_keyfile or settings.ssl_certfile)
            if settings.ssl_password is not None:
                config["ssl.key.password"] = settings.ssl_password.get_secret_value()
    if (sasl := sasl_login(settings)) is not None:
        config["sasl.mechanism"], config["sasl.username"], config["sasl.password"] = sasl
    return config


class ConfluentConsumer:
    """`GroupConsumer` on confluent-kafka's `Consumer`. Built once a broker has answered
    (`check_connection`) and the client has read the cluster's metadata within the connect timeout; raises
    `KafkaUnreachable` with a one-line reason otherwise."""

    def __init__(self, settings: KafkaSettings, group_id: str) -> None:
        check_connection(settings)
        self._timeout = settings.connect_timeout_seconds
        self._session_timeout = settings.session_timeout_ms / 1000
        self._errors: list[LibrdkafkaError] = []  # client-wide errors since the last poll
        self._brokers_up: int | None = None
        self._closing = False
        self._consumer = Consumer(
            consumer_config(settings, group_id)
            | {
                "error_cb": self._errors.append,
                "stats_cb": self._read_statistics,
                "on_commit": _log_failed_commit,
                "logger": logging.getLogger("detector.kafka.librdkafka"),
            }
        )
        try:
            # librdkafka connects in the background: a metadata request proves the client gets through
            # (credentials included) within the bound that kafka-python's bootstrap has.
            self._consumer.list_topics(timeout=settings.connect_timeout_seconds)
        except KafkaException as exc:
            self._consumer.close()
            reason = bootstrap_failure(
                settings, ConfluentError(exc.args[0]), settings.connect_timeout_seconds
            )
            raise KafkaUnreachable(reason) from None

    def subscribe(self, topics: list[str], revoked: RebalanceHook, assigned: RebalanceHook) -> None:
        def on_assign(consumer: Consumer, partitions: list[TopicPartition]) -> None:
            # Assigned here rather than after the callback, so that the hook can pause them first.
            consumer.assign(partitions)
            # While leaving the group (`close`), partitions handed over before the leave are not the hook's.
            if not self._closing:
                assigned([(tp.topic, tp.partition) for tp in partitions])

        def on_revoke(consumer: Consumer, partitions: list[TopicPartition]) -> None:
            # `close` leaves the group through a revocation: by then nothing more may be committed.
            if partitions and not self._closing:
                revoked([(tp.topic, tp.partition) for tp in partitions])

        # A metadata request naming each topic, as kafka-python's consumer makes: a topic subscribed to
        # before anything was produced is created (with the brokers' defaults) where the brokers allow it
        # (librdkafka's subscription alone does not ask for it).
        for topic in topics:
            try:
                self._consumer.list_topics(topic, timeout=self._timeout)
            except KafkaException as exc:
                log.debug("metadata of topic %s: %s", topic, exc.args[0].str())
        self._consumer.subscribe(topics, on_assign=on_assign, on_revoke=on_revoke)

    def unsubscribe(self) -> None:
        self._consumer.unsubscribe()

    def poll(self, timeout_ms: int, max_records: int) -> list[RawRecord]:
        try:
            messages = self._consumer.consume(max_records, timeout_ms / 1000)
        except KafkaException as exc:
            raise ConfluentError(exc.args[0]) from None
        received_at = time.time()
        records = []
        for message in messages:
            if (error := message.error()) is None:
                records.append(_record(message, received_at))
            else:
                self._message_error(message, error)
        errors, self._errors = self._errors, []
        for error in errors:
            if error.fatal():
                raise ConfluentError(error)
            log.debug("librdkafka: %s", error.str())
        unreachable = [error for error in errors if error.code() in _UNREACHABLE]
        if unreachable and not records:
            raise ConfluentError(unreachable[-1])
        return records

    def _message_error(self, message: Message, error: LibrdkafkaError) -> None:
        if error.fatal():
            raise ConfluentError(error)
        # A topic not created yet, or a partition that moved: librdkafka retries by itself.
        log.debug("consuming %s/%s: %s", message.topic(), message.partition(), error.str())

    def _read_statistics(self, statistics: str) -> None:
        brokers = orjson.loads(statistics).get("brokers", {})
        # The group coordinator is also listed under a node id of -1: the same connection, counted once.
        self._brokers_up = sum(
            1 for broker in brokers.values() if broker.get("nodeid", -1) >= 0 and broker.get("state") == "UP"
        )

    def assignment(self) -> set[Partition]:
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def pause(self, partitions: Iterable[Partition]) -> None:
        if wanted := [TopicPartition(*partition) for partition in partitions]:
            self._consumer.pause(wanted)

    def resume(self, partitions: Iterable[Partition]) -> None:
        if wanted := [TopicPartition(*partition) for partition in partitions]:
            self._consumer.resume(wanted)

    def seek(self, partition: Partition, offset: int) -> None:
        try:
            self._consumer.seek(TopicPartition(*partition, offset))
        except KafkaException as exc:
            raise ConfluentError(exc.args[0]) from None

    def lag(self) -> dict[Partition, int]:
        assigned = self._consumer.assignment()
        if not assigned:
            return {}
        lag: dict[Partition, int] = {}
        for tp in self._consumer.position(assigned):
            if tp.offset < 0:
                continue  # nothing fetched yet
            _, highwater = self._consumer.get_watermark_offsets(tp, cached=True)
            if highwater >= 0:
                lag[(tp.topic, tp.partition)] = max(highwater - tp.offset, 0)
        return lag

    def position(self, partition: Partition) -> int | None:
        (tp,) = self._consumer.position([TopicPartition(*partition)])
        return tp.offset if tp.offset >= 0 else None

    def partitions(self, topic: str) -> list[int]:
        try:
            metadata = self._consumer.list_topics(topic, timeout=self._timeout).topics.get(topic)
        except KafkaException as exc:
            raise ConfluentError(exc.args[0]) from None
        if metadata is None or metadata.error is None:
            return sorted(metadata.partitions) if metadata is not None else []
        if metadata.error.code() == LibrdkafkaError.UNKNOWN_TOPIC_OR_PART:
            return []
        raise ConfluentError(metadata.error)  # the partitions are unknown now, not absent

    def beginning_offsets(self, partitions: list[Partition]) -> dict[Partition, int]:
        return {partition: low for partition, (low, _) in self._watermarks(partitions).items()}

    def end_offsets(self, partitions: list[Partition]) -> dict[Partition, int]:
        return {partition: high for partition, (_, high) in self._watermarks(partitions).items()}

    def _watermarks(self, partitions: list[Partition]) -> dict[Partition, tuple[int, int]]:
        """The brokers' (first, end) offsets of `partitions`, asked for now (not as last fetched)."""
        watermarks = {}
        try:
            for partition in partitions:
                found = self._consumer.get_watermark_offsets(
                    TopicPartition(*partition), timeout=OFFSETS_TIMEOUT_MS / 1000, cached=False
                )
                if found is None:  # the lookup timed out
                    raise KafkaTimeoutError(f"watermarks of {partition[0]}/{partition[1]}")
                watermarks[partition] = found
        except KafkaException as exc:
            raise ConfluentError(exc.args[0]) from None
        return watermarks

    def committed(self, partition: Partition) -> int | None:
        try:
            (committed,) = self._consumer.committed(
                [TopicPartition(*partition)], timeout=OFFSETS_TIMEOUT_MS / 1000
            )
        except KafkaException as exc:
            raise ConfluentError(exc.args[0]) from None
        return committed.offset if committed.offset >= 0 else None

    def commit(self, offsets: Mapping[Partition, int], *, wait: bool) -> None:
        wanted = [TopicPartition(*partition, offset) for partition, offset in offsets.items()]
        try:
            if not wait:
                self._consumer.commit(offsets=wanted, asynchronous=True)
                return
            committed = self._consumer.commit(offsets=wanted, asynchronous=False)
        except KafkaException as exc:
            if wait:
                raise ConfluentError(exc.args[0]) from None
            log.warning("offsets of %s not committed: %s", names(offsets), exc.args[0].str())
            return
        for tp in committed:
            if tp.error is not None:
                raise ConfluentError(tp.error)

    def open_connections(self) -> int | None:
        return self._brokers_up

    def close(self) -> None:
        """Leave the group and close the client, within the group's session timeout: should librdkafka still
        not return, the client is left to the process's end with a warning, and the group hands its partitions
        over when the session times out. Closing again does nothing."""
        if self._closing:
            return
        self._closing = True
        try:
            self._unassign()
        except KafkaException as exc:
            log.debug("leaving group: %s", exc.args[0].str())
        closing = threading.Thread(target=self._consumer.close, name="librdkafka-close", daemon=True)
        closing.start()
        closing.join(self._session_timeout)
        if closing.is_alive():
            log.warning(
                "the Kafka client did not close within %.0f s: left open; the group hands its partitions "
                "over once the session times out",
                self._session_timeout,
            )

    def _unassign(self) -> None:
        """Unsubscribe and serve the rebalance callbacks (at least once: an assignment may be queued that the
        client does not show yet) until nothing is assigned, for at most the connect timeout, discarding what
        is fetched meanwhile: nothing more is committed, and the next owners read it again from the committed
        positions.

        librdkafka can hang for ever in `close` when an assignment is still queued for the application: the
        callback's `assign` waits on a group that is closing (librdkafka issue 4884). Once unsubscribed and
        unassigned, no rebalance is left for `close` to serve.
        """
        self._consumer.unsubscribe()
        deadline = time.monotonic() + self._timeout
        self._consumer.consume(CLOSE_POLL_RECORDS, 0)
        while self._consumer.assignment() and time.monotonic() < deadline:
            self._consumer.consume(CLOSE_POLL_RECORDS, CLOSE_POLL_SECONDS)


def _log_failed_commit(error: LibrdkafkaError | None, partitions: list[TopicPartition]) -> None:
    # The outcome of an asynchronous commit (one sent inside a rebalance); a synchronous one raises.
    if error is not None:
        log.warning(
            "offsets of %s not committed: %s",
            names((tp.topic, tp.partition) for tp in partitions),
            error.str(),
        )


def _record(message: Message, received_at: float) -> RawRecord:
    return RawRecord(
        message.value() or b"",  # a tombstone (no value) is a record that does not decode
        message.key(),
        Origin("kafka", str(message.topic()), int(message.partition() or 0), int(message.offset() or 0)),
        received_at,
    )
