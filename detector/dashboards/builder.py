"""A small generator of Grafana dashboard JSON: plain dicts, one helper per panel kind, ids and positions
assigned automatically.

The JSON is the dashboard model of Grafana 10.3 to 11.x (`SCHEMA_VERSION` 39; newer releases migrate it
on load). Every query names its data source through a dashboard variable (`${prometheus}`, `${postgres}`),
so one file serves every Grafana whatever its data sources are called.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]

SCHEMA_VERSION = 39  # Grafana 10.3 to 11.2 write 39; later releases migrate it forward when loading
GRID_COLUMNS = 24

PROMETHEUS = "prometheus"  # the name of the Prometheus data source variable
POSTGRES = "postgres"  # the name of the PostgreSQL data source variable
# The PostgreSQL data source's plugin id since Grafana 10.2.3; the old id "postgres" remains an alias, so
# data sources provisioned with either type are offered by the variable.
POSTGRES_PLUGIN_ID = "grafana-postgresql-datasource"
PROMETHEUS_PLUGIN_ID = "prometheus"


@dataclass(frozen=True)
class Datasource:
    """A data source chosen by the dashboard variable `variable` among those of plugin `plugin`."""

    variable: str
    plugin: str
    label: str

    @property
    def ref(self) -> JSON:
        """The reference panels and targets carry: the plugin, and the variable as uid."""
        return {"type": self.plugin, "uid": f"${{{self.variable}}}"}

    def variable_json(self) -> JSON:
        """The `datasource` variable listing every data source of the plugin."""
        return {
            "type": "datasource",
            "name": self.variable,
            "label": self.label,
            "query": self.plugin,
            "current": {},
            "hide": 0,
            "includeAll": False,
            "multi": False,
            "options": [],
            "refresh": 1,
            "regex": "",
            "skipUrlSync": False,
        }


PROMETHEUS_SOURCE = Datasource(PROMETHEUS, PROMETHEUS_PLUGIN_ID, "Prometheus")
POSTGRES_SOURCE = Datasource(POSTGRES, POSTGRES_PLUGIN_ID, "Detector database")


@dataclass(frozen=True)
class Target:
    """One query of a panel: its data source and the query fields Grafana stores for that data source."""

    source: Datasource
    fields: JSON

    def json(self, ref_id: str) -> JSON:
        return {"datasource": self.source.ref, "refId": ref_id, **self.fields}


def promql(
    expr: str, legend: str = "", *, instant: bool = False, table: bool = False, heatmap: bool = False
) -> Target:
    """A PromQL query; `legend` is Grafana's legend format (`{{label}}`). `instant` evaluates it at the end
    of the range only; `table` (instant) returns one row per series with its labels as columns; `heatmap`
    turns cumulative histogram buckets into per-bucket counts (Grafana's "Format: Heatmap")."""
    return Target(
        PROMETHEUS_SOURCE,
        {
            "editorMode": "code",
            "expr": expr,
            "format": "heatmap" if heatmap else "table" if table else "time_series",
            "instant": instant or table,
            "legendFormat": legend or "__auto",
            "range": not (instant or table),
        },
    )


def sql(query: str, *, series: bool = False) -> Target:
    """A PostgreSQL query in code mode: a table, or (`series`) a time series, its `time` column first."""
    return Target(
        POSTGRES_SOURCE,
        {
            "editorMode": "code",
            "format": "time_series" if series else "table",
            "rawQuery": True,
            "rawSql": query.strip(),
        },
    )


# -- panels --------------------------------------------------------------------------------------------------


def _panel(kind: str, title: str, description: str, targets: list[Target], width: int, height: int) -> JSON:
    sources = {target.source for target in targets}
    if len(sources) != 1:
        raise ValueError(f"panel {title!r}: every query must use one data source, got {len(sources)}")
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": targets[0].source.ref,
        "targets": [target.json(chr(ord("A") + index)) for index, target in enumerate(targets)],
        "gridPos": {"h": height, "w": width},
    }


def thresholds(*steps: tuple[float, str], base: str = "green") -> JSON:
    """Absolute thresholds: `base` below the first step, then each (value, color)."""
    return {
        "mode": "absolute",
        "steps": [{"color": base, "value": None}, *({"color": c, "value": v} for v, c in steps)],
    }


