"""Kafka clients built from the settings, under option names kafka-python 2.3 and 3.0 both take, each
reaching a broker (`detector.kafka.connect.check_connection`) before it is built; and the publisher of whole
records (`produce`, dead letters, findings, canaries)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, TypeVar

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError

from detector.domain import DeadLetter
from detector.kafka.connect import KafkaUnreachable, bootstrap_servers, check_connection, ssl_context
from detector.settings import SASL_PROTOCOLS, KafkaSettings

log = logging.getLogger(__name__)


# The constructors of kafka-python's clients bootstrap (connect, learn the broker's API versions) before
# they return, bounded by `bootstrap_timeout_ms` in kafka-python 3 and by `api_version_auto_timeout_ms` in
# 2.x; each refuses the other's name as an unknown option.
BOOTSTRAP_TIMEOUT_OPTION = (
    "bootstrap_timeout_ms"
    if "bootstrap_timeout_ms" in KafkaConsumer.DEFAULT_CONFIG
    else "api_version_auto_timeout_ms"
)

# A kafka-python 2.x connection counts as open once it has stayed up this long (see `open_connections`):
# longer than a reset connection lives, shorter than the first connection check after a consumer starts.
SETTLED_SECONDS = 0.25

_Client = TypeVar("_Client", KafkaAdminClient, KafkaConsumer, KafkaProducer)


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
    if (sasl := sasl_login(settings)) is not None:
        mechanism, username, password = sasl
        options["sasl_mechanism"] = mechanism
        options["sasl_plain_username"], options["sasl_plain_password"] = username, password
    return options


def sasl_login(settings: KafkaSettings) -> tuple[str, str, str] | None:
    """(mechanism, username, password) when the security protocol uses SASL, else None."""
    if settings.security_protocol not in SASL_PROTOCOLS:
        return None
    if settings.sasl_username is None or settings.sasl_password is None:
        # Settings validation refuses this; settings built without validation must not reach a broker.
        raise ValueError("SASL needs MIA_KAFKA_SASL_USERNAME and MIA_KAFKA_SASL_PASSWORD")
    return settings.sasl_mechanism, settings.sasl_username, settings.sasl_password.get_secret_value()


def open_client(
    factory: type[_Client], settings: KafkaSettings, *, timeout_seconds: float | None = None, **options: Any
) -> _Client:
    """`factory` (KafkaConsumer, KafkaProducer or KafkaAdminClient) with `client_options` and `options`, once
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
        raise KafkaUnreachable(bootstrap_failure(settings, exc, timeout)) from None


def open_connections(consumer: KafkaConsumer) -> int | None:
    """How many connections to brokers `consumer` holds open now (no broker round trip); None when the
    installed kafka-python does not tell."""
    if BOOTSTRAP_TIMEOUT_OPTION == "api_version_auto_timeout_ms":
        # kafka-python 2.x keeps a closed connection in its table (and counts it in `connection-count`):
        # only the connections themselves know whether they are open. Where the network accepts connections
        # and resets them (a proxy or load balancer without its brokers) 2.x reconnects every ~100 ms and
        # is "connected" for a moment each time, without failing a poll: a connection counts once its
        # attempt is `SETTLED_SECONDS` old.
        table = getattr(getattr(consumer, "_client", None), "_conns", None)
        if isinstance(table, dict):
            settled = time.time() - SETTLED_SECONDS
            return sum(
                1
                for connection in list(table.values())
                if connection.connected() and connection.last_attempt <= settled
            )
        return None
    # kafka-python 3 drops a connection from its table when it closes, so the metric counts the open ones.
    try:
        return int(consumer.metrics()["consumer-metrics"]["connection-count"])
    except (KeyError, TypeError, ValueError):
        return None


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


def bootstrap_failure(settings: KafkaSettings, exc: KafkaError, timeout: float) -> str:
    """The one-line reason a client could not bootstrap within `timeout` seconds: where, over what, why."""
    servers = ",".join(bootstrap_servers(settings))
    reason = (str(exc) or type(exc).__name__).splitlines()[0]
    if settings.security_protocol in SASL_PROTOCOLS:
        reason += (
            f" (the broker answered but the client did not get through within {timeout:g} s: are "
            "MIA_KAFKA_SASL_MECHANISM, MIA_KAFKA_SASL_USERNAME and MIA_KAFKA_SASL_PASSWORD right?)"
        )
    return f"cannot connect to Kafka at {servers} over {settings.security_protocol}: {reason}"


# Room for a message's key, headers and record-batch framing beside its value.
MESSAGE_OVERHEAD_BYTES = 64 * 1024
# Kafka's default message size (a producer's `max.request.size`).
KAFKA_DEFAULT_MESSAGE_BYTES = 1024 * 1024


def message_limit(value_bytes: int) -> int:
    """The message size (a producer's request size, a topic's `max.message.bytes`) that carries values of
    up to `value_bytes`, and never less than Kafka's default: records over a lower limit of the detector's
    are still sent, to become dead letters, not refused."""
    return max(value_bytes + MESSAGE_OVERHEAD_BYTES, KAFKA_DEFAULT_MESSAGE_BYTES)


class KafkaPublisher:
    """A producer for whole JSON records keyed by client id, and for dead letters."""

    def __init__(self, settings: KafkaSettings, max_message_bytes: int = 0) -> None:
        """`max_message_bytes`: the largest value to be sent (Kafka's default message size carries up to
        1 MiB whatever it says). `max_value_bytes` is then the longest value `send` takes with a key of up
        to 32 KiB: a little more than asked, so that records a little over a consumer's limit reach it."""
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
            max_request_size=message_limit(max_message_bytes),
        )
        self._pending: list[Any] = []
        # Half the overhead is left to the key and the record's framing.
        self.max_value_bytes = message_limit(max_message_bytes) - MESSAGE_OVERHEAD_BYTES // 2

    def send(
        self, topic: str, value: bytes | None, key: bytes | None, headers: Sequence[tuple[str, bytes]] = ()
    ) -> None:
        """Queue one message (`value` None: a tombstone, which a compacted topic keeps until it deletes the
        key), with `headers`; `flush` makes it durable."""
        self._pending.append(self._producer.send(topic, value=value, key=key, headers=list(headers) or None))

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
