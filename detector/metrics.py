"""Every Prometheus metric of the detector, defined once, on a registry that tests can inject.

Client ids never become label values (they would explode the series count): they go to the database.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from detector.ingest.records import DeadLetterReason

PREFIX = "mia_detector"


class Metrics:
    """The detector's metrics on `registry` (a fresh one by default, so tests never share state)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.events_consumed = Counter(
            f"{PREFIX}_events_consumed_total",
            "Raw records read from a source (Kafka messages or JSON Lines lines)",
            ["source"],
            registry=self.registry,
        )
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
        self.active_sessions = Gauge(
            f"{PREFIX}_active_sessions",
            "Sessions held in memory",
            registry=self.registry,
        )
        self.alerts_opened = Counter(
            f"{PREFIX}_alerts_opened_total",
            "Alerts opened, by kind and severity",
            ["kind", "severity"],
            registry=self.registry,
        )
        self.sessions_closed = Counter(
            f"{PREFIX}_sessions_closed_total",
            "Sessions ended by the inactivity gap or the maximum duration",
            registry=self.registry,
        )
