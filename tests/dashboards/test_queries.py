"""Every dashboard query, run for real: the daemon consumes attack traffic from the broker into a fresh
PostgreSQL database while a real Prometheus scrapes it; then each PromQL expression (template variables
substituted as Grafana would) must return series from Prometheus, and each SQL query (Grafana's macros
expanded as its PostgreSQL data source does) must return rows from the database. Panels, variables and
annotations alike.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, make_url

from detector.broker import EmbeddedBroker, free_port
from detector.dashboards import build_dashboards
from detector.metrics import PREFIX
from detector.protocols import index_training_sets
from detector.service import StopFlag, produce_file, run_daemon, train
from detector.simulate import simulate
from detector.simulate.sample import MALFORMED
from detector.storage import SilenceStore, open_engine
from tests.dashboards.templates import VARIABLE, variable_name
from tests.dashboards.test_build import Query, queries
from tests.prometheus import JOB, prometheus_binary, query, running_prometheus, wait_for
from tests.support import events_with_sybils, fresh_postgres_database, make_settings, missing_tool

pytestmark = [pytest.mark.slow, pytest.mark.kafka, pytest.mark.postgres]

SEED = 7
# The smoke scenario's training-set attacker is dealt over this many keys of its network (one key each
# record, in turn): each key stays below the training-set rule, together they raise a coordinated-clients
# alert, which the client dashboard's "related clients" panel needs.
SYBIL_KEYS = 8
# Produced before the daemon starts, the rest once Prometheus scrapes it: the first records (to 00:23 event
# time) raise the first alerts, the rest (a second wave of attacks) more, so that every rate and quantile
# has changes inside its window, notification deliveries too (their histogram's series only appears with
# the first delivery to a sink).
FIRST_RECORDS = 600
ALLOWLIST = [
    {"client_id": f"svc-nightly-rescore-{model}", "reason": "internal nightly re-scoring of training records"}
    for model in ("credit-risk", "digits")
]
DAY = 86_400.0
CONSUME_SECONDS = 60.0
STOP_SECONDS = 30.0

# What Grafana puts in place of its interval variables: `$__rate_interval` is 4 scrape intervals of a 15 s
# scrape (Prometheus here scrapes every second: any window holds enough samples); `$__interval` is the
# time range over ~500 points, rounded as Grafana does, for a range of about two days.
RATE_INTERVAL = "1m"
SQL_INTERVAL = "5m"


@dataclass(frozen=True)
class Deployment:
    """The daemon's results, where to read them, and what the dashboard variables are set to."""

    prometheus: str
    conninfo: str  # libpq connection string of the detector's database
    client: str  # `$client`: a client with alerts, its coordinated group's primary key
    start: datetime  # the time range: from the scenario's first event ...
    end: datetime  # ... to after the alerts, notifications and silences written now (wall time)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A fresh `mia_test_*` PostgreSQL database for the module, dropped after it."""
    with fresh_postgres_database() as url:
        yield url


def write_events(scenario: Path, directory: Path) -> tuple[Path, Path, list[str]]:
    """The scenario's events with its training-set attacker dealt over `SYBIL_KEYS` keys and one malformed
    record of each kind mixed in (dead letters), as two files: the first `FIRST_RECORDS` records and the
    rest. Returns both and the sybil keys."""
    lines, sybils = events_with_sybils(scenario, SYBIL_KEYS)
    for index, bad in enumerate(MALFORMED):
        lines.insert(100 * (index + 1), bad)
    first, rest = directory / "first.jsonl", directory / "rest.jsonl"
    first.write_bytes(b"\n".join(lines[:FIRST_RECORDS]) + b"\n")
    rest.write_bytes(b"\n".join(lines[FIRST_RECORDS:]) + b"\n")
    return first, rest, sybils


CONSUMED = f'sum({PREFIX}_events_consumed_total{{job="{JOB}", source="kafka"}})'
SCRAPED_DELIVERED = f'sum({PREFIX}_notifications_total{{job="{JOB}", outcome="delivered"}})'
COMMITTED = "SELECT coalesce(sum(next_offset), 0) FROM consumer_checkpoints"  # offsets of a fresh topic
PENDING = "SELECT count(*) FROM notifications WHERE status = 'pending'"
DELIVERED = "SELECT count(*) FROM notifications WHERE status = 'delivered'"
COORDINATED_CLIENT = "SELECT client_id FROM alerts WHERE kind = 'coordinated_clients' ORDER BY id LIMIT 1"


