"""Detector health: what runs, throughput, Kafka lag, latency, detection and back-pressure."""

from __future__ import annotations

from detector.dashboards.builder import (
    JSON,
    Dashboard,
    Target,
    bar_gauge,
    promql,
    sql,
    stat,
    table,
    thresholds,
    timeseries,
)
from detector.dashboards.common import (
    HEALTH_UID,
    JOB_VARIABLE,
    TAG,
    alert_annotation,
    datasource_variables,
    metric,
    quantile,
    rate,
)

DAY = 86_400
QUANTILES = (0.5, 0.95, 0.99)


def quantiles(histogram: str) -> list[Target]:
    """p50, p95 and p99 of `histogram` as three queries."""
    return [promql(quantile(q, histogram), f"p{round(q * 100)}") for q in QUANTILES]


def build(links: list[JSON]) -> JSON:
    """The detector-health dashboard; `links` go to the other dashboards."""
    board = Dashboard(
        uid=HEALTH_UID,
        title="mia-detector: detector health",
        description="Is the detector keeping up? Build and model, throughput, consumer lag, processing "
        "latency, commits, sessions in memory, score distribution and notification back-pressure.",
        tags=[TAG],
        variables=[*datasource_variables(), JOB_VARIABLE],
        annotations=[alert_annotation()],
        links=links,
        time_from="now-6h",
        refresh="30s",
    )
    board.add(
        stat(
            "Build",
            "The detector's package version and Python, per running instance.",
            [promql(metric("build_info"), "{{version}} (Python {{python}})", instant=True)],
            show_name=True,
        ),
        stat(
            "Scoring model",
            "Version of the scoring model loaded (none: rules only).",
            [promql(metric("model_info"), "{{version}}", instant=True)],
            show_name=True,
        ),
        stat(
            "Model age",
            "Time since the loaded scoring model was trained: retrain as traffic drifts.",
            [promql(f"max({metric('model_age_seconds')})", "age", instant=True)],
            unit="s",
            steps=thresholds((30 * DAY, "orange"), (90 * DAY, "red")),
        ),
        stat(
            "Sessions in memory",
            "Sessions held in memory across instances (bounded by the sessions' max_active).",
            [promql(f"sum({metric('active_sessions')})", "sessions", instant=True)],
        ),
        stat(
            "Newest event age",
            "Wall time since the event time of the newest event processed: how far behind the stream the "
            "detector is (large for replayed history).",
            [promql(f"time() - max({metric('last_event_timestamp_seconds')})", "age", instant=True)],
            unit="s",
            steps=thresholds((300, "orange"), (3600, "red")),
        ),
        stat(
            "Consumption",
            "What holds consumption, if anything: too many undelivered notifications (the outbox over its "
            "limit), a database that does not take the results (retried with backoff), or no connection to "
            "any Kafka broker. Nothing is lost while held; nothing is detected either.",
            [
                promql(f"max({metric('outbox_backpressure')})", "outbox", instant=True),
                promql(f"1 - min({metric('storage_available')})", "database", instant=True),
                promql(f"1 - min({metric('broker_connected')})", "brokers", instant=True),
            ],
            mappings=[
                {
                    "type": "value",
                    "options": {
                        "0": {"index": 0, "text": "flowing", "color": "green"},
                        "1": {"index": 1, "text": "held", "color": "red"},
                    },
                }
            ],
            steps=thresholds((1, "red")),
        ),
    )

    board.row("Throughput")
    board.add(
        timeseries(
            "Records and queries per second",
            "Records read by source, queries decoded, and re-delivered events skipped as duplicates.",
            [
                promql(rate("events_consumed_total", by="source"), "records ({{source}})"),
                promql(rate("queries_total"), "queries"),
                promql(rate("duplicate_events_total"), "duplicates skipped"),
            ],
            unit="ops",
            width=8,
        ),
        timeseries(
            "Commits and closed sessions per second",
            "How often results are made durable and offsets committed, and sessions ended.",
            [
                promql(rate("commits_total"), "commits"),
                promql(rate("sessions_closed_total"), "sessions closed"),
            ],
            unit="ops",
            width=8,
        ),
        timeseries(
            "Sessions in memory",
            "Sessions held in memory, per instance.",
            [promql(f"sum by (instance) ({metric('active_sessions')})", "{{instance}}")],
            width=8,
        ),
    )

    board.row("Kafka")
    board.add(
        timeseries(
            "Consumer lag by partition",
            "Records between each assigned partition's position and its high watermark (as of the "
            "consumer's last fetch).",
            [
                promql(
                    f"sum by (topic, partition) ({metric('consumer_lag_records')})",
                    "{{topic}}[{{partition}}]",
                )
            ],
            stacked=True,
            width=14,
        ),
        table(
            "Committed positions",
            "The next offset each consumer group reads per partition, committed with the results (database).",
            [
                sql(
                    """
SELECT group_id AS "group", topic, partition, next_offset AS "next offset", updated_at AS committed
FROM consumer_checkpoints
ORDER BY group_id, topic, partition
"""
                )
            ],
            width=10,
        ),
    )

    board.row("Latency")
    board.add(
        timeseries(
            "Processing latency from receipt",
            "From the moment the source read a record to the moment the pipeline processed it.",
            quantiles("processing_latency_from_receipt_seconds"),
            unit="s",
            width=8,
        ),
        timeseries(
            "Processing latency from event time",
            "From an event's own timestamp to its processing: includes the producers' and Kafka's delay.",
            quantiles("processing_latency_from_event_seconds"),
            unit="s",
            width=8,
        ),
        timeseries(
            "Commit duration",
            "Time to write a commit's results to the database and commit offsets.",
            quantiles("commit_duration_seconds"),
            unit="s",
            width=8,
        ),
    )

    board.row("Detection and notifications")
    board.add(
        bar_gauge(
            "Score ratio distribution",
            "Judged clients' score over threshold, over the range, every kind (1 or more alerts unless "
            "allow-listed).",
            [
                promql(
                    f"sum by (le) (increase({metric('score_ratio_bucket')}[$__range]))",
                    "{{le}}",
                    instant=True,
                    heatmap=True,
                )
            ],
            width=8,
        ),
        timeseries(
            "99th percentile score ratio by kind",
            "The highest score ratios per alert kind: near 1, clients are close to alerting.",
            [promql(quantile(0.99, "score_ratio", by="kind"), "{{kind}}")],
            width=8,
        ),
        timeseries(
            "Back-pressure",
            "Share of time consumption was held for undelivered notifications, and whether it is held.",
            [
                promql(rate("backpressure_seconds_total"), "share of time held"),
                promql(f"max({metric('outbox_backpressure')})", "held"),
            ],
            unit="percentunit",
            width=8,
        ),
        timeseries(
            "Notification delivery duration (p95) by sink",
            "Time a successful delivery took, per sink.",
            [promql(quantile(0.95, "notification_delivery_duration_seconds", by="sink"), "{{sink}}")],
            unit="s",
            width=12,
        ),
        timeseries(
            "Judged clients per second by kind",
            "How often clients are scored against each alert kind.",
            [promql(rate("score_ratio_count", by="kind"), "{{kind}}")],
            unit="ops",
            width=12,
        ),
    )
    return board.json()
