"""Every Prometheus metric of the detector, defined once, on a registry that tests can inject, and the
HTTP endpoint that serves them.

Client ids never become label values (they would explode the series count): they go to the database.
Label sets are closed (source, reason, kind, severity, sink, topic/partition) and initialised up front
where the values are known here; the dispatcher initialises its configured sinks, the consumer loop the
partitions it is assigned.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import platform
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric

from detector.domain import AlertKind, DeadLetterReason, Exposure, RiskAction, Severity, Verdict

log = logging.getLogger(__name__)

PREFIX = "mia_detector"

SOURCES = ("kafka", "file")  # `Origin.kind`
# What `detector.storage.retention` deletes past its retention, one table each.
RETENTION_TABLES = (
    "sessions", "client_states", "dead_letters", "seen_events", "alerts", "notifications", "risk_audit",
)  # fmt: skip
RETENTION_OUTCOMES = ("completed", "failed")
# Kinds judged per client with a score and a threshold (coordination judges groups of clients).
SCORED_KINDS = tuple(kind for kind in AlertKind if kind is not AlertKind.COORDINATED_CLIENTS)
NOTIFICATION_OUTCOMES = ("delivered", "retried", "failed")
EXPOSURE_KINDS = tuple(Exposure.model_fields)
RISK_ACTIONS = tuple(action.value for action in RiskAction if action is not RiskAction.ALLOW)

# From a second (an event delivered at once) to an hour (a consumer catching up on a backlog).
EVENT_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# Within the process: a batch is decoded, de-duplicated and judged in milliseconds unless something stalls.
RECEIPT_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Around 1, where a client starts to alert.
SCORE_RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 3, 5, 10)
DELIVERY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def package_version() -> str:
    """The installed version of the `mia-detector` distribution ("unknown" when run from a bare tree)."""
    try:
        return metadata.version("mia-detector")
    except metadata.PackageNotFoundError:
        return "unknown"


class BatchHistogram:
    """A histogram observed a batch at a time (one numpy pass instead of a Python call per value), exposed
    exactly like prometheus_client's `Histogram` (`_bucket`, `_count`, `_sum`), optionally by labels.

    `observe` keeps single values aside and counts them `BUFFERED` at a time, or when scraped: a value is
    cheap to observe on the hot path and none is missing from a scrape."""

    BUFFERED = 1024

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry,
        labelnames: Sequence[str] = (),
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._bounds = np.asarray(sorted(buckets), dtype=np.float64)
        # By label values: counts per bucket (the last: above every bound) and the sum.
        self._counts: dict[tuple[str, ...], np.ndarray] = {}
        self._sums: dict[tuple[str, ...], float] = {}
        self._buffered: dict[tuple[str, ...], list[float]] = {}
        self._lock = threading.Lock()
        if not self._labelnames:
            self.labels()
        registry.register(self)

    def labels(self, *values: str) -> None:
        """Start the series of these label values at zero (so that rates see it from the start)."""
        with self._lock:
            self._start(values)

    def _start(self, key: tuple[str, ...]) -> None:
        if len(key) != len(self._labelnames):
            raise ValueError(f"{self._name} has the labels {self._labelnames}, given {key}")
        if key not in self._counts:
            self._counts[key] = np.zeros(len(self._bounds) + 1, dtype=np.int64)
            self._sums[key] = 0.0
            self._buffered[key] = []

    def observe(self, value: float, *labels: str) -> None:
        """Count one value (NaN is ignored)."""
        self.observe_each(((value, labels),))

    def observe_each(self, observations: Iterable[tuple[float, tuple[str, ...]]]) -> None:
        """Count each (value, label values) pair, as `observe` would one by one."""
        with self._lock:
            for value, labels in observations:
                buffered = self._buffered.get(labels)
                if buffered is None:
                    self._start(labels)
                    buffered = self._buffered[labels]
                buffered.append(value)
                if len(buffered) >= self.BUFFERED:
                    self._flush(labels)

    def observe_many(self, values: np.ndarray | Sequence[float], *labels: str) -> None:
        """Count every value of `values` (NaN is ignored)."""
        array = np.asarray(values, dtype=np.float64)
        with self._lock:
            self._start(labels)
            self._count(labels, array)

    def _flush(self, key: tuple[str, ...]) -> None:
        """Count the values kept aside under `key`."""
        buffered = self._buffered[key]
        if buffered:
            self._count(key, np.asarray(buffered, dtype=np.float64))
            buffered.clear()

    def _count(self, key: tuple[str, ...], array: np.ndarray) -> None:
        array = array[~np.isnan(array)]
        if not array.size:
            return
        # side="left": a value equal to a bound falls in that bound's bucket (`le` is "less or equal").
        self._counts[key] += np.bincount(
            np.searchsorted(self._bounds, array, side="left"), minlength=len(self._bounds) + 1
        )
        self._sums[key] += float(array.sum())

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        with self._lock:
            for key in self._buffered:
                self._flush(key)
            series = [(key, np.cumsum(counts), self._sums[key]) for key, counts in self._counts.items()]
        for key, cumulative, total in series:
            buckets = [
                (str(float(bound)), float(count))
                for bound, count in zip(self._bounds, cumulative, strict=False)
            ]
            buckets.append(("+Inf", float(cumulative[-1])))
            family.add_metric(list(key), buckets, total)
        yield family


class ComputedGauge:
    """A gauge whose value is computed at scrape time; no sample at all while `compute` returns None."""

    def __init__(
        self,
        name: str,
        documentation: str,
        compute: Callable[[], float | None],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._compute = compute
        registry.register(self)

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self._name, self._documentation)

    def collect(self) -> Iterator[Metric]:
        value = self._compute()
        if value is not None:
            yield GaugeMetricFamily(self._name, self._documentation, value=value)


class Metrics:
    """The detector's metrics on `registry` (a fresh one by default, so tests never share state).

    `clock` (epoch seconds) is the wall time that latencies and the model's age are measured against.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self._clock = clock

        # -- ingest -------------------------------------------------------------------------------------
        self.events_consumed = Counter(
            f"{PREFIX}_events_consumed_total",
            "Raw records read from a source (Kafka messages or JSON Lines lines)",
            ["source"],
            registry=self.registry,
        )
        for source in SOURCES:
            self.events_consumed.labels(source=source)
        self.queries = Counter(
            f"{PREFIX}_queries_total",
            "Queries (input rows) decoded and counted into sessions",
            registry=self.registry,
        )
        self.duplicate_events = Counter(
            f"{PREFIX}_duplicate_events_total",
            "Events skipped because their event_id was already processed (re-deliveries, producer retries)",
            registry=self.registry,
        )
        self.dead_letters = Counter(
            f"{PREFIX}_dead_letters_total",
            "Records rejected to dead letters, by reason",
            ["reason"],
            registry=self.registry,
        )
        for reason in DeadLetterReason:
            self.dead_letters.labels(reason=reason.value)
        self.consumer_lag = Gauge(
            f"{PREFIX}_consumer_lag_records",
            "Records between the consumer's position and the high watermark, per assigned partition "
            "(as of the consumer's last fetch)",
            ["topic", "partition"],
            registry=self.registry,
        )
        self._lag_partitions: set[tuple[str, int]] = set()
        self.last_event_timestamp = Gauge(
            f"{PREFIX}_last_event_timestamp_seconds",
            "Event time (epoch seconds) of the newest event processed",
            registry=self.registry,
        )
        self._last_event = float("-inf")
        self.latency_from_event = BatchHistogram(
            f"{PREFIX}_processing_latency_from_event_seconds",
            "Seconds from an event's timestamp to the moment the pipeline processed it (per event)",
            EVENT_LATENCY_BUCKETS,
            self.registry,
        )
        self.latency_from_receipt = BatchHistogram(
            f"{PREFIX}_processing_latency_from_receipt_seconds",
            "Seconds from the moment the source read a record to the moment the pipeline processed it "
            "(per record)",
            RECEIPT_LATENCY_BUCKETS,
            self.registry,
        )

        # -- commits and sessions -------------------------------------------------------------------------
        self.commits = Counter(
            f"{PREFIX}_commits_total",
            "Times the pipeline made its results durable and committed source positions",
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            f"{PREFIX}_commit_duration_seconds",
            "Time to write a commit's results to the database and commit offsets",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )
        self.storage_available = Gauge(
            f"{PREFIX}_storage_available",
            "1 while the database answers the pipeline, 0 while it is unreachable or locked (consumption "
            "is then held and the work retried with backoff)",
            registry=self.registry,
        )
        self.storage_available.set(1)
        self.storage_errors = Counter(
            f"{PREFIX}_storage_errors_total",
            "Database reads or writes of the pipeline that failed: unavailable (retried) or failed (the "
            "process stops)",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("unavailable", "failed"):
            self.storage_errors.labels(outcome=outcome)
        self.offset_commit_failures = Counter(
            f"{PREFIX}_offset_commit_failures_total",
            "Offset commits the broker did not take (the database's checkpoints stay authoritative: "
            "records after the broker's offset are de-duplicated when read again)",
            registry=self.registry,
        )
        self.broker_connected = Gauge(
            f"{PREFIX}_broker_connected",
            "1 while the Kafka consumer holds a connection to a broker, 0 while it has none (nothing is "
            "consumed then; the client reconnects with backoff)",
            registry=self.registry,
        )
        self.broker_disconnections = Counter(
            f"{PREFIX}_broker_disconnections_total",
            "Times the Kafka consumer lost its last connection to the brokers",
            registry=self.registry,
        )
        self.fenced_commits = Counter(
            f"{PREFIX}_fenced_commits_total",
            "Commits refused because another member of the consumer group had claimed one of the partitions "
            "(this member had lost them without knowing): nothing stored, what was read is the new owner's",
            registry=self.registry,
        )
        self.positions_beyond_log_end = Counter(
            f"{PREFIX}_positions_beyond_log_end_total",
            "Assigned partitions whose position stored with the results lay beyond the broker's end offset "
            "(the broker lost records, or reports a short end): they resumed where the broker said",
            registry=self.registry,
        )
        self.active_sessions = Gauge(
            f"{PREFIX}_active_sessions",
            "Sessions held in memory",
            registry=self.registry,
        )
        self.sessions_closed = Counter(
            f"{PREFIX}_sessions_closed_total",
            "Sessions ended by the inactivity gap or the maximum duration",
            registry=self.registry,
        )
        # Client-id churn: a stream of fresh keys (one per request) would otherwise go unnoticed, each key
        # too new to alert, while the clients it evicts lose their features.
        self.tracked_clients = Gauge(
            f"{PREFIX}_tracked_clients",
            "(model, client) keys whose streaming features are held in memory (at most "
            "MIA_DETECTION_MAX_CLIENTS)",
            registry=self.registry,
        )
        self.new_clients = Counter(
            f"{PREFIX}_new_clients_total",
            "(model, client) keys the detector started tracking: a first query, or the first since the key "
            "was evicted or released",
            registry=self.registry,
        )
        self.client_evictions = Counter(
            f"{PREFIX}_client_evictions_total",
            "Keys whose features left memory, least recently active first, to stay within "
            "MIA_DETECTION_MAX_CLIENTS: stored at the next commit, they come back from storage with their "
            "next query (without a database to store in, what they showed is forgotten)",
            registry=self.registry,
        )
        self.exposure = Counter(
            f"{PREFIX}_exposure_total",
            "What clients were given by the models, summed over every client (per client: `mia-detector "
            "clients show`): probability_records (distinct records answered with a confidence vector), "
            "training_records (of those, in the training-set index), label_only_answers, probes "
            "(near-duplicate variants in bursts)",
            labelnames=["kind"],
            registry=self.registry,
        )
        for kind in EXPOSURE_KINDS:
            self.exposure.labels(kind=kind)
        self.clients_released = Counter(
            f"{PREFIX}_clients_released_total",
            "Idle keys (no query for the session gap and the allowed lateness, in event time) whose stored "
            "features left memory at a commit: they come back from storage with their next query",
            registry=self.registry,
        )

        # -- detection and alerts -------------------------------------------------------------------------
        self.score_ratio = BatchHistogram(
            f"{PREFIX}_score_ratio",
            "Each judged client's score divided by its threshold, by alert kind (the strongest rule of the "
            "kind, or the anomaly model); 1 or more alerts unless allow-listed",
            SCORE_RATIO_BUCKETS,
            self.registry,
            labelnames=["kind"],
        )
        # A ratio is observed for every kind of every judged client: kept aside, counted in batches.
        self._score_kinds: dict[AlertKind, str] = {kind: kind.value for kind in SCORED_KINDS}
        for label in self._score_kinds.values():
            self.score_ratio.labels(label)
        self.alerts_opened = Counter(
            f"{PREFIX}_alerts_opened_total",
            "Alerts opened, by kind and severity",
            ["kind", "severity"],
            registry=self.registry,
        )
        self.alerts_resolved = Counter(
            f"{PREFIX}_alerts_resolved_total",
            "Alerts resolved (quiet for the resolve period, or by an operator), by kind and severity",
            ["kind", "severity"],
            registry=self.registry,
        )
        for kind in AlertKind:
            for severity in Severity:
                self.alerts_opened.labels(kind=kind.value, severity=severity.value)
                self.alerts_resolved.labels(kind=kind.value, severity=severity.value)

        # -- notifications (the dispatcher; sink: alertmanager, pagerduty, slack, webhook, ocsf-file,
        # ocsf-kafka) -------------------------------------------------------------------------------------
        self.notifications = Counter(
            f"{PREFIX}_notifications_total",
            "Notification delivery attempts by sink and outcome (delivered; retried: a transient failure, "
            "tried again later; failed: rejected by the receiver, given up)",
            ["sink", "outcome"],
            registry=self.registry,
        )
        self.notifications_pending = Gauge(
            f"{PREFIX}_notifications_pending",
            "Notifications in the outbox not yet delivered to the sink",
            ["sink"],
            registry=self.registry,
        )
        self.notification_oldest_pending = Gauge(
            f"{PREFIX}_notification_oldest_pending_seconds",
            "Age of the oldest notification waiting for the sink (0 when none waits)",
            ["sink"],
            registry=self.registry,
        )
        self.notification_delivery_seconds = Histogram(
            f"{PREFIX}_notification_delivery_duration_seconds",
            "Time a successful delivery to the sink took",
            ["sink"],
            buckets=DELIVERY_BUCKETS,
            registry=self.registry,
        )
        self.outbox_backpressure = Gauge(
            f"{PREFIX}_outbox_backpressure",
            "1 while consumption is held because too many notifications are undelivered, else 0",
            registry=self.registry,
        )
        self.backpressure_seconds = Counter(
            f"{PREFIX}_backpressure_seconds_total",
            "Seconds consumption was held for undelivered notifications",
            registry=self.registry,
        )

        # -- what is running ------------------------------------------------------------------------------
        self.model_info = Gauge(
            f"{PREFIX}_model_info",
            "1 for the scoring model loaded, by version (no series when no model is loaded)",
            ["version"],
            registry=self.registry,
        )
        self._model_trained_at: float | None = None
        self.model_age_seconds = ComputedGauge(
            f"{PREFIX}_model_age_seconds",
            "Seconds since the loaded scoring model was trained (no series when no model is loaded)",
            self._model_age,
            self.registry,
        )
        self.build_info = Info(
            f"{PREFIX}_build",
            "The detector's package version and the Python it runs on",
            registry=self.registry,
        )
        self.build_info.info({"version": package_version(), "python": platform.python_version()})

        # -- housekeeping -----------------------------------------------------------------------------------
        self.risk_refreshed = Gauge(
            f"{PREFIX}_risk_refreshed_timestamp_seconds",
            "When the risk feed last read the decisions from the database (wall time): the endpoint and "
            "the topic answer what was read then",
            registry=self.registry,
        )
        self.risk_refresh_failures = Counter(
            f"{PREFIX}_risk_refresh_failures_total",
            "Reads of the risk decisions that failed (the feed serves the last ones read meanwhile)",
            registry=self.registry,
        )
        self.risk_in_force = Gauge(
            f"{PREFIX}_risk_decisions_in_force",
            "Clients with a risk decision in force, by action, as of the last refresh",
            labelnames=["action"],
            registry=self.registry,
        )
        for action in RISK_ACTIONS:
            self.risk_in_force.labels(action=action)
        self.risk_published = Counter(
            f"{PREFIX}_risk_records_published_total",
            "Records sent to the risk topic (MIA_RISK_TOPIC): a client's decision, or a tombstone when it "
            "went back to allow",
            labelnames=["record"],
            registry=self.registry,
        )
        for record in ("decision", "tombstone"):
            self.risk_published.labels(record=record)
        self.risk_publish_failures = Counter(
            f"{PREFIX}_risk_publish_failures_total",
            "Refreshes whose changes could not be published to the risk topic (published again at the next)",
            registry=self.registry,
        )
        self.retention_deleted = Counter(
            f"{PREFIX}_retention_deleted_rows_total",
            "Rows deleted because they were older than their retention, by table",
            ["table"],
            registry=self.registry,
        )
        for table in RETENTION_TABLES:
            self.retention_deleted.labels(table=table)
        self.retention_runs = Counter(
            f"{PREFIX}_retention_runs_total",
            "Scheduled retention runs of the daemon, by outcome (failed: the database refused or was "
            "unreachable; the next run tries again)",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in RETENTION_OUTCOMES:
            self.retention_runs.labels(outcome=outcome)
        # Detection canaries: NaN until one is injected or settles (always, with canaries off), so that the
        # alerting rules on them stay quiet where there are none.
        self.canary_last_run = Gauge(
            f"{PREFIX}_canary_last_run_timestamp_seconds",
            "When the daemon last injected a detection canary (Unix time)",
            registry=self.registry,
        )
        self.canary_last_outcome = Gauge(
            f"{PREFIX}_canary_last_outcome",
            "The last detection canary settled: 1 its alert was raised within the deadline, 0 it was not "
            "(canary_missed was raised through the sinks)",
            registry=self.registry,
        )
        self.canary_last_latency = Gauge(
            f"{PREFIX}_canary_last_latency_seconds",
            "Wall time from the injection of the last canary whose alert was raised to that alert being "
            "raised (stored with its transaction)",
            registry=self.registry,
        )
        for gauge in (self.canary_last_run, self.canary_last_outcome, self.canary_last_latency):
            gauge.set(float("nan"))
        self.metrics_unauthorized = Counter(
            f"{PREFIX}_metrics_unauthorized_requests_total",
            "Requests for /metrics refused for missing or wrong basic-auth credentials",
            registry=self.registry,
        )

    # -- one-line call sites ------------------------------------------------------------------------------

    def observe_processed(self, event_times: Sequence[float], received_times: Sequence[float]) -> None:
        """The pipeline has just processed events with these event times, from records the source read at
        `received_times` (epoch seconds): observe both latencies and move the newest event time."""
        now = self._clock()
        if received_times:
            self.latency_from_receipt.observe_many(now - np.asarray(received_times, dtype=np.float64))
        if event_times:
            times = np.asarray(event_times, dtype=np.float64)
            # An event stamped ahead of this clock (skew between hosts) was processed at once, not before.
            self.latency_from_event.observe_many(np.maximum(now - times, 0.0))
            newest = float(times.max())
            if newest > self._last_event:
                self._last_event = newest
                self.last_event_timestamp.set(newest)

    def add_sink(self, sink: str) -> None:
        """Start the notification series of `sink` at zero, so that rates and alerts see it from the start."""
        for outcome in NOTIFICATION_OUTCOMES:
            self.notifications.labels(sink=sink, outcome=outcome)
        self.notifications_pending.labels(sink=sink).set(0)
        self.notification_oldest_pending.labels(sink=sink).set(0)
        self.notification_delivery_seconds.labels(sink=sink)

    def observe_lag(self, lag: Mapping[tuple[str, int], int]) -> None:
        """Set the lag of each (topic, partition); partitions no longer listed lose their series."""
        for topic, partition in self._lag_partitions - lag.keys():
            self.consumer_lag.remove(topic, str(partition))
        for (topic, partition), records in lag.items():
            self.consumer_lag.labels(topic=topic, partition=str(partition)).set(records)
        self._lag_partitions = set(lag)

    def observe_score_ratio(self, verdicts: Iterable[Verdict]) -> None:
        """Each verdict on a judged client: its score over its threshold, under its alert kind."""
        kinds = self._score_kinds
        self.score_ratio.observe_each(
            (verdict.ratio, (kinds[verdict.kind],)) for verdict in verdicts if verdict.kind in kinds
        )

    def set_model(self, version: str | None, trained_at: float | None = None) -> None:
        """The scoring model in use (None: none), trained at `trained_at` (epoch seconds); without it, the
        model's age is not exported."""
        self.model_info.clear()
        if version is None:
            self._model_trained_at = None
            return
        self.model_info.labels(version=version).set(1)
        self._model_trained_at = trained_at

    def _model_age(self) -> float | None:
        trained_at = self._model_trained_at
        return None if trained_at is None else max(0.0, self._clock() - trained_at)

    def serve(
        self,
        host: str,
        port: int,
        *,
        auth: BasicAuth | None = None,
        tls: ssl.SSLContext | None = None,
        limits: ServerLimits | None = None,
    ) -> Callable[[], None]:
        """Serve `/metrics` on `host:port` from a background thread; return the function that stops it.

        With `auth`, `/metrics` answers 401 to a request without those credentials; with `tls` (a server
        context), every connection is TLS, and plain HTTP gets no answer. `/healthz` answers `ok` to anyone,
        for liveness probes that hold no credentials. Each connection has its own thread, bounded in number
        and in time (`limits`), so a client sending garbage or holding a connection never stalls a scrape.

        Raises `OSError` when the address cannot be bound (in use, not local).
        """
        app = metrics_app(self.registry, auth, on_unauthorized=self.metrics_unauthorized.inc)
        server = MetricsServer((host, port), app, tls=tls, limits=limits or ServerLimits())
        thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
        thread.start()

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        return stop


# -- the endpoint --------------------------------------------------------------------------------------------

_StartResponse = Callable[..., Any]
_App = Callable[[dict[str, Any], _StartResponse], Iterable[bytes]]
_SERVER_NAME = "mia-detector"  # in the Server header: no Python or library version for a scanner to read


@dataclass(frozen=True)
class BasicAuth:
    """The one username and password `/metrics` accepts (HTTP basic authentication, UTF-8)."""

    username: str
    password: str = field(repr=False)

    def allows(self, authorization: str | None) -> bool:
        """Whether the `Authorization` header value `authorization` carries these credentials.

        Compared in constant time: SHA-256 digests of both parts, each compared in full, so that neither
        the length nor the first differing byte of a guess shows in the time taken.
        """
        scheme, _, token = (authorization or "").strip().partition(" ")
        user, password = b"", b""
        basic = scheme.lower() == "basic"
        if basic:
            try:
                decoded = base64.b64decode(token.strip(), validate=True)
            except (binascii.Error, ValueError):
                basic = False
            else:
                user, _, password = decoded.partition(b":")
        same_user = hmac.compare_digest(_digest(user), _digest(self.username.encode()))
        same_password = hmac.compare_digest(_digest(password), _digest(self.password.encode()))
        return basic & same_user & same_password


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


@dataclass(frozen=True)
class ServerLimits:
    """Bounds of the metrics endpoint: connections served at once (more are closed at once, not queued),
    seconds any one read or write (the TLS handshake included) may wait, and seconds a connection may
    last in all."""

    max_connections: int = 32
    io_timeout_seconds: float = 10.0
    connection_seconds: float = 30.0


def metrics_app(
    registry: CollectorRegistry, auth: BasicAuth | None, on_unauthorized: Callable[[], None]
) -> _App:
    """The WSGI application of the endpoint: `GET /metrics` (behind `auth` when given) and `GET /healthz`.

    A refused request gets a short fixed text: never a metric, a traceback or what was sent.
    """
    exposition = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") != "GET":
            return _answer(start_response, "405 Method Not Allowed", b"GET only\n", [("Allow", "GET")])
        if path == "/healthz":
            return _answer(start_response, "200 OK", b"ok\n")
        if path != "/metrics":
            return _answer(start_response, "404 Not Found", b"not found: try /metrics\n")
        if auth is not None and not auth.allows(environ.get("HTTP_AUTHORIZATION")):
            on_unauthorized()
            challenge = ("WWW-Authenticate", 'Basic realm="mia-detector", charset="UTF-8"')
            return _answer(start_response, "401 Unauthorized", b"unauthorized\n", [challenge])
        try:
            return list(exposition(environ, start_response))
        except Exception as error:  # a collector failed: the scrape fails, the endpoint stays up
            log.warning("metrics not collected: %s: %s", type(error).__name__, error)
            return _answer(start_response, "500 Internal Server Error", b"metrics not collected\n")

    return app


def _answer(
    start_response: _StartResponse, status: str, body: bytes, headers: Sequence[tuple[str, str]] = ()
) -> list[bytes]:
    start_response(
        status,
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))), *headers],
    )
    return [body]


