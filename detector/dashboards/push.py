"""Publish the dashboards to a running Grafana, idempotently: `push(client, dashboards, datasources, title)`.

One push makes sure that

1. the folder exists (found by uid, else by title; created with a fixed uid when missing),
2. each data source exists with the wanted settings (found by uid, else by name; created or updated); a
   provisioned (read-only) one, or one with `update_existing=False`, is used as it is,
3. each dashboard is stored in that folder (`POST /api/dashboards/db` with `overwrite: true`), its
   data-source template variables (`prometheus`, `postgres`) set to resolve to those data sources.

What already matches is left alone, so a second push reports everything `unchanged` and bumps no version;
the one exception is a data source given a secret (a PostgreSQL password): Grafana never returns secrets,
so it cannot be compared and is written again (`updated`, one version more) on every push.

Targets the HTTP API of Grafana 10.x and 11.x (see `detector.grafana`). Managing data sources
takes a token of a service account with the Admin role.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from detector.dashboards import POSTGRES_VARIABLE, PROMETHEUS_VARIABLE
from detector.grafana import GrafanaClient, GrafanaError

DEFAULT_FOLDER_UID = "mia-detector"
PROMETHEUS_UID = "mia-prometheus"
POSTGRES_UID = "mia-postgres"
PROMETHEUS_NAME = "mia-detector Prometheus"
POSTGRES_NAME = "mia-detector PostgreSQL"
# The data-source type of PostgreSQL that every Grafana 10.x and 11.x knows: late in 10.x the plugin was
# renamed `grafana-postgresql-datasource`, keeping `postgres` as its alias.
POSTGRES_TYPE = "postgres"

Action = Literal["created", "updated", "unchanged"]
Kind = Literal["folder", "datasource", "dashboard"]

# Old plugin ids Grafana still accepts for renamed plugins.
_PLUGIN_ALIASES = {"postgres": "grafana-postgresql-datasource"}
# Data-source fields an operator may have set in Grafana that a push keeps as they are.
_KEPT_FIELDS = ("isDefault", "basicAuth", "basicAuthUser", "withCredentials")
# Dashboard fields Grafana sets on every save: they differ between two pushes of the same content.
_VOLATILE_FIELDS = ("id", "version")


@dataclass(frozen=True)
class DataSource:
    """A data source the dashboards need. `variable` names the dashboards' data-source template variable
    that must resolve to it. `secure_json_data` (passwords) is written, never read back, never printed."""

    variable: str
    name: str
    uid: str
    type: str
    url: str
    access: str = "proxy"
    user: str = ""
    database: str = ""
    json_data: Mapping[str, Any] = field(default_factory=dict)
    secure_json_data: Mapping[str, str] = field(default_factory=dict, repr=False)
    # False: a data source that already exists (by uid or name) is used as it is; only a missing one is
    # created from these settings.
    update_existing: bool = True

    def body(self, existing: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The create/update request body; over an `existing` data source, its uid, its other `jsonData`
        keys and the fields in `_KEPT_FIELDS` are kept."""
        body: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "uid": self.uid,
            "url": self.url,
            "access": self.access,
            "user": self.user,
            "database": self.database,
            "jsonData": dict(self.json_data),
        }
        if existing is not None:
            body["uid"] = existing.get("uid") or self.uid
            body["jsonData"] = {**(existing.get("jsonData") or {}), **self.json_data}
            body.update({name: existing[name] for name in _KEPT_FIELDS if name in existing})
        if self.secure_json_data:
            body["secureJsonData"] = dict(self.secure_json_data)
        return body


def prometheus_datasource(url: str, *, name: str = PROMETHEUS_NAME, uid: str = PROMETHEUS_UID) -> DataSource:
    """The Prometheus that scrapes the detector, queried by Grafana's server (`access: proxy`)."""
    return DataSource(PROMETHEUS_VARIABLE, name, uid, "prometheus", url, json_data={"httpMethod": "POST"})


