"""Every Prometheus metric of the detector, defined once, on a registry that tests can inject.

Client ids never become label values (they would explode the series count): they go to the database.
Label sets are closed (source, reason, kind, severity, sink, topic/partition) and initialised up front
where the values are known here; the dispatcher initialises its configured sinks, the consumer loop the
partitions it is assigned.
"""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from importlib import metadata

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric

from detector.domain import AlertKind, DeadLetterReason, Severity, Verdict

PREFIX = "mia_detector"

SOURCES = ("kafka", "file")  # `Origin.kind`
# Kinds judged per client with a score and a threshold (coordination judges groups of clients).
SCORED_KINDS = tuple(kind for kind in AlertKind if kind is not AlertKind.COORDINATED_CLIENTS)
NOTIFICATION_OUTCOMES = ("delivered", "retried", "failed")

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
    """A histogram observed a whole batch at a time (one numpy pass instead of a Python call per value),
    exposed exactly like prometheus_client's `Histogram` (`_bucket`, `_count`, `_sum`)."""

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = np.asarray(sorted(buckets), dtype=np.float64)
        self._counts = np.zeros(len(self._bounds) + 1, dtype=np.int64)  # the last: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, value: float) -> None:
        """Count one value."""
        self.observe_many(np.array([value], dtype=np.float64))

    def observe_many(self, values: np.ndarray | Sequence[float]) -> None:
        """Count every value of `values` (NaN is ignored)."""
        array = np.asarray(values, dtype=np.float64)
        array = array[~np.isnan(array)]
        if not array.size:
            return
        # side="left": a value equal to a bound falls in that bound's bucket (`le` is "less or equal").
        counts = np.bincount(np.searchsorted(self._bounds, array, side="left"), minlength=len(self._counts))
        total = float(array.sum())
        with self._lock:
            self._counts += counts
            self._sum += total

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._documentation)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            cumulative = np.cumsum(self._counts)
            total = self._sum
        buckets = [
            (str(float(bound)), float(count)) for bound, count in zip(self._bounds, cumulative, strict=False)
        ]
        buckets.append(("+Inf", float(cumulative[-1])))
        yield HistogramMetricFamily(self._name, self._documentation, buckets=buckets, sum_value=total)


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
            "was evicted",
            registry=self.registry,
        )
        self.client_evictions = Counter(
            f"{PREFIX}_client_evictions_total",
            "Keys whose features were dropped, least recently active first, to stay within "
            "MIA_DETECTION_MAX_CLIENTS: what they showed so far is forgotten",
            registry=self.registry,
        )

        # -- detection and alerts -------------------------------------------------------------------------
        self.score_ratio = Histogram(
            f"{PREFIX}_score_ratio",
            "Each judged client's score divided by its threshold, by alert kind (the strongest rule of the "
            "kind, or the anomaly model); 1 or more alerts unless allow-listed",
            ["kind"],
            buckets=SCORE_RATIO_BUCKETS,
            registry=self.registry,
        )
        # Bound children: a ratio is observed for every kind of every judged client.
        self._score_ratio: dict[AlertKind, Histogram] = {
            kind: self.score_ratio.labels(kind=kind.value) for kind in SCORED_KINDS
        }
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
        for verdict in verdicts:
            child = self._score_ratio.get(verdict.kind)
            if child is not None:
                child.observe(verdict.ratio)

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

    def serve(self, host: str, port: int) -> Callable[[], None]:
        """Serve `/metrics` on `host:port` from a background thread; return the function that stops it.

        Raises `OSError` when the address cannot be bound (in use, not local).
        """
        server, thread = start_http_server(port, addr=host, registry=self.registry)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        return stop