class _ServerHandler(ServerHandler):
    server_software = _SERVER_NAME

    def log_exception(self, exc_info: Any) -> None:
        # wsgiref prints a traceback on stderr, e.g. when a client stops reading: one debug line instead.
        log.debug("metrics response not sent: %s", exc_info[1])


class _RequestHandler(WSGIRequestHandler):
    """One request a connection, no access log (a line per scrape would drown the daemon's own), no
    version in the Server header, errors as a fixed line, and no traceback on stderr for what a client
    sent."""

    error_message_format = "%(code)d %(message)s\n"
    error_content_type = "text/plain; charset=utf-8"

    def version_string(self) -> str:
        return _SERVER_NAME

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # The standard phrase only: the default message quotes what the client sent.
        super().send_error(code)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle(self) -> None:
        # WSGIRequestHandler.handle, with a ServerHandler that names no Python version.
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.requestline = self.request_version = self.command = ""
            self.send_error(414)
            return
        if not self.parse_request():  # an error answer has been sent
            return
        handler = _ServerHandler(
            self.rfile,
            self.wfile,  # type: ignore[arg-type]  # a socket writer, as wsgiref passes it
            self.get_stderr(),
            self.get_environ(),
            multithread=False,
        )
        handler.request_handler = self  # type: ignore[attr-defined]
        handler.run(self.server.get_app())  # type: ignore[attr-defined]