def one_value(result: list[dict[str, Any]]) -> float:
    return float(result[0]["value"][1]) if result else float("nan")


def scalar(engine: Engine, statement: str) -> Any:
    with engine.connect() as connection:
        return connection.exec_driver_sql(statement).scalar()


def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    """Check `condition` every 0.2 s until it holds; `TimeoutError` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done after {timeout} s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def deployment(
    broker: EmbeddedBroker, postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """The smoke scenario through the daemon (trained model, training-set indexes, an OCSF file sink) into
    PostgreSQL, scraped by Prometheus, with a silence on the chosen client; the daemon keeps running (its
    per-partition lag is only exported while it is) until the module's tests are done."""
    if prometheus_binary() is None:
        missing_tool("prometheus")
    work = tmp_path_factory.mktemp("dashboards")
    simulation = simulate("smoke", SEED, work / "scenario")
    first, rest, sybils = write_events(simulation.out, work)
    port = free_port()
    settings = make_settings(
        postgres_url,
        broker,
        metrics={"addr": f"127.0.0.1:{port}"},
        ocsf={"file": str(work / "findings.jsonl")},
        # Alerts stay open, for the panels of open alerts.
        alerts={"resolve_after_seconds": DAY},
        detection={"allowlist": ALLOWLIST},
    )
    settings = settings.model_copy(
        update={"training_index": index_training_sets(simulation.out, work / "indexes")}
    )
    train(settings, [str(simulation.out / "baseline.jsonl")], 0.001, work / "model")
    settings = settings.model_copy(update={"model_path": work / "model"})
    topic = settings.kafka.topics[0]
    produced = produce_file(settings, first, topic)  # the topic exists before the daemon subscribes

    stop, failures = StopFlag(), []

    def daemon() -> None:
        try:
            run_daemon(settings, stop)
        except BaseException as exc:  # reported by the test instead of a timeout
            failures.append(exc)
            raise

    thread = threading.Thread(target=daemon, name="mia-daemon", daemon=True)
    engine = open_engine(settings, migrate=False)
    with running_prometheus(work, [f"127.0.0.1:{port}"]) as prometheus:
        thread.start()
        try:
            try:
                # The rest is produced once Prometheus watches the daemon, so that processing it falls
                # within the rate windows of the queries.
                wait_for(prometheus, CONSUMED, lambda r: one_value(r) == produced, CONSUME_SECONDS)
                produced += produce_file(settings, rest, topic)
                wait_until(lambda: scalar(engine, COMMITTED) == produced, CONSUME_SECONDS)
                wait_until(lambda: scalar(engine, PENDING) == 0, 10.0)
                delivered = scalar(engine, DELIVERED)
                wait_for(prometheus, SCRAPED_DELIVERED, lambda r: one_value(r) == delivered, 10.0)
            except TimeoutError as exc:
                raise AssertionError(f"{exc}; the daemon's failures: {failures}") from None
            client = scalar(engine, COORDINATED_CLIENT)
            assert client in sybils, "the sybil keys raised no coordinated-clients alert"
            SilenceStore(engine).add(
                duration_seconds=3600, reason="under investigation", created_by="test", client_id=client
            )
            metadata = json.loads((simulation.out / "scenario.json").read_text())
            yield Deployment(
                prometheus=prometheus,
                conninfo=make_url(postgres_url).set(drivername="postgresql").render_as_string(False),
                client=client,
                start=datetime.fromisoformat(metadata["start"]),
                end=datetime.now(UTC) + timedelta(minutes=5),
            )
        finally:
            stop.set()
            thread.join(STOP_SECONDS)
            engine.dispose()
    assert not thread.is_alive(), "the daemon did not stop"
    assert not failures


# -- Grafana's substitutions ---------------------------------------------------------------------------------

