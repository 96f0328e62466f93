"""Client investigation: one client's sessions, activity, exposure, alerts with their explanation and
evidence, the clients it was seen acting with, the notifications sent about it and the silences that cover it.

Notifications link here (`MIA_DASHBOARD_URL` + `?var-model=...&var-client=...`), and so do the client
columns of the other dashboards' tables.
"""

from __future__ import annotations

from detector.dashboards.builder import (
    JSON,
    POSTGRES_SOURCE,
    Dashboard,
    field_override,
    sql,
    stat,
    table,
    thresholds,
    timeseries,
)
from detector.dashboards.common import (
    CLIENT,
    CLIENT_UID,
    CLIENT_VARIABLE,
    MODEL_VARIABLE,
    TAG,
    alert_annotation,
    alert_overlaps_range,
    client_links,
    in_models,
    involves_client,
    session_overlaps_range,
    top_reasons,
)

# The client's alerts in the range, for the chosen models (alias `a`).
CLIENT_ALERTS = f"{involves_client('a.')} AND {alert_overlaps_range('a.')} AND {in_models('a.')}"
# The client's sessions in the range, for the chosen models.
CLIENT_SESSIONS = f"client_id = ${{{CLIENT}:sqlstring}} AND {session_overlaps_range()} AND {in_models()}"


