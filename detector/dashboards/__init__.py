"""Grafana dashboards of the detector, built from code: `build_dashboards()` gives each dashboard's JSON by
uid, `write_dashboards(directory)` writes them as `<uid>.json` (the repository keeps them in `dashboards/`;
regenerate them with `mia-detector dashboards build`).

Every query picks its data source through a dashboard variable: `PROMETHEUS_VARIABLE` (a Prometheus data
source) and `POSTGRES_VARIABLE` (a PostgreSQL data source, plugin `POSTGRES_PLUGIN_ID`, on the detector's
database). They belong in the Grafana folder `FOLDER_TITLE`.
"""

from detector.dashboards.builder import (
    POSTGRES as POSTGRES_VARIABLE,
)
from detector.dashboards.builder import (
    POSTGRES_PLUGIN_ID,
    SCHEMA_VERSION,
)
from detector.dashboards.builder import (
    PROMETHEUS as PROMETHEUS_VARIABLE,
)
from detector.dashboards.catalogue import build_dashboards, render, write_dashboards
from detector.dashboards.common import CLIENT_UID, FOLDER_TITLE, HEALTH_UID, OVERVIEW_UID, TAG

__all__ = [
    "CLIENT_UID",
    "FOLDER_TITLE",
    "HEALTH_UID",
    "OVERVIEW_UID",
    "POSTGRES_PLUGIN_ID",
    "POSTGRES_VARIABLE",
    "PROMETHEUS_VARIABLE",
    "SCHEMA_VERSION",
    "TAG",
    "build_dashboards",
    "render",
    "write_dashboards",
]