# Grafana's pattern for a macro call (`sExpr` in macros.go): arguments cannot contain a parenthesis.
_MACRO = re.compile(r"\$(__\w+)\(([^)]*)\)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def substitute(text: str, values: dict[str, str]) -> str:
    """`text` with every template variable (`$name`, `${name}`, `${name:format}`) replaced by its value in
    `values`, as Grafana's template service does before sending a query. Macro calls (`$__name(...)`) are
    left for `expand_macros`; an unknown variable is an error."""

    def replace(match: re.Match[str]) -> str:
        name = variable_name(match)
        if name.startswith("__") and text[match.end() : match.end() + 1] == "(":
            return match.group(0)
        if name not in values:
            raise KeyError(f"no value for ${name} in {text!r}")
        if match.group(0).endswith(":sqlstring}"):
            return "'" + values[name].replace("'", "''") + "'"
        return values[name]

    return VARIABLE.sub(replace, text)


def sql_list(values: list[str]) -> str:
    """A multi-value variable as Grafana's SQL data sources insert it: quoted, comma-separated."""
    return ",".join("'" + value.replace("'", "''") + "'" for value in values)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def seconds(interval: str) -> int:
    """`5m` → 300 (`gtime.ParseInterval` for the units used here)."""
    match = re.fullmatch(r"(\d+)([smhd])", interval.strip().strip("'"))
    if match is None:
        raise ValueError(f"cannot parse interval {interval!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


def expand_macros(sql: str, start: datetime, end: datetime) -> str:
    """`sql` with Grafana's PostgreSQL macros expanded to exactly what its data source sends the database
    (pkg/tsdb/grafana-postgresql-datasource/macros.go, without TimescaleDB), for the time range
    [`start`, `end`]:

    - `$__timeFilter(col)` → `col BETWEEN '<start>' AND '<end>'` (RFC 3339, UTC)
    - `$__timeFrom()`, `$__timeTo()` → `'<start>'`, `'<end>'`
    - `$__timeGroup(col, 5m)` → `floor(extract(epoch from col)/300)*300`
    - `$__timeGroupAlias(col, 5m)` → the same `AS "time"`
    - `$__time(col)` → `col AS "time"`

    Any other macro raises `ValueError`, as Grafana answers "unknown macro". `$__interval` must have been
    substituted before (Grafana does it first too).
    """

    def expand(match: re.Match[str]) -> str:
        name = match.group(1)
        args = [arg.strip() for arg in match.group(2).split(",")]
        if name == "__timeFilter":
            return f"{args[0]} BETWEEN '{rfc3339(start)}' AND '{rfc3339(end)}'"
        if name == "__timeFrom":
            return f"'{rfc3339(start)}'"
        if name == "__timeTo":
            return f"'{rfc3339(end)}'"
        if name in ("__timeGroup", "__timeGroupAlias"):
            step = seconds(args[1])
            group = f"floor(extract(epoch from {args[0]})/{step})*{step}"
            return f'{group} AS "time"' if name == "__timeGroupAlias" else group
        if name == "__time":
            return f'{args[0]} AS "time"'
        raise ValueError(f"unknown macro ${name} in {sql!r}")

    return _MACRO.sub(expand, sql)


def promql_of(item: Query, live: Deployment) -> str:
    """The expression Grafana would send Prometheus; a `label_values(metric, label)` variable query becomes
    the PromQL that lists those label values."""
    text = item.text
    variable = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", text)
    if variable:
        return f"group by ({variable.group(2)}) ({variable.group(1)})"
    return substitute(
        text,
        {
            "job": JOB,
            "__rate_interval": RATE_INTERVAL,
            "__interval": RATE_INTERVAL,
            "__range": f"{int((live.end - live.start).total_seconds())}s",
        },
    )


def read_only(conninfo: str) -> psycopg.Connection[Any]:
    """A connection that may only read, as Grafana's data source user should."""
    connection = psycopg.connect(conninfo, autocommit=True)
    connection.execute("SET default_transaction_read_only = on")
    connection.execute("SET statement_timeout = '10s'")
    return connection


@dataclass(frozen=True)
class Result:
    columns: list[str]
    rows: list[tuple[Any, ...]]


def run_sql(connection: psycopg.Connection[Any], item: Query, live: Deployment, models: list[str]) -> Result:
    """Run a dashboard's SQL as Grafana would, with `$model` set to All (`models`) and `$client` to the
    deployment's client."""
    text = substitute(
        item.text, {"model": sql_list(models), "client": live.client, "__interval": SQL_INTERVAL}
    )
    text = expand_macros(text, live.start, live.end)
    assert "$" not in text, text
    with connection.cursor() as cursor:
        cursor.execute(text.encode())  # bytes: no placeholder processing, the text goes as Grafana sends it
        assert cursor.description is not None
        return Result([column.name for column in cursor.description], cursor.fetchall())


def dashboard_queries(language: str) -> list[Query]:
    return [
        item for board in build_dashboards().values() for item in queries(board) if item.language == language
    ]


def model_values(connection: psycopg.Connection[Any], live: Deployment) -> list[str]:
    """`$model` set to All: every option its variable query returns."""
    variable = next(item for item in dashboard_queries("sql") if item.where == "variable 'model'")
    return [row[0] for row in run_sql(connection, variable, live, []).rows]


# -- the tests -----------------------------------------------------------------------------------------------


def test_every_promql_expression_returns_series(deployment: Deployment) -> None:
    expressions = dashboard_queries("promql")
    assert len(expressions) > 30
    empty = []
    for item in expressions:
        expr = promql_of(item, deployment)
        assert "$" not in expr, f"{item}: {expr}"
        result = query(deployment.prometheus, expr)  # an invalid expression raises here (HTTP 400)
        # NaN: a quantile or ratio with nothing observed in its window, an empty panel in Grafana.
        if not any(not math.isnan(float(sample["value"][1])) for sample in result):
            empty.append(f"{item}: {expr} -> {result}")
    assert not empty, "no series (or only NaN) for:\n" + "\n".join(empty)
    # The rate windows cover the stream: throughput is not zero.
    records = next(item for item in expressions if "Records per second" in item.where)
    assert float(query(deployment.prometheus, promql_of(records, deployment))[0]["value"][1]) > 0


def test_every_sql_query_returns_rows(deployment: Deployment) -> None:
    statements = [item for item in dashboard_queries("sql") if not item.where.startswith("annotation")]
    assert len(statements) >= 20
    failed, empty = [], []
    with read_only(deployment.conninfo) as connection:
        models = model_values(connection, deployment)
        assert sorted(models) == ["credit-risk", "digits"]
        for item in statements:
            try:
                result = run_sql(connection, item, deployment, models)
            except psycopg.Error as exc:
                failed.append(f"{item}: {exc}")
                continue
            if not result.rows or all(value in (None, 0) for row in result.rows for value in row):
                empty.append(f"{item}: {result}")
            elif item.format == "time_series":
                # Grafana turns long rows into series by the `time` column, which must come in order.
                assert result.columns[0] == "time", f"{item}: {result.columns}"
                times = [row[0] for row in result.rows]
                assert times == sorted(times), f"{item}: rows not in time order"
    assert not failed, "queries failed:\n" + "\n".join(failed)
    assert not empty, "no rows (or only zeros) for:\n" + "\n".join(empty)


def test_alert_annotations_show_the_alerts(deployment: Deployment) -> None:
    annotations = [item for item in dashboard_queries("sql") if item.where.startswith("annotation")]
    assert {item.dashboard for item in annotations} == set(build_dashboards())
    with read_only(deployment.conninfo) as connection:
        models = model_values(connection, deployment)
        for item in annotations:
            result = run_sql(connection, item, deployment, models)
            assert result.columns == ["time", "timeend", "text", "tags"], str(item)
            assert result.rows, f"{item}: no annotations"
            texts = [row[2] for row in result.rows]
            if item.dashboard == "mia-client":
                # Only the client's alerts: here its coordinated group's.
                assert all(deployment.client in text for text in texts), texts
                assert any(text.startswith("coordinated_clients [critical] ") for text in texts), texts
            else:
                assert any("coordinated_clients" in text for text in texts)
                assert any("training_set_targeting" in text for text in texts), texts


def test_time_filters_select_by_time(deployment: Deployment) -> None:
    """A range before any data: the time-filtered tables come back empty (the filters are real)."""
    before = Deployment(
        deployment.prometheus,
        deployment.conninfo,
        deployment.client,
        start=deployment.start - timedelta(days=30),
        end=deployment.start - timedelta(days=29),
    )
    filtered = [
        item for item in dashboard_queries("sql") if item.where.startswith("panel") and "$__time" in item.text
    ]
    assert len(filtered) > 10
    with read_only(deployment.conninfo) as connection:
        for item in filtered:
            result = run_sql(connection, item, before, ["credit-risk", "digits"])
            assert all(value in (None, 0) for row in result.rows for value in row), str(item)
