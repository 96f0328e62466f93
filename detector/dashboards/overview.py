"""The overview: traffic, detections, suspicious clients, dead letters and notification health."""

from __future__ import annotations

from detector.dashboards.builder import (
    JSON,
    Dashboard,
    bar_gauge,
    field_override,
    promql,
    sql,
    stat,
    table,
    thresholds,
    timeseries,
)
from detector.dashboards.common import (
    JOB_VARIABLE,
    MODEL_VARIABLE,
    OVERVIEW_UID,
    TAG,
    alert_annotation,
    alert_overlaps_range,
    client_links,
    datasource_variables,
    in_models,
    metric,
    rate,
    session_overlaps_range,
)


def build(links: list[JSON]) -> JSON:
    """The overview dashboard; `links` go to the other dashboards."""
    board = Dashboard(
        uid=OVERVIEW_UID,
        title="mia-detector: overview",
        description="Traffic, membership-inference detections, suspicious clients, dead letters and the "
        "delivery of notifications, from Prometheus and the detector's database.",
        tags=[TAG],
        variables=[*datasource_variables(), JOB_VARIABLE, MODEL_VARIABLE],
        annotations=[alert_annotation(in_models())],
        links=links,
        time_from="now-24h",
    )
    board.add(
        stat(
            "Open alerts",
            "Alerts open now for the chosen models (database).",
            [sql(f"SELECT count(*) AS \"open alerts\" FROM alerts WHERE status = 'open' AND {in_models()}")],
            steps=thresholds((1, "red")),
        ),
        stat(
            "Clients with open alerts",
            "Distinct clients named by an open alert, coordinated groups counted member by member.",
            [
                sql(
                    f"""
SELECT count(DISTINCT c.client_id) AS clients
FROM alerts AS a CROSS JOIN LATERAL json_array_elements_text(a.client_ids) AS c(client_id)
WHERE a.status = 'open' AND {in_models("a.")}
"""
                )
            ],
            steps=thresholds((1, "orange")),
        ),
        stat(
            "Clients seen",
            "Distinct clients with a session in the time range (event time).",
            [
                sql(
                    "SELECT count(DISTINCT client_id) AS clients FROM sessions "
                    f"WHERE {session_overlaps_range()} AND {in_models()}"
                )
            ],
        ),
        stat(
            "Records per second",
            "Records read from every source, now.",
            [promql(rate("events_consumed_total"), "records/s", instant=True)],
            unit="ops",
        ),
        stat(
            "Dead letters in range",
            "Records rejected as undecodable over the time range.",
            [
                promql(
                    f"sum(increase({metric('dead_letters_total')}[$__range]))", "dead letters", instant=True
                )
            ],
            steps=thresholds((1, "orange")),
        ),
        stat(
            "Notifications pending",
            "Notifications in the outbox not yet delivered, every sink.",
            [promql(f"sum({metric('notifications_pending')})", "pending", instant=True)],
            steps=thresholds((1, "orange"), (100, "red")),
        ),
    )

    board.row("Traffic")
    board.add(
        timeseries(
            "Records and queries per second",
            "Records read by source, and the queries (input rows) decoded from them.",
            [
                promql(rate("events_consumed_total", by="source"), "records ({{source}})"),
                promql(rate("queries_total"), "queries"),
            ],
            unit="ops",
        ),
        timeseries(
            "Queries by model",
            "Queries per model, from the sessions table (metrics carry no model label): each session's "
            "queries counted when it was last seen (event time).",
            [
                sql(
                    f"""
SELECT $__timeGroupAlias(last_seen, $__interval), model AS metric, sum(queries) AS queries
FROM sessions
WHERE $__timeFilter(last_seen) AND {in_models()}
GROUP BY 1, 2
ORDER BY 1
""",
                    series=True,
                )
            ],
            bars=True,
            stacked=True,
        ),
        table(
            "Traffic by model",
            "Per model over the time range (event time): clients, sessions, queries and requests.",
            [
                sql(
                    f"""
SELECT
  model,
  count(DISTINCT client_id) AS clients,
  count(*) AS sessions,
  count(*) FILTER (WHERE status = 'open') AS "open sessions",
  sum(queries) AS queries,
  sum(requests) AS requests,
  sum(confidence_queries) AS "confidence queries",
  max(last_seen) AS "last seen"
FROM sessions
WHERE {session_overlaps_range()} AND {in_models()}
GROUP BY model
ORDER BY queries DESC
"""
                )
            ],
            height=6,
        ),
    )

    board.row("Detections")
    board.add(
        timeseries(
            "Alerts opened per minute by kind and severity",
            "New alerts, by the attack pattern they report and their severity: low ones are exposure, "
            "recorded but not paged (Prometheus).",
            [promql(f"{rate('alerts_opened_total', by='kind, severity')} * 60", "{{kind}} / {{severity}}")],
            stacked=True,
        ),
        bar_gauge(
            "Open alerts by kind and severity",
            "Alerts open now for the chosen models (database).",
            [
                sql(
                    f"""
SELECT kind || ' / ' || severity AS "kind / severity", count(*) AS alerts
FROM alerts
WHERE status = 'open' AND {in_models()}
GROUP BY kind, severity
ORDER BY alerts DESC, 1
"""
                )
            ],
            rows=True,
            steps=thresholds((1, "orange"), (10, "red")),
        ),
        table(
            "Top suspicious clients",
            "Clients named by alerts open during the range, strongest first: the alert with the highest "
            "score over threshold, its rule and top reason. Members of coordinated groups are listed "
            "one by one. Click a client to investigate it.",
            [
                sql(
                    f"""
WITH named AS (
  SELECT
    c.client_id, a.model, a.kind, a.severity, a.status, a.rule_id, a.score,
    a.score / NULLIF(a.threshold, 0) AS ratio,
    (a.reasons -> 0 ->> 'feature') || ' = ' || (a.reasons -> 0 ->> 'value') AS top_reason,
    a.raised_at
  FROM alerts AS a CROSS JOIN LATERAL json_array_elements_text(a.client_ids) AS c(client_id)
  WHERE {alert_overlaps_range("a.")} AND {in_models("a.")}
), strongest AS (
  SELECT DISTINCT ON (client_id, model)
    *,
    count(*) OVER per_client AS alerts,
    count(*) FILTER (WHERE status = 'open') OVER per_client AS open,
    max(raised_at) OVER per_client AS last_raised
  FROM named
  WINDOW per_client AS (PARTITION BY client_id, model)
  ORDER BY client_id, model, ratio DESC NULLS LAST
)
SELECT
  client_id AS client, model, kind, severity, rule_id AS rule,
  round(ratio::numeric, 2) AS "score / threshold", score, top_reason AS "top reason",
  alerts, open, last_raised AS "last raised"
FROM strongest
ORDER BY ratio DESC NULLS LAST, alerts DESC
LIMIT 25
"""
                )
            ],
            overrides=[field_override("client", links=client_links())],
            height=9,
        ),
    )

    board.row("Dead letters")
    board.add(
        timeseries(
            "Dead letters per second by reason",
            "Records rejected to dead letters, by why they could not be decoded.",
            [promql(rate("dead_letters_total", by="reason"), "{{reason}}")],
            unit="ops",
            width=8,
        ),
        bar_gauge(
            "Dead letters by reason in range",
            "Records rejected over the time range, by reason.",
            [
                promql(
                    f"sum by (reason) (increase({metric('dead_letters_total')}[$__range]))",
                    "{{reason}}",
                    instant=True,
                )
            ],
            steps=thresholds((1, "orange")),
            width=6,
        ),
        table(
            "Latest dead letters",
            "The newest rejected records in the range: why, and where they came from (raw bytes stay in the "
            "database).",
            [
                sql(
                    """
SELECT
  created_at AS "stored", reason, left(detail, 200) AS detail, origin_kind AS source,
  origin_name AS "topic / file", partition, position, raw_size AS "bytes"
FROM dead_letters
WHERE $__timeFilter(created_at)
ORDER BY created_at DESC, id DESC
LIMIT 50
"""
                )
            ],
            width=10,
        ),
    )

    board.row("Notifications")
    board.add(
        timeseries(
            "Delivery attempts by sink and outcome",
            "Per second: delivered; retried (a transient failure, tried again later); failed (rejected by "
            "the receiver, given up).",
            [promql(rate("notifications_total", by="sink, outcome"), "{{sink}} {{outcome}}")],
            unit="ops",
            width=8,
        ),
        timeseries(
            "Pending notifications by sink",
            "Notifications waiting in the outbox for each sink.",
            [promql(f"sum by (sink) ({metric('notifications_pending')})", "{{sink}}")],
            width=8,
        ),
        bar_gauge(
            "Oldest pending notification by sink",
            "Age of the oldest notification each sink has not taken yet (0 when none waits).",
            [
                promql(
                    f"max by (sink) ({metric('notification_oldest_pending_seconds')})",
                    "{{sink}}",
                    instant=True,
                )
            ],
            unit="s",
            steps=thresholds((60, "orange"), (300, "red")),
            width=8,
        ),
        table(
            "Outbox by sink",
            "Notifications written in the range, per sink and state (database).",
            [
                sql(
                    """
SELECT
  sink,
  count(*) FILTER (WHERE status = 'delivered') AS delivered,
  count(*) FILTER (WHERE status = 'pending') AS pending,
  count(*) FILTER (WHERE status = 'failed') AS failed,
  max(attempts) AS "most attempts",
  min(created_at) FILTER (WHERE status = 'pending') AS "oldest pending",
  max(delivered_at) AS "last delivered"
FROM notifications
WHERE $__timeFilter(created_at)
GROUP BY sink
ORDER BY sink
"""
                )
            ],
            height=6,
        ),
    )
    return board.json()
