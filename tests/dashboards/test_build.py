"""The dashboards as built from code: the committed JSON files are what the code builds, and every dashboard
is well-formed for Grafana (ids, data sources, variables, layout, links, metric and table names)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest

from detector.dashboards import (
    FOLDER_TITLE,
    POSTGRES_PLUGIN_ID,
    POSTGRES_VARIABLE,
    PROMETHEUS_VARIABLE,
    SCHEMA_VERSION,
    build_dashboards,
    write_dashboards,
)
from detector.metrics import PREFIX, Metrics
from detector.storage.tables import Base
from tests.dashboards.templates import variables_in

COMMITTED = Path(__file__).resolve().parents[2] / "dashboards"
REGENERATE = (
    "regenerate them with `mia-detector dashboards build` (or `write_dashboards(Path('dashboards'))`)"
)
DASHBOARDS = build_dashboards()
UIDS = sorted(DASHBOARDS)
PLUGINS = {PROMETHEUS_VARIABLE: "prometheus", POSTGRES_VARIABLE: POSTGRES_PLUGIN_ID}
# The macros of Grafana's PostgreSQL data source (pkg/tsdb/grafana-postgresql-datasource/macros.go) and the
# global ones of its SQL engine; anything else fails in Grafana with "unknown macro".
POSTGRES_MACROS = {
    "__time",
    "__timeEpoch",
    "__timeFilter",
    "__timeFrom",
    "__timeTo",
    "__timeGroup",
    "__timeGroupAlias",
    "__unixEpochFilter",
    "__unixEpochNanoFilter",
    "__unixEpochNanoFrom",
    "__unixEpochNanoTo",
    "__unixEpochGroup",
    "__unixEpochGroupAlias",
    "__unixEpochFrom",
    "__unixEpochTo",
}
GRAFANA_INTERVALS = {"__interval", "__interval_ms", "__rate_interval", "__range", "__range_s", "__range_ms"}


@dataclass(frozen=True)
class Query:
    """One query a dashboard makes: where it is, its language (`promql` or `sql`), its text and format."""

    dashboard: str
    where: str
    language: str
    text: str
    format: str = "table"

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.where}"


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def language(datasource: dict[str, Any]) -> str:
    return {"prometheus": "promql", POSTGRES_PLUGIN_ID: "sql"}[datasource["type"]]


def target_query(dashboard: str, where: str, target: dict[str, Any]) -> Query:
    kind = language(target["datasource"])
    text = target["expr"] if kind == "promql" else target["rawSql"]
    return Query(dashboard, where, kind, text, target.get("format", "table"))


def queries(dashboard: dict[str, Any]) -> Iterator[Query]:
    """Every query of a dashboard: panel targets, query variables, annotation queries."""
    uid = dashboard["uid"]
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield target_query(uid, f"panel {panel['title']!r} {target['refId']}", target)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            kind = language(variable["datasource"])
            yield Query(uid, f"variable {variable['name']!r}", kind, variable["query"])
    for annotation in dashboard["annotations"]["list"]:
        if "target" in annotation:
            yield target_query(uid, f"annotation {annotation['name']!r}", annotation["target"])


def all_queries() -> list[Query]:
    return [query for uid in UIDS for query in queries(DASHBOARDS[uid])]


# -- the committed files -------------------------------------------------------------------------------------


def test_the_committed_dashboards_are_what_the_code_builds(tmp_path: Path) -> None:
    written = write_dashboards(tmp_path)
    assert [path.name for path in written] == [f"{uid}.json" for uid in UIDS]
    committed = sorted(path.name for path in COMMITTED.glob("*.json"))
    assert committed == [path.name for path in written], (
        f"dashboards/ has other files than the code builds: {REGENERATE}"
    )
    stale = [path.name for path in written if (COMMITTED / path.name).read_text() != path.read_text()]
    assert not stale, f"dashboards/{', '.join(stale)} differ from what the code builds: {REGENERATE}"


def test_writing_is_stable_and_builds_fresh_dicts(tmp_path: Path) -> None:
    first = [path.read_bytes() for path in write_dashboards(tmp_path / "a")]
    build_dashboards()["mia-overview"]["panels"].clear()  # a caller's change must not leak into the next
    second = [path.read_bytes() for path in write_dashboards(tmp_path / "b")]
    assert first == second
    assert all(text.endswith(b"}\n") and b"\n  " in text for text in first)  # indented, one final newline


# -- structure -----------------------------------------------------------------------------------------------


def test_uids_titles_and_schema() -> None:
    assert UIDS == ["mia-client", "mia-health", "mia-overview"]
    assert FOLDER_TITLE == "mia-detector"
    for uid, dashboard in DASHBOARDS.items():
        assert dashboard["uid"] == uid and len(uid) <= 40  # Grafana's limit
        assert dashboard["title"].startswith("mia-detector: ")
        assert dashboard["schemaVersion"] == SCHEMA_VERSION and dashboard["id"] is None
        assert "mia-detector" in dashboard["tags"]
        for panel in panels(dashboard):
            assert panel["title"].strip(), f"{uid}: a panel without a title"
            if panel["type"] != "row":
                assert panel["description"].strip(), f"{uid} / {panel['title']}: no description"
    titles = [dashboard["title"] for dashboard in DASHBOARDS.values()]
    assert len(set(titles)) == len(titles)


@pytest.mark.parametrize("uid", UIDS)
def test_panel_ids_are_unique(uid: str) -> None:
    ids = [panel["id"] for panel in panels(DASHBOARDS[uid])]
    assert all(isinstance(panel_id, int) and panel_id > 0 for panel_id in ids)
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("uid", UIDS)
def test_every_panel_queries_a_data_source_variable_in_its_language(uid: str) -> None:
    dashboard = DASHBOARDS[uid]
    datasource_variables = {
        variable["name"]: variable["query"]
        for variable in dashboard["templating"]["list"]
        if variable["type"] == "datasource"
    }
    assert {name: PLUGINS[name] for name in datasource_variables} == datasource_variables
    for panel in panels(dashboard):
        if panel["type"] == "row":
            assert "targets" not in panel
            continue
        where = f"{uid} / {panel['title']}"
        source = panel["datasource"]
        match = re.fullmatch(r"\$\{(\w+)\}", source["uid"])
        assert match, f"{where}: data source {source} is not a variable"
        assert datasource_variables.get(match.group(1)) == source["type"], f"{where}: {source}"
        assert panel["targets"], f"{where}: no query"
        for target in panel["targets"]:
            assert target["datasource"] == source, f"{where}: a query on another data source"
            if source["type"] == "prometheus":
                assert target["expr"].strip() and "rawSql" not in target, where
                assert target["format"] in ("time_series", "table", "heatmap"), where
            else:
                assert target["rawSql"].strip() and "expr" not in target, where
                assert target["rawQuery"] is True and target["format"] in ("time_series", "table"), where
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), where


@pytest.mark.parametrize("uid", UIDS)
def test_every_variable_used_is_defined_before_use(uid: str) -> None:
    dashboard = DASHBOARDS[uid]
    defined: list[str] = []
    for variable in dashboard["templating"]["list"]:
        used = variables_in(json.dumps(variable.get("datasource", {})) + variable.get("query", ""))
        assert used <= set(defined), f"{uid}: variable {variable['name']!r} uses {used - set(defined)}"
        defined.append(variable["name"])
    assert len(set(defined)) == len(defined)
    for query in queries(dashboard):
        undefined = variables_in(query.text) - set(defined)
        assert not undefined, f"{query}: undefined {undefined}"
    for panel in panels(dashboard):
        used = variables_in(
            json.dumps({key: panel.get(key) for key in ("datasource", "fieldConfig", "links")})
        )
        assert used <= set(defined), f"{uid} / {panel['title']}: undefined {used - set(defined)}"


@pytest.mark.parametrize("uid", UIDS)
def test_panels_fit_the_grid_without_overlapping(uid: str) -> None:
    boxes = []
    for panel in DASHBOARDS[uid]["panels"]:
        grid = panel["gridPos"]
        x, y, w, h = grid["x"], grid["y"], grid["w"], grid["h"]
        assert x >= 0 and y >= 0 and w >= 1 and h >= 1 and x + w <= 24, f"{panel['title']}: {grid}"
        boxes.append((panel["title"], x, y, w, h))
    for (a, ax, ay, aw, ah), (b, bx, by, bw, bh) in combinations(boxes, 2):
        overlap = ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah
        assert not overlap, f"{uid}: {a!r} and {b!r} overlap"


@pytest.mark.parametrize("uid", UIDS)
def test_alerts_are_annotations_from_the_database(uid: str) -> None:
    annotations = DASHBOARDS[uid]["annotations"]["list"]
    alerts = [a for a in annotations if a.get("datasource", {}).get("type") == POSTGRES_PLUGIN_ID]
    assert len(alerts) == 1 and alerts[0]["enable"]
    text = alerts[0]["target"]["rawSql"]
    for column in ('raised_at AS "time"', "resolved_at AS timeend", "AS text", "AS tags"):
        assert column in text


def test_links_lead_to_dashboards_that_exist() -> None:
    for uid, dashboard in DASHBOARDS.items():
        for panel in panels(dashboard):
            for override in panel.get("fieldConfig", {}).get("overrides", []):
                for prop in override["properties"]:
                    for link in prop["value"] if prop["id"] == "links" else []:
                        target = re.match(r"/d/([\w-]+)\?", link["url"])
                        assert target and target.group(1) in DASHBOARDS, f"{uid}: {link['url']}"
        assert dashboard["links"] and all(link["tags"] == ["mia-detector"] for link in dashboard["links"])


# -- what the queries name -----------------------------------------------------------------------------------


def exported_metric_names() -> set[str]:
    """Every series name the detector's `Metrics` can expose, labelled children not yet created included."""
    metrics = Metrics()
    metrics.set_model("20261129T000000Z-fpr0.001", trained_at=1_764_374_400.0)  # no age without a model
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "info": ("_info",)}
    return {
        family.name + suffix
        for family in metrics.registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


def test_promql_names_only_metrics_the_detector_exports() -> None:
    exported = exported_metric_names()
    promql = [query for query in all_queries() if query.language == "promql"]
    used = {name for query in promql for name in re.findall(rf"\b{PREFIX}_\w+", query.text)}
    assert used and used <= exported, f"not exported: {sorted(used - exported)}"
    for query in promql:
        if query.where.startswith("variable"):
            assert query.text.startswith("label_values("), str(query)  # Grafana's, not PromQL
            continue
        assert 'job=~"$job"' in query.text, f"{query}: not restricted to the chosen jobs"
        assert variables_in(query.text) <= {"job"}, str(query)
        for name in re.findall(r"\$(__\w+)", query.text):
            assert name in GRAFANA_INTERVALS, f"{query}: ${name}"


def test_sql_names_only_tables_and_macros_that_exist() -> None:
    tables = set(Base.metadata.tables)
    sql = [query for query in all_queries() if query.language == "sql"]
    for query in sql:
        named = set(re.findall(r"\b(?:FROM|JOIN)\s+([a-z_]+)\b(?!\s*\()", query.text))  # not functions
        named -= set(re.findall(r"(?:WITH|,)\s+([a-z_]+) AS \(", query.text))  # common table expressions
        assert named and named <= tables, f"{query}: unknown tables {named - tables}"
        macros = set(re.findall(r"\$(__\w+)\(", query.text))
        assert macros <= POSTGRES_MACROS, f"{query}: unknown macros {macros - POSTGRES_MACROS}"
        builtins = set(re.findall(r"\$(__\w+)(?!\w|\()", query.text))
        assert builtins <= {"__interval", "__interval_ms"}, f"{query}: {builtins}"
        # A single value is inserted as it is (quote it); a multi-value one as a quoted list.
        assert "$client" not in query.text.replace("'$client'", ""), f"{query}: $client unquoted"
        assert "$model" not in query.text.replace("IN ($model)", ""), f"{query}: $model is a list"
        if query.format == "time_series":
            assert '"time"' in query.text or "$__timeGroupAlias" in query.text, str(query)
            assert re.search(r"ORDER BY 1\s*$", query.text), f"{query}: Grafana needs rows in time order"
    tables_read = {t for q in sql for t in re.findall(r"\b(?:FROM|JOIN)\s+([a-z_]+)\b", q.text)} & tables
    assert {"sessions", "alerts", "dead_letters", "notifications", "silences"} <= tables_read
