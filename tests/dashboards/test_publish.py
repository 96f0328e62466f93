"""What `dashboards push` publishes: the data sources from the operator's options, the settings and the
defaults, and the Grafana client from the settings."""

from __future__ import annotations

import pytest

from detector.dashboards.publish import (
    DEFAULT_POSTGRES_DATABASE,
    DEFAULT_POSTGRES_HOST,
    DEFAULT_POSTGRES_SSLMODE,
    DEFAULT_POSTGRES_USER,
    DEFAULT_PROMETHEUS_URL,
    DataSourceOptions,
    grafana_client,
    wanted_datasources,
)
from detector.dashboards.push import POSTGRES_UID, PROMETHEUS_UID
from detector.settings import ConfigError, GrafanaSettings, load_settings
from tests.test_cli import cli_env, mia

PASSWORD = "s3cr3t-reader"


def test_without_options_new_data_sources_get_the_defaults_and_existing_ones_are_kept() -> None:
    prometheus, postgres = wanted_datasources(GrafanaSettings(), DataSourceOptions())

    assert (prometheus.uid, prometheus.url, prometheus.update_existing) == (
        PROMETHEUS_UID,
        DEFAULT_PROMETHEUS_URL,
        False,
    )
    assert (postgres.uid, postgres.url, postgres.user, postgres.database) == (
        POSTGRES_UID,
        DEFAULT_POSTGRES_HOST,
        DEFAULT_POSTGRES_USER,
        DEFAULT_POSTGRES_DATABASE,
    )
    assert postgres.json_data["sslmode"] == DEFAULT_POSTGRES_SSLMODE
    assert not postgres.update_existing and not postgres.secure_json_data


def test_an_option_given_updates_only_its_own_data_source() -> None:
    options = DataSourceOptions(postgres_host="db:5432", postgres_sslmode="verify-full")

    prometheus, postgres = wanted_datasources(GrafanaSettings(), options)

    assert not prometheus.update_existing and prometheus.url == DEFAULT_PROMETHEUS_URL
    assert postgres.update_existing and postgres.url == "db:5432"
    assert postgres.json_data == {"database": DEFAULT_POSTGRES_DATABASE, "sslmode": "verify-full"}

    prometheus, postgres = wanted_datasources(
        GrafanaSettings(), DataSourceOptions(prometheus_url="http://prometheus:9090")
    )
    assert prometheus.update_existing and prometheus.url == "http://prometheus:9090"
    assert not postgres.update_existing


def test_the_password_comes_from_the_settings_and_updates_the_postgres_data_source() -> None:
    grafana = GrafanaSettings(postgres_password=PASSWORD)

    prometheus, postgres = wanted_datasources(grafana, DataSourceOptions())

    assert postgres.update_existing and postgres.secure_json_data == {"password": PASSWORD}
    assert not prometheus.update_existing and not prometheus.secure_json_data
    assert PASSWORD not in repr(postgres)


def test_the_client_needs_a_token_and_a_grafana_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MIA_GRAFANA_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="set MIA_GRAFANA_TOKEN"):
        grafana_client(load_settings(None), "http://127.0.0.1:9")
    settings = load_settings(None, grafana={"token": "glsa_t0ken", "verify_tls": False})
    with pytest.raises(ValueError) as refused:
        grafana_client(settings, "grafana:3000")
    assert not isinstance(refused.value, ConfigError)

    client = grafana_client(settings, "http://127.0.0.1:9/grafana/")
    try:
        assert client.address.base_url == "http://127.0.0.1:9/grafana"
    finally:
        client.close()


def test_the_push_help_names_the_defaults() -> None:
    result = mia("dashboards", "push", "--help", env=cli_env())

    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())
    for default in (
        DEFAULT_PROMETHEUS_URL,
        DEFAULT_POSTGRES_HOST,
        DEFAULT_POSTGRES_DATABASE,
        DEFAULT_POSTGRES_USER,
        DEFAULT_POSTGRES_SSLMODE,
    ):
        assert f"(default: {default})" in help_text or f"data source: {default})" in help_text, default