class MetricsServer(WSGIServer):
    """A thread per connection, at most `limits.max_connections` at once, each bounded in time.

    With `tls`, the handshake happens on the connection's own thread, within the I/O timeout: accepting
    stays free for the next client whatever this one does (a TLS listening socket would shake hands in the
    accepting thread, where one silent client stops every scrape). `serve_forever`'s loop shuts down
    connections older than `limits.connection_seconds`.
    """

    request_queue_size = 64

    def __init__(
        self, address: tuple[str, int], app: _App, *, tls: ssl.SSLContext | None, limits: ServerLimits
    ) -> None:
        host, port = address
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        self.address_family = family  # IPv6 for [::1]:9108
        self._tls = tls
        self._limits = limits
        self._lock = threading.Lock()
        # Open connections by file descriptor, with their deadline (monotonic). An entry is removed before
        # its socket is closed, under the lock, so a descriptor listed here is never another socket's.
        self._open: dict[int, float] = {}
        super().__init__((str(sockaddr[0]), int(sockaddr[1])), _RequestHandler)
        self.set_app(app)

    def process_request(self, request: Any, client_address: Any) -> None:
        fileno = request.fileno()
        deadline = time.monotonic() + self._limits.connection_seconds
        with self._lock:
            admitted = len(self._open) < self._limits.max_connections
            if admitted:
                self._open[fileno] = deadline
        if not admitted:
            self.shutdown_request(request)
            return
        try:
            threading.Thread(
                target=self._serve_connection, args=(request, client_address), daemon=True
            ).start()
        except RuntimeError:  # no thread to be had: this client fails, the next scrape tries again
            self._release(fileno, request)

    def _serve_connection(self, request: socket.socket, client_address: Any) -> None:
        fileno = request.fileno()
        connection: socket.socket | None = None
        try:
            request.settimeout(self._limits.io_timeout_seconds)
            # TLS on a duplicate descriptor: whatever the handshake does with its socket, the tracked
            # descriptor stays open until `_release`.
            connection = (
                self._tls.wrap_socket(request.dup(), server_side=True) if self._tls is not None else request
            )
            self.finish_request(connection, client_address)
        except Exception as error:  # a failed handshake, a client gone or too slow: its connection only
            log.debug("metrics connection from %s dropped: %s", client_address[0], error)
        finally:
            if connection is not None and connection is not request:
                self.shutdown_request(connection)
            self._release(fileno, request)

    def _release(self, fileno: int, request: socket.socket) -> None:
        with self._lock:
            self._open.pop(fileno, None)
        self.shutdown_request(request)

    def service_actions(self) -> None:
        """Shut down connections past their deadline (their threads then see the connection closed)."""
        now = time.monotonic()
        with self._lock:
            for fileno in [fileno for fileno, deadline in self._open.items() if deadline < now]:
                _shutdown(fileno)
                self._open[fileno] = float("inf")  # once; its thread removes it

    def server_close(self) -> None:
        with self._lock:
            for fileno in self._open:
                _shutdown(fileno)
        super().server_close()


def _shutdown(fileno: int) -> None:
    """Shut down the socket of descriptor `fileno` for both directions, leaving it open (its owner closes
    it): a thread blocked reading or writing it returns at once."""
    try:
        sock = socket.socket(fileno=fileno)
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()