def build(links: list[JSON]) -> JSON:
    """The client-investigation dashboard; `links` go to the other dashboards."""
    board = Dashboard(
        uid=CLIENT_UID,
        title="mia-detector: client investigation",
        description="Everything the detector knows about one client (API key): sessions, activity, alerts "
        "with explanation and evidence, related clients, notifications and silences.",
        tags=[TAG],
        variables=[POSTGRES_SOURCE.variable_json(), MODEL_VARIABLE, CLIENT_VARIABLE],
        annotations=[alert_annotation(involves_client(), in_models())],
        links=links,
        time_from="now-7d",
    )
    board.add(
        stat(
            "Alerts",
            "Alerts naming the client (alone or in a coordinated group) open during the range.",
            [sql(f"SELECT count(*) AS alerts FROM alerts AS a WHERE {CLIENT_ALERTS}")],
            steps=thresholds((1, "orange")),
        ),
        stat(
            "Open alerts",
            "Of those, the alerts still open.",
            [sql(f"SELECT count(*) AS open FROM alerts AS a WHERE a.status = 'open' AND {CLIENT_ALERTS}")],
            steps=thresholds((1, "red")),
        ),
        stat(
            "Strongest score / threshold",
            "The highest score over its threshold among the client's alerts (1 or more alerts).",
            [
                sql(
                    'SELECT max(a.score / NULLIF(a.threshold, 0)) AS "score / threshold" '
                    f"FROM alerts AS a WHERE {CLIENT_ALERTS}"
                )
            ],
            steps=thresholds((1, "orange"), (3, "red")),
        ),
        stat(
            "Sessions",
            "The client's sessions active during the range (event time).",
            [sql(f"SELECT count(*) AS sessions FROM sessions WHERE {CLIENT_SESSIONS}")],
        ),
        stat(
            "Queries",
            "Queries (input rows) in those sessions.",
            [sql(f"SELECT coalesce(sum(queries), 0) AS queries FROM sessions WHERE {CLIENT_SESSIONS}")],
        ),
        stat(
            "Last seen",
            "Event time of the client's latest query in the range.",
            [
                sql(
                    'SELECT extract(epoch FROM max(last_seen)) * 1000 AS "last seen" '
                    f"FROM sessions WHERE {CLIENT_SESSIONS}"
                )
            ],
            unit="dateTimeAsIso",
        ),
    )

    board.row("Activity")
    board.add(
        timeseries(
            "Queries by model",
            "The client's queries per interval, each session counted when it was last seen (event time).",
            [
                sql(
                    f"""
SELECT $__timeGroupAlias(last_seen, $__interval), model AS metric, sum(queries) AS queries
FROM sessions
WHERE client_id = ${{{CLIENT}:sqlstring}} AND $__timeFilter(last_seen) AND {in_models()}
GROUP BY 1, 2
ORDER BY 1
""",
                    series=True,
                )
            ],
            bars=True,
            stacked=True,
            width=8,
        ),
        table(
            "Sessions",
            "The client's sessions in the range, newest first: what it sent, from where, with what.",
            [
                sql(
                    f"""
SELECT
  first_seen AS "first seen", last_seen AS "last seen", model, status, queries, requests,
  confidence_queries AS "confidence queries", text_queries AS "text queries",
  max_batch_size AS "largest batch", model_version AS "model version", client_ip AS "IP",
  user_agent AS "user agent"
FROM sessions
WHERE {CLIENT_SESSIONS}
ORDER BY last_seen DESC
LIMIT 200
"""
                )
            ],
            width=16,
        ),
        table(
            "Exposure",
            "What the client was given by each model since its first query (all time, not the range): "
            "distinct records answered with a confidence vector, those among them in the training-set "
            "index, label-only answers and near-duplicate probes; as of the detector's last commit.",
            [
                sql(
                    f"""
SELECT
  model, first_seen AS "first query", last_seen AS "last query",
  training_records AS "training records with confidence", probability_records AS "records with confidence",
  label_only_answers AS "label-only answers", probes, updated_at AS "as of"
FROM client_states
WHERE client_id = ${{{CLIENT}:sqlstring}} AND {in_models()}
ORDER BY training_records DESC, model
"""
                )
            ],
            height=5,
        ),
    )

    board.row("Alerts")
    board.add(
        table(
            "Alerts",
            "The client's alerts open during the range, newest first, with the reasons that raised them and "
            "what a responder should check (triage). `detected` is the event time of the query on which "
            "the rule first crossed its threshold, `detected after queries` the client's queries by then.",
            [
                sql(
                    f"""
SELECT
  a.id AS alert, a.raised_at AS raised, a.detected_at AS detected,
  a.detected_after_queries AS "detected after queries", a.status, a.kind, a.severity, a.rule_id AS rule,
  round((a.score / NULLIF(a.threshold, 0))::numeric, 2) AS "score / threshold",
  {top_reasons("a.")} AS "top reasons",
  a.triage,
  json_array_length(a.client_ids) AS clients,
  a.model, a.first_seen AS "first query", a.last_seen AS "last query", a.queries,
  a.resolved_at AS resolved, a.acknowledged_at AS acknowledged, a.atlas_technique AS "ATLAS"
FROM alerts AS a
WHERE {CLIENT_ALERTS}
ORDER BY a.raised_at DESC, a.id DESC
LIMIT 100
"""
                )
            ],
            overrides=[field_override("triage", width=400), field_override("top reasons", width=360)],
            height=9,
        ),
        table(
            "Explanation",
            "Every reason of every alert: the feature, its value, and where it falls among baseline clients "
            "(percentile).",
            [
                sql(
                    f"""
SELECT
  a.id AS alert, a.kind, r.position AS rank, r.reason ->> 'feature' AS feature,
  (r.reason ->> 'value')::float AS value,
  (r.reason ->> 'baseline_percentile')::float AS "baseline percentile"
FROM alerts AS a
CROSS JOIN LATERAL json_array_elements(a.reasons) WITH ORDINALITY AS r(reason, position)
WHERE {CLIENT_ALERTS}
ORDER BY a.id DESC, r.position
LIMIT 500
"""
                )
            ],
            width=12,
        ),
        table(
            "Evidence events",
            "Event ids of the newest queries behind each alert, to find the requests in the prediction logs.",
            [
                sql(
                    f"""
SELECT a.id AS alert, a.kind, e.position AS "#", e.event_id AS "event id"
FROM alerts AS a
CROSS JOIN LATERAL json_array_elements_text(a.evidence) WITH ORDINALITY AS e(event_id, position)
WHERE {CLIENT_ALERTS}
ORDER BY a.id DESC, e.position
LIMIT 500
"""
                )
            ],
            width=12,
        ),
    )

    board.row("Related clients, notifications and silences")
    board.add(
        table(
            "Related clients",
            "Clients pooled with this one in coordinated-clients alerts (sybil keys sharing a network and "
            "training-set hits). Click one to investigate it.",
            [
                sql(
                    f"""
SELECT
  c.client_id AS client, a.model, a.id AS alert, a.severity, a.status, a.raised_at AS raised,
  json_array_length(a.client_ids) AS "group size", a.reasons -> 0 ->> 'feature' AS "shared by"
FROM alerts AS a
CROSS JOIN LATERAL json_array_elements_text(a.client_ids) AS c(client_id)
WHERE a.kind = 'coordinated_clients' AND c.client_id <> ${{{CLIENT}:sqlstring}} AND {CLIENT_ALERTS}
ORDER BY a.raised_at DESC, client
LIMIT 200
"""
                )
            ],
            overrides=[field_override("client", links=client_links())],
            width=12,
        ),
        table(
            "Notifications",
            "What was sent about the client's alerts, to which sink, and whether it arrived.",
            [
                sql(
                    f"""
SELECT
  n.created_at AS written, n.alert_id AS alert, n.event, n.sink, n.status, n.attempts,
  n.delivered_at AS delivered, n.next_attempt_at AS "next attempt", n.last_error AS "last error"
FROM notifications AS n
JOIN alerts AS a ON a.id = n.alert_id
WHERE $__timeFilter(n.created_at) AND {involves_client("a.")} AND {in_models("a.")}
ORDER BY n.created_at DESC, n.id DESC
LIMIT 200
"""
                )
            ],
            width=12,
        ),
        table(
            "Silences matching the client",
            "Silences in force at some moment of the range that cover the client: by its id, or by model, "
            "kind or rule of one of its alerts (a silenced alert raises no notifications).",
            [
                sql(
                    f"""
SELECT
  s.id AS silence, s.client_id AS client, s.model, s.kind, s.rule_id AS rule, s.reason,
  s.created_by AS "created by", s.created_at AS created, s.expires_at AS expires,
  s.expires_at > now() AS active
FROM silences AS s
WHERE s.created_at <= $__timeTo() AND s.expires_at >= $__timeFrom()
  AND (
    s.client_id = ${{{CLIENT}:sqlstring}}
    OR (s.client_id IS NULL AND EXISTS (
      SELECT 1 FROM alerts AS a
      WHERE {involves_client("a.")}
        AND (s.model IS NULL OR s.model = a.model)
        AND (s.kind IS NULL OR s.kind = a.kind)
        AND (s.rule_id IS NULL OR s.rule_id = a.rule_id)
    ))
  )
ORDER BY s.expires_at DESC
"""
                )
            ],
            height=6,
        ),
    )
    return board.json()
