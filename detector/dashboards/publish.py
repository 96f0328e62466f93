"""What `mia-detector dashboards push` publishes, decided from the settings and the operator's options: the
Grafana client, the data sources the dashboards read from (with their defaults), and the push itself."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from detector.dashboards import FOLDER_TITLE, build_dashboards
from detector.dashboards.push import DataSource, PushReport, postgres_datasource, prometheus_datasource, push
from detector.grafana import GrafanaClient
from detector.settings import ConfigError

if TYPE_CHECKING:
    from detector.settings import GrafanaSettings, Settings

# What a data source that does not exist yet is created with, for each option not given.
DEFAULT_PROMETHEUS_URL = "http://localhost:9090"
DEFAULT_POSTGRES_HOST = "localhost:5432"
DEFAULT_POSTGRES_DATABASE = "mia"
DEFAULT_POSTGRES_USER = "grafana_reader"
DEFAULT_POSTGRES_SSLMODE = "require"


@dataclass(frozen=True)
class DataSourceOptions:
    """The data-source options an operator gave for one push; None for each one not given."""

    prometheus_url: str | None = None
    postgres_host: str | None = None  # host:port
    postgres_database: str | None = None
    postgres_user: str | None = None
    postgres_sslmode: str | None = None


def grafana_client(settings: Settings, url: str) -> GrafanaClient:
    """A client of the Grafana at `url` with the settings' service-account token, TLS verification and
    (the alert sinks') request timeout. Raises `ConfigError` when no token is set, `ValueError` when no
    Grafana can be at `url` (the message never quotes it)."""
    if settings.grafana.token is None:
        raise ConfigError("set MIA_GRAFANA_TOKEN to a Grafana service-account token (role Admin)")
    return GrafanaClient(
        url,
        settings.grafana.token.get_secret_value(),
        timeout=settings.alerts.timeout_seconds,
        verify=settings.grafana.verify_tls,
    )


def wanted_datasources(grafana: GrafanaSettings, options: DataSourceOptions) -> list[DataSource]:
    """The Prometheus and PostgreSQL data sources the dashboards read from: each option not given takes its
    `DEFAULT_*` value, and the PostgreSQL password comes from the settings (`MIA_GRAFANA_POSTGRES_PASSWORD`).

    A data source that already exists in Grafana is updated only when one of its own options (or, for
    PostgreSQL, the password) is given: otherwise a push leaves what an operator set up there alone.
    """
    # The password comes from the environment (or the settings file), never an option: `ps` shows those.
    password = grafana.postgres_password
    postgres_options = (
        options.postgres_host,
        options.postgres_database,
        options.postgres_user,
        options.postgres_sslmode,
    )
    prometheus = prometheus_datasource(options.prometheus_url or DEFAULT_PROMETHEUS_URL)
    postgres = postgres_datasource(
        options.postgres_host or DEFAULT_POSTGRES_HOST,
        options.postgres_database or DEFAULT_POSTGRES_DATABASE,
        options.postgres_user or DEFAULT_POSTGRES_USER,
        password=password.get_secret_value() if password is not None else None,
        sslmode=options.postgres_sslmode or DEFAULT_POSTGRES_SSLMODE,
    )
    return [
        dataclasses.replace(prometheus, update_existing=options.prometheus_url is not None),
        dataclasses.replace(
            postgres, update_existing=any(option is not None for option in (*postgres_options, password))
        ),
    ]


def publish(client: GrafanaClient, grafana: GrafanaSettings, options: DataSourceOptions) -> PushReport:
    """Push every dashboard into the folder `FOLDER_TITLE`, reading from `wanted_datasources(grafana,
    options)`; see `push` for what is created, updated or left unchanged, and for what it raises."""
    return push(client, build_dashboards(), wanted_datasources(grafana, options), FOLDER_TITLE)


__all__ = [
    "DEFAULT_POSTGRES_DATABASE",
    "DEFAULT_POSTGRES_HOST",
    "DEFAULT_POSTGRES_SSLMODE",
    "DEFAULT_POSTGRES_USER",
    "DEFAULT_PROMETHEUS_URL",
    "DataSourceOptions",
    "grafana_client",
    "publish",
    "wanted_datasources",
]