def postgres_datasource(
    host: str,
    database: str,
    user: str,
    *,
    password: str | None = None,
    sslmode: str = "require",
    name: str = POSTGRES_NAME,
    uid: str = POSTGRES_UID,
    type: str = POSTGRES_TYPE,
) -> DataSource:
    """The detector's PostgreSQL database (`host` is `host:port`), read by a read-only `user`."""
    return DataSource(
        POSTGRES_VARIABLE,
        name,
        uid,
        type,
        host,
        user=user,
        # Grafana 10+ reads the database from jsonData; older ones, and some tools, from the top level.
        database=database,
        json_data={"database": database, "sslmode": sslmode},
        secure_json_data={"password": password} if password else {},
    )


@dataclass(frozen=True)
class Change:
    """What a push did to one object in Grafana. `url` is relative to Grafana's base URL (dashboards)."""

    kind: Kind
    uid: str
    title: str
    action: Action
    version: int | None = None
    url: str | None = None
    note: str = ""  # why an existing data source was left as it is: "provisioned" or "kept"


@dataclass(frozen=True)
class PushReport:
    """Everything a push touched, in the order it touched it."""

    folder: Change
    datasources: list[Change]
    dashboards: list[Change]

    @property
    def changes(self) -> list[Change]:
        """The folder, then the data sources, then the dashboards."""
        return [self.folder, *self.datasources, *self.dashboards]

    def by_action(self, action: Action) -> list[Change]:
        """The changes that were `created`, `updated` or `unchanged`."""
        return [change for change in self.changes if change.action == action]

    @property
    def summary(self) -> str:
        """`3 created, 1 updated, 4 unchanged`."""
        return ", ".join(
            f"{len(self.by_action(action))} {action}" for action in ("created", "updated", "unchanged")
        )


def bind_datasources(dashboard: Mapping[str, Any], datasources: Sequence[DataSource]) -> dict[str, Any]:
    """A copy of `dashboard` whose data-source template variables select `datasources`: the variable named
    by each data source's `variable` gets that data source as its `current` value (by uid), so panels that
    use `${prometheus}` or `${postgres}` query it rather than whichever data source Grafana defaults to."""
    bound = copy.deepcopy(dict(dashboard))
    by_variable = {datasource.variable: datasource for datasource in datasources}
    for variable in (bound.get("templating") or {}).get("list") or []:
        datasource = by_variable.get(variable.get("name"))
        if variable.get("type") != "datasource" or datasource is None:
            continue
        plugin = variable.get("query")
        if plugin and _plugin(plugin) != _plugin(datasource.type):
            raise ValueError(
                f"dashboard {bound.get('uid')!r}: variable {variable['name']!r} lists {plugin} data sources, "
                f"but {datasource.name!r} is a {datasource.type} data source"
            )
        variable["current"] = {"selected": True, "text": datasource.name, "value": datasource.uid}
    return bound


def _plugin(type_or_alias: str) -> str:
    """The plugin id a data-source type names (Grafana resolves aliases of renamed plugins)."""
    return _PLUGIN_ALIASES.get(type_or_alias, type_or_alias)


def push(
    client: GrafanaClient,
    dashboards: Mapping[str, Mapping[str, Any]],
    datasources: Sequence[DataSource],
    folder_title: str,
    *,
    folder_uid: str = DEFAULT_FOLDER_UID,
    message: str = "published by mia-detector",
) -> PushReport:
    """Make Grafana hold `dashboards` (uid → dashboard JSON) in the folder `folder_title`, reading from
    `datasources`; create or update only what differs. Raises `ValueError` before any request for a
    dashboard without a title, whose uid is not its key, or whose data-source variable lists another
    plugin than its data source's; `GrafanaError` when Grafana refuses."""
    for uid, dashboard in dashboards.items():
        if dashboard.get("uid") != uid or not dashboard.get("title"):
            raise ValueError(f"dashboard {uid!r} must have the uid {uid!r} and a title")
        bind_datasources(dashboard, datasources)
    folder = _ensure_folder(client, folder_title, folder_uid)
    datasource_changes: list[Change] = []
    resolved: list[DataSource] = []
    for datasource in datasources:
        change = _ensure_datasource(client, datasource)
        datasource_changes.append(change)
        # A data source adopted by name keeps its own uid: the dashboards must point at that one.
        resolved.append(dataclasses.replace(datasource, uid=change.uid, name=change.title))
    dashboard_changes = [
        _ensure_dashboard(client, bind_datasources(dashboard, resolved), folder.uid, message)
        for dashboard in dashboards.values()
    ]
    return PushReport(folder, datasource_changes, dashboard_changes)


