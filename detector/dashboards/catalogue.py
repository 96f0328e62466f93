"""Every dashboard by uid, and their files: `build_dashboards()` and `write_dashboards(directory)`."""

from __future__ import annotations

import json
from pathlib import Path

from detector.dashboards import client, health, overview
from detector.dashboards.builder import JSON
from detector.dashboards.common import TAG


def dashboard_links() -> list[JSON]:
    """The links every dashboard carries: a menu of the detector's dashboards (by tag), keeping the time
    range and the variables they share."""
    return [
        {
            "type": "dashboards",
            "title": "mia-detector",
            "tags": [TAG],
            "asDropdown": True,
            "includeVars": True,
            "keepTime": True,
            "icon": "external link",
            "targetBlank": False,
            "tooltip": "",
            "url": "",
        }
    ]


def build_dashboards() -> dict[str, JSON]:
    """Every dashboard's JSON model (Grafana 10.3 to 11.x) by uid: `mia-overview`, `mia-client`,
    `mia-health`. Each call builds fresh dicts, which the caller may change."""
    boards = [build(dashboard_links()) for build in (overview.build, client.build, health.build)]
    return {board["uid"]: board for board in boards}


def render(dashboard: JSON) -> str:
    """The file text of a dashboard: keys sorted, two-space indent, a final newline, so that a change to
    the code shows as a readable `git diff` of the files."""
    return json.dumps(dashboard, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_dashboards(directory: Path) -> list[Path]:
    """Write `<uid>.json` for every dashboard into `directory` (created if needed); return the paths, in
    uid order. Files of other names are left alone."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for uid, dashboard in sorted(build_dashboards().items()):
        path = directory / f"{uid}.json"
        path.write_text(render(dashboard), encoding="utf-8")
        paths.append(path)
    return paths
