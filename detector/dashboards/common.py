"""What the dashboards share: uids, variables, metric selectors, SQL conditions and the alert annotation.

SQL is PostgreSQL with Grafana's macros: `$__timeFilter(column)` (column within the dashboard's range),
`$__timeFrom()` / `$__timeTo()` (the range's ends as timestamps), `$__timeGroupAlias(column, $__interval)`
(the time bucket, named `time`). Multi-value variables (`$model`) expand to a quoted list for `IN (...)`;
single-value ones are inserted with Grafana's `sqlstring` format (`${client:sqlstring}`): quoted, quotes
doubled, so that a client id (attacker-controlled text) cannot change the query.
"""

from __future__ import annotations

from detector.dashboards.builder import (
    JSON,
    POSTGRES_SOURCE,
    PROMETHEUS_SOURCE,
    dashboard_link,
    promql,
    query_variable,
    sql,
    sql_annotation,
    textbox_variable,
)
from detector.domain import CANARY_MODEL
from detector.metrics import PREFIX

FOLDER_TITLE = "mia-detector"  # the Grafana folder the dashboards belong in
TAG = "mia-detector"  # every dashboard's tag; the dashboards link to each other by it
OVERVIEW_UID = "mia-overview"
CLIENT_UID = "mia-client"  # `MIA_DASHBOARD_URL` points here: notifications link `?var-model=..&var-client=..`
HEALTH_UID = "mia-health"

JOB = "job"
MODEL = "model"
CLIENT = "client"

# -- Prometheus ----------------------------------------------------------------------------------------------


def metric(name: str, **labels: str) -> str:
    """The selector of the detector's metric `mia_detector_<name>` in the chosen jobs (and `labels`)."""
    matchers = [f'{JOB}=~"${JOB}"', *(f'{label}="{value}"' for label, value in labels.items())]
    return f"{PREFIX}_{name}{{{', '.join(matchers)}}}"


def rate(name: str, by: str = "", **labels: str) -> str:
    """The per-second rate of counter `name`, summed (by the labels `by`, comma-separated)."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric(name, **labels)}[$__rate_interval]))"


def quantile(q: float, histogram: str, by: str = "") -> str:
    """Quantile `q` of histogram `histogram` over the rate window, per `by` labels."""
    labels = f"{by}, le" if by else "le"
    buckets = metric(f"{histogram}_bucket")
    return f"histogram_quantile({q}, sum by ({labels}) (rate({buckets}[$__rate_interval])))"


# -- variables -----------------------------------------------------------------------------------------------

JOB_VARIABLE = query_variable(
    JOB,
    "Job",
    promql(f"label_values({PREFIX}_build_info, job)"),
    multi=True,
    include_all=True,
    all_value=".+",
)
MODEL_VARIABLE = query_variable(
    MODEL,
    "Model",
    # Every database panel reads the chosen models (`in_models`), and "All" is every model listed here:
    # the detection canaries' model is left out, so that none shows canaries as clients, alerts or traffic.
    sql(f"SELECT DISTINCT model FROM sessions WHERE model <> '{CANARY_MODEL}' ORDER BY 1"),
    multi=True,
    include_all=True,
)
CLIENT_VARIABLE = textbox_variable(
    CLIENT,
    "Client",
    "The client (API key) to investigate, as alerts and notifications name it",
)


def client_links() -> list[JSON]:
    """A data link on a table's client column to the client-investigation dashboard, for that client and
    the row's model (the table needs a `model` column), keeping the time range."""
    return [
        dashboard_link(
            "Investigate this client", CLIENT_UID, client="${__value.raw}", model="${__data.fields.model}"
        )
    ]


def datasource_variables() -> list[JSON]:
    """The two data source variables every dashboard starts with."""
    return [PROMETHEUS_SOURCE.variable_json(), POSTGRES_SOURCE.variable_json()]


# -- SQL -----------------------------------------------------------------------------------------------------

MODELS = f"model IN (${MODEL})"


def in_models(alias: str = "") -> str:
    """The row's model is one of the chosen `$model`s."""
    return f"{alias}{MODELS}"


def involves_client(alias: str = "") -> str:
    """The alert names `$client`, alone or among a coordinated group (`client_ids` is a JSON array)."""
    return f"{alias}client_ids::jsonb @> jsonb_build_array(${{{CLIENT}:sqlstring}}::text)"


def alert_overlaps_range(alias: str = "") -> str:
    """The alert was open at some moment of the dashboard's range (raised before its end, not resolved
    before its start)."""
    return (
        f"{alias}raised_at <= $__timeTo() "
        f"AND ({alias}resolved_at IS NULL OR {alias}resolved_at >= $__timeFrom())"
    )


def session_overlaps_range(alias: str = "") -> str:
    """The session was active at some moment of the dashboard's range (event time)."""
    return f"{alias}first_seen <= $__timeTo() AND {alias}last_seen >= $__timeFrom()"


def top_reasons(alias: str = "", count: int = 3) -> str:
    """The first `count` reasons of an alert (most telling first), each as the detector wrote it
    (`Reason.text`: `feature = value (pNN of baseline)`)."""
    return f"""(
    SELECT string_agg(r.reason ->> 'text', '; ' ORDER BY r.position)
    FROM json_array_elements({alias}reasons) WITH ORDINALITY AS r(reason, position)
    WHERE r.position <= {count}
  )"""


def alert_annotation(*conditions: str) -> JSON:
    """The detector's alerts as annotations: a region from raised to resolved (a line while open), with
    kind, severity, client(s), the top reason and the queries it was detected after, tagged by kind and
    severity; only alerts matching every SQL condition in `conditions`."""
    where = " AND ".join([alert_overlaps_range(), *conditions])
    return sql_annotation(
        "Detector alerts",
        f"""
SELECT
  raised_at AS "time",
  resolved_at AS timeend,
  kind || ' [' || severity || '] ' || client_id
    || CASE WHEN json_array_length(client_ids) > 1
         THEN ' and ' || (json_array_length(client_ids) - 1) || ' more clients' ELSE '' END
    || ' on ' || model
    || coalesce(': ' || (reasons -> 0 ->> 'feature') || ' = ' || (reasons -> 0 ->> 'value'), '')
    || '; detected after ' || detected_after_queries || ' queries' AS text,
  'mia-detector,' || kind || ',' || severity AS tags
FROM alerts
WHERE {where}
ORDER BY raised_at
""",
        "red",
    )