def _ensure_folder(client: GrafanaClient, title: str, uid: str) -> Change:
    found = client.folder(uid)
    if found is None:
        # A folder made by hand under the same title: use it rather than fail on the duplicate title.
        same_title = [folder for folder in client.folders() if folder.get("title") == title]
        if same_title:
            found = same_title[0]
        else:
            created = client.create_folder(title, uid)
            return Change("folder", _uid(created), title, "created", _version(created), created.get("url"))
    if found.get("title") != title:
        renamed = client.rename_folder(_uid(found), title)
        return Change("folder", _uid(renamed), title, "updated", _version(renamed), renamed.get("url"))
    return Change("folder", _uid(found), title, "unchanged", _version(found), found.get("url"))


def _ensure_datasource(client: GrafanaClient, datasource: DataSource) -> Change:
    existing = client.datasource(datasource.uid) or client.datasource_by_name(datasource.name)
    if existing is None:
        created = client.create_datasource(datasource.body())
        return Change("datasource", _uid(created), datasource.name, "created", _version(created))
    name = str(existing.get("name") or datasource.name)
    if existing.get("readOnly"):
        # Provisioned from a file: that file is the authority, and Grafana refuses changes anyway.
        return Change("datasource", _uid(existing), name, "unchanged", _version(existing), note="provisioned")
    if not datasource.update_existing:
        return Change("datasource", _uid(existing), name, "unchanged", _version(existing), note="kept")
    wanted = datasource.body(existing)
    # Secrets cannot be compared (Grafana only says which are set): with one, always write.
    if not datasource.secure_json_data and all(existing.get(key) == value for key, value in wanted.items()):
        return Change("datasource", _uid(existing), name, "unchanged", _version(existing))
    updated = client.update_datasource(_uid(existing), wanted)
    return Change("datasource", _uid(updated), datasource.name, "updated", _version(updated))


def _ensure_dashboard(
    client: GrafanaClient, dashboard: dict[str, Any], folder_uid: str, message: str
) -> Change:
    uid, title = str(dashboard["uid"]), str(dashboard["title"])
    wanted = _content(dashboard)
    existing = client.dashboard(uid)
    if existing is not None:
        meta = existing.get("meta") or {}
        stored = existing.get("dashboard") or {}
        if meta.get("folderUid") == folder_uid and _content(stored) == wanted:
            return Change("dashboard", uid, title, "unchanged", _version(stored), meta.get("url"))
    # Without an id Grafana finds the dashboard by uid; `overwrite` replaces it whatever its version.
    saved = client.save_dashboard({**wanted, "id": None}, folder_uid, overwrite=True, message=message)
    action: Action = "created" if existing is None else "updated"
    return Change("dashboard", _uid(saved), title, action, _version(saved), saved.get("url"))


def _content(dashboard: Mapping[str, Any]) -> dict[str, Any]:
    """A dashboard without the fields Grafana rewrites on every save."""
    return {key: value for key, value in dashboard.items() if key not in _VOLATILE_FIELDS}


def _uid(answer: Mapping[str, Any]) -> str:
    uid = answer.get("uid")
    if not isinstance(uid, str) or not uid:
        raise GrafanaError("the answer has no uid")
    return uid


def _version(answer: Mapping[str, Any]) -> int | None:
    version = answer.get("version")
    return version if isinstance(version, int) else None


__all__ = [
    "DEFAULT_FOLDER_UID",
    "POSTGRES_UID",
    "PROMETHEUS_UID",
    "Change",
    "DataSource",
    "PushReport",
    "bind_datasources",
    "postgres_datasource",
    "prometheus_datasource",
    "push",
]
