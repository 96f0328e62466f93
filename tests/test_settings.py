"""The settings operators' manifests rely on: fixed receiver names, blank means unset, secrets masked."""

from __future__ import annotations

import json

import pytest

from detector.alerts.sinks import configured_sink_names
from detector.settings import ConfigError, load_settings

RECEIVERS = {
    "MIA_ALERTMANAGER_URL": "http://alertmanager:9093",
    "MIA_PAGERDUTY_ROUTING_KEY": "R0UT1NGKEY0000000000000000000000",
    "MIA_PAGERDUTY_URL": "http://pd.internal/v2/enqueue",
    "MIA_SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T0/B0/s3cr3t",
    "MIA_WEBHOOK_URL": "https://siem.example/hook",
    "MIA_WEBHOOK_SECRET": "hmac-s3cr3t",
    "MIA_WEBHOOK_HEADERS": '{"Authorization": "Bearer t0ken"}',
    "MIA_OCSF_FILE": "/var/log/mia/findings.jsonl",
    "MIA_OCSF_TOPIC": "security-findings",
    "MIA_GRAFANA_URL": "https://grafana.example",
    "MIA_GRAFANA_TOKEN": "glsa_t0ken",
    "MIA_DASHBOARD_URL": "https://grafana.example/d/mia-client",
    "MIA_METRICS_ADDR": "0.0.0.0:9108",
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in [*RECEIVERS, "MIA_ALERTS_RENOTIFY_SECONDS"]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_fixed_receiver_names_configure_every_sink(clean_env: pytest.MonkeyPatch) -> None:
    for name, value in RECEIVERS.items():
        clean_env.setenv(name, value)

    settings = load_settings()

    assert configured_sink_names(settings) == [
        "alertmanager",
        "pagerduty",
        "slack",
        "webhook",
        "ocsf-file",
        "ocsf-kafka",
        "grafana",
    ]
    assert settings.pagerduty.url == "http://pd.internal/v2/enqueue"
    assert settings.webhook.headers == {"Authorization": "Bearer t0ken"}
    assert settings.dashboard.url == "https://grafana.example/d/mia-client"
    assert settings.metrics.host_port == ("0.0.0.0", 9108)
    shown = json.dumps(settings.masked())
    for secret in ("s3cr3t", "R0UT1NGKEY", "hmac-s3cr3t", "t0ken"):
        assert secret not in shown


def test_a_blank_value_leaves_a_receiver_unset(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("MIA_SLACK_WEBHOOK_URL", "")
    clean_env.setenv("MIA_PAGERDUTY_ROUTING_KEY", "  ")
    clean_env.setenv("MIA_PAGERDUTY_URL", "")
    clean_env.setenv("MIA_OCSF_FILE", "")

    settings = load_settings()

    assert configured_sink_names(settings) == []
    assert settings.pagerduty.url == "https://events.pagerduty.com/v2/enqueue"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("MIA_METRICS_ADDR", "9108", "invalid configuration metrics.addr (MIA_METRICS_ADDR)"),
        ("MIA_METRICS_ADDR", "host:99999", "expected host:port"),
        ("MIA_ALERTS_RENOTIFY_SECONDS", "0", "invalid configuration alerts.renotify_seconds"),
        # List and table settings are JSON: the message names the variable and shows the form.
        ("MIA_KAFKA_TOPICS", "logs", 'MIA_KAFKA_TOPICS must be a JSON list, e.g. ["inference-logs"]'),
        ("MIA_KAFKA_TOPICS", '"logs"', "(MIA_KAFKA_TOPICS): Input should be a valid list; it must be"),
        ("MIA_WEBHOOK_HEADERS", "X-Team: security", "MIA_WEBHOOK_HEADERS must be a JSON object"),
        ("MIA_LOG_LEVEL", "chatty", "invalid configuration log.level (MIA_LOG_LEVEL)"),
        # Canaries are told from real clients by the key's tag: none without a key, none with a guessable one.
        ("MIA_CANARY_INTERVAL_SECONDS", "300", "canary.key (MIA_CANARY_KEY): Value error, required with"),
        ("MIA_CANARY_KEY", "short", "canary.key (MIA_CANARY_KEY): Value error, the canary key must be"),
    ],
)
def test_bad_values_are_one_line(clean_env: pytest.MonkeyPatch, name: str, value: str, expected: str) -> None:
    clean_env.setenv(name, value)

    with pytest.raises(ConfigError) as error:
        load_settings()

    assert expected in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(("level", "fmt"), [("debug", "JSON"), ("Warning", "Console"), ("ERROR", "json")])
def test_log_level_and_format_are_read_in_any_case(
    clean_env: pytest.MonkeyPatch, level: str, fmt: str
) -> None:
    clean_env.setenv("MIA_LOG_LEVEL", level)
    clean_env.setenv("MIA_LOG_FORMAT", fmt)

    settings = load_settings()

    assert (settings.log.level, settings.log.format) == (level.upper(), fmt.lower())