def timeseries(
    title: str,
    description: str,
    targets: list[Target],
    *,
    unit: str = "short",
    stacked: bool = False,
    bars: bool = False,
    width: int = 12,
    height: int = 8,
    overrides: list[JSON] | None = None,
) -> JSON:
    """A time series panel (lines, or bars for counts per interval)."""
    panel = _panel("timeseries", title, description, targets, width, height)
    panel["fieldConfig"] = {
        "defaults": {
            "unit": unit,
            "min": 0,
            "color": {"mode": "palette-classic"},
            "custom": {
                "drawStyle": "bars" if bars else "line",
                "fillOpacity": 60 if bars else 10,
                "lineWidth": 1,
                "showPoints": "never",
                "spanNulls": False,
                "stacking": {"group": "A", "mode": "normal" if stacked else "none"},
            },
        },
        "overrides": overrides or [],
    }
    panel["options"] = {
        "legend": {"calcs": [], "displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return panel


def stat(
    title: str,
    description: str,
    targets: list[Target],
    *,
    unit: str = "short",
    steps: JSON | None = None,
    mappings: list[JSON] | None = None,
    show_name: bool = False,
    width: int = 4,
    height: int = 4,
) -> JSON:
    """A single-value panel (one value per series); `show_name` shows the series name instead (a version)."""
    panel = _panel("stat", title, description, targets, width, height)
    panel["fieldConfig"] = {
        "defaults": {
            "unit": unit,
            "color": {"mode": "thresholds"},
            "thresholds": steps or thresholds(),
            "mappings": mappings or [],
        },
        "overrides": [],
    }
    panel["options"] = {
        "colorMode": "value",
        "graphMode": "none",
        "justifyMode": "auto",
        "orientation": "auto",
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "textMode": "name" if show_name else "auto",
        "wideLayout": True,
    }
    return panel


def table(
    title: str,
    description: str,
    targets: list[Target],
    *,
    overrides: list[JSON] | None = None,
    width: int = 24,
    height: int = 8,
) -> JSON:
    """A table; long text cells can be inspected, time columns show as dates."""
    panel = _panel("table", title, description, targets, width, height)
    panel["fieldConfig"] = {
        "defaults": {
            "custom": {"align": "auto", "cellOptions": {"type": "auto"}, "inspect": True},
            "color": {"mode": "thresholds"},
            "thresholds": thresholds(),
        },
        "overrides": overrides or [],
    }
    panel["options"] = {
        "cellHeight": "sm",
        "footer": {"countRows": False, "fields": "", "reducer": ["sum"], "show": False},
        "showHeader": True,
    }
    if targets[0].source is PROMETHEUS_SOURCE:
        # Instant vectors as rows: drop the evaluation time Grafana adds as a column.
        panel["transformations"] = [
            {"id": "organize", "options": {"excludeByName": {"Time": True}, "renameByName": {}}}
        ]
    return panel


def bar_gauge(
    title: str,
    description: str,
    targets: list[Target],
    *,
    unit: str = "short",
    rows: bool = False,
    steps: JSON | None = None,
    width: int = 12,
    height: int = 8,
) -> JSON:
    """Horizontal bars: one per series, or (`rows`, for SQL) one per row of a table named by its text."""
    panel = _panel("bargauge", title, description, targets, width, height)
    panel["fieldConfig"] = {
        "defaults": {
            "unit": unit,
            "min": 0,
            "color": {"mode": "thresholds"},
            "thresholds": steps or thresholds(),
        },
        "overrides": [],
    }
    panel["options"] = {
        "displayMode": "gradient",
        "minVizHeight": 16,
        "minVizWidth": 8,
        "namePlacement": "auto",
        "orientation": "horizontal",
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": rows},
        "showUnfilled": True,
        "sizing": "auto",
        "valueMode": "color",
    }
    return panel


def field_override(name: str, **properties: Any) -> JSON:
    """Field config properties for the column or series named `name` (`unit="s"`, `links=[...]`, ...)."""
    return {
        "matcher": {"id": "byName", "options": name},
        "properties": [
            {"id": _PROPERTY_IDS.get(key, key), "value": value} for key, value in properties.items()
        ],
    }


_PROPERTY_IDS = {"width": "custom.width", "display": "custom.cellOptions"}


def dashboard_link(title: str, uid: str, **variables: str) -> JSON:
    """A data link to dashboard `uid`, setting `variables` (values may use `${__value.raw}`, ...) and keeping
    the time range."""
    query = "&".join(f"var-{name}={value}" for name, value in variables.items())
    return {"title": title, "url": f"/d/{uid}?{query}&${{__url_time_range}}"}


# -- variables and annotations -------------------------------------------------------------------------------


def query_variable(
    name: str,
    label: str,
    target: Target,
    *,
    multi: bool = False,
    include_all: bool = False,
    all_value: str | None = None,
) -> JSON:
    """A variable whose options a query returns (refreshed when the dashboard loads), sorted."""
    query = target.fields.get("expr") or target.fields["rawSql"]
    return {
        "type": "query",
        "name": name,
        "label": label,
        "datasource": target.source.ref,
        "definition": query,
        "query": query,
        "current": {},
        "hide": 0,
        "includeAll": include_all,
        "allValue": all_value,
        "multi": multi,
        "options": [],
        "refresh": 1,
        "regex": "",
        "skipUrlSync": False,
        "sort": 1,
    }


def textbox_variable(name: str, label: str, description: str) -> JSON:
    """A free-text variable (set from links such as a notification's `var-client=...`)."""
    return {
        "type": "textbox",
        "name": name,
        "label": label,
        "description": description,
        "query": "",
        "current": {"selected": False, "text": "", "value": ""},
        "hide": 0,
        "options": [],
        "skipUrlSync": False,
    }


BUILT_IN_ANNOTATIONS: JSON = {
    "builtIn": 1,
    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
    "enable": True,
    "hide": True,
    "iconColor": "rgba(0, 211, 255, 1)",
    "name": "Annotations & Alerts",
    "type": "dashboard",
}


def sql_annotation(name: str, query: str, color: str) -> JSON:
    """An annotation query on the PostgreSQL data source (columns time, timeend, text, tags)."""
    return {
        "datasource": POSTGRES_SOURCE.ref,
        "enable": True,
        "hide": False,
        "iconColor": color,
        "name": name,
        "target": sql(query).json("Anno"),
    }


# -- the dashboard -------------------------------------------------------------------------------------------


@dataclass
class Dashboard:
    """A dashboard being built: panels are added in reading order and laid out left to right on the
    24-column grid, a new line when the next one does not fit and at every row header."""

    uid: str
    title: str
    description: str
    tags: list[str]
    variables: list[JSON]
    annotations: list[JSON]
    links: list[JSON] = field(default_factory=list)
    time_from: str = "now-24h"
    refresh: str = "1m"
    panels: list[JSON] = field(default_factory=list)
    _x: int = 0
    _y: int = 0
    _line_height: int = 0

    def row(self, title: str) -> None:
        """A row header starting a new line."""
        self._new_line()
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "panels": [],
                "id": len(self.panels) + 1,
                "gridPos": {"h": 1, "w": GRID_COLUMNS, "x": 0, "y": self._y},
            }
        )
        self._y += 1

    def add(self, *panels: JSON) -> None:
        """Place `panels` (made by the helpers above) after the previous ones."""
        for panel in panels:
            width, height = panel["gridPos"]["w"], panel["gridPos"]["h"]
            if not 0 < width <= GRID_COLUMNS or height <= 0:
                raise ValueError(f"panel {panel['title']!r}: size {width}x{height} does not fit the grid")
            if self._x + width > GRID_COLUMNS:
                self._new_line()
            panel["gridPos"] = {"h": height, "w": width, "x": self._x, "y": self._y}
            panel["id"] = len(self.panels) + 1
            self.panels.append(panel)
            self._x += width
            self._line_height = max(self._line_height, height)

    def _new_line(self) -> None:
        if self._x:
            self._y += self._line_height
        self._x = 0
        self._line_height = 0

    def json(self) -> JSON:
        """The dashboard model, as Grafana's JSON export shows it (no database id, version 1)."""
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": self.tags,
            "editable": True,
            "graphTooltip": 1,  # a shared crosshair between panels
            "fiscalYearStartMonth": 0,
            "id": None,
            "links": self.links,
            "liveNow": False,
            "panels": self.panels,
            "refresh": self.refresh,
            "schemaVersion": SCHEMA_VERSION,
            "templating": {"list": self.variables},
            "annotations": {"list": [BUILT_IN_ANNOTATIONS, *self.annotations]},
            "time": {"from": self.time_from, "to": "now"},
            "timepicker": {},
            "timezone": "utc",
            "version": 1,
            "weekStart": "",
        }
