"""Where notifications go: one module per receiver, each speaking the receiver's native payload."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from detector.alerts.sinks.base import DeliveryError, Sink
from detector.settings import ConfigError, Settings

_T = TypeVar("_T")


def _required(value: _T | None, variable: str) -> _T:
    """`value`, which building a sink needs; `ConfigError` naming `variable` when it is not set (a builder
    called for a sink the settings do not configure)."""
    if value is None:
        raise ConfigError(f"{variable} is not set")
    return value


def _alertmanager(settings: Settings) -> Sink:
    from detector.alerts.sinks.alertmanager import AlertmanagerSink

    url = _required(settings.alertmanager.url, "MIA_ALERTMANAGER_URL")
    # An open alert stays active in Alertmanager until it is notified again (at most a renotify interval
    # later, while detections go on) or resolved (a quiet period after the last detection); should the
    # detector stop, it expires by itself.
    hold = settings.alerts.renotify_seconds + settings.alerts.resolve_after_seconds
    return AlertmanagerSink(
        url.get_secret_value(),
        hold_seconds=hold,
        timeout=settings.alerts.timeout_seconds,
    )


def _pagerduty(settings: Settings) -> Sink:
    from detector.alerts.sinks.pagerduty import PagerDutySink

    routing_key = _required(settings.pagerduty.routing_key, "MIA_PAGERDUTY_ROUTING_KEY")
    return PagerDutySink(
        routing_key.get_secret_value(),
        url=settings.pagerduty.url,
        timeout=settings.alerts.timeout_seconds,
    )


def _slack(settings: Settings) -> Sink:
    from detector.alerts.sinks.slack import SlackSink

    webhook_url = _required(settings.slack.webhook_url, "MIA_SLACK_WEBHOOK_URL")
    return SlackSink(webhook_url.get_secret_value(), timeout=settings.alerts.timeout_seconds)


def _webhook(settings: Settings) -> Sink:
    from detector.alerts.sinks.webhook import WebhookSink

    url = _required(settings.webhook.url, "MIA_WEBHOOK_URL")
    secret = settings.webhook.secret
    return WebhookSink(
        url.get_secret_value(),
        secret=secret.get_secret_value() if secret is not None else None,
        headers=settings.webhook.headers,
        timeout=settings.alerts.timeout_seconds,
    )


def _ocsf_file(settings: Settings) -> Sink:
    from detector.alerts.sinks.ocsf import OcsfFileSink

    return OcsfFileSink(_required(settings.ocsf.file, "MIA_OCSF_FILE"))


def _ocsf_kafka(settings: Settings) -> Sink:
    from detector.alerts.sinks.ocsf import OcsfKafkaSink

    topic = _required(settings.ocsf.topic, "MIA_OCSF_TOPIC")
    return OcsfKafkaSink(settings.kafka, topic, timeout=settings.alerts.timeout_seconds)


def _grafana(settings: Settings) -> Sink:
    from detector.alerts.sinks.grafana import GrafanaAnnotationSink

    url = _required(settings.grafana.url, "MIA_GRAFANA_URL")
    token = _required(settings.grafana.token, "MIA_GRAFANA_TOKEN")
    return GrafanaAnnotationSink(
        url,
        token.get_secret_value(),
        timeout=settings.alerts.timeout_seconds,
        verify=settings.grafana.verify_tls,
    )


# Every sink: its name (the outbox's and the metrics' label), whether the settings configure it, and how
# to build it. Building is deferred: listing alerts must not connect to a broker.
_SINKS: list[tuple[str, Callable[[Settings], bool], Callable[[Settings], Sink]]] = [
    ("alertmanager", lambda s: s.alertmanager.url is not None, _alertmanager),
    ("pagerduty", lambda s: s.pagerduty.routing_key is not None, _pagerduty),
    ("slack", lambda s: s.slack.webhook_url is not None, _slack),
    ("webhook", lambda s: s.webhook.url is not None, _webhook),
    ("ocsf-file", lambda s: s.ocsf.file is not None, _ocsf_file),
    ("ocsf-kafka", lambda s: s.ocsf.topic is not None, _ocsf_kafka),
    ("grafana", lambda s: s.grafana.url is not None and s.grafana.token is not None, _grafana),
]

SINK_NAMES = tuple(name for name, _, _ in _SINKS)
# The settings groups the sinks above are configured from.
_SINK_GROUPS = ("alertmanager", "pagerduty", "slack", "webhook", "ocsf", "grafana")


def configured_sink_names(settings: Settings) -> list[str]:
    """The names of the sinks the settings configure, in a fixed order."""
    return [name for name, configured, _ in _SINKS if configured(settings)]


def without_sinks(settings: Settings) -> Settings:
    """`settings` with no receiver configured: for runs whose alerts are measured, never delivered."""
    return settings.model_copy(update={group: type(getattr(settings, group))() for group in _SINK_GROUPS})


def build_sinks(settings: Settings) -> list[Sink]:
    """A sink for every receiver the settings configure, in the order of `configured_sink_names`."""
    return [build(settings) for _, configured, build in _SINKS if configured(settings)]


__all__ = ["SINK_NAMES", "DeliveryError", "Sink", "build_sinks", "configured_sink_names", "without_sinks"]
