"""Where notifications go: one module per receiver, each speaking the receiver's native payload."""

from __future__ import annotations

from collections.abc import Callable

from detector.alerts.sinks.base import DeliveryError, Sink
from detector.settings import Settings


def _alertmanager(settings: Settings) -> Sink:
    from detector.alerts.sinks.alertmanager import AlertmanagerSink

    assert settings.alertmanager.url is not None
    # An open alert stays active in Alertmanager until it is notified again (at most a renotify interval
    # later, while detections go on) or resolved (a quiet period after the last detection); should the
    # detector stop, it expires by itself.
    hold = settings.alerts.renotify_seconds + settings.alerts.resolve_after_seconds
    return AlertmanagerSink(
        settings.alertmanager.url.get_secret_value(),
        hold_seconds=hold,
        timeout=settings.alerts.timeout_seconds,
    )


def _pagerduty(settings: Settings) -> Sink:
    from detector.alerts.sinks.pagerduty import PagerDutySink

    assert settings.pagerduty.routing_key is not None
    return PagerDutySink(
        settings.pagerduty.routing_key.get_secret_value(),
        url=settings.pagerduty.url,
        timeout=settings.alerts.timeout_seconds,
    )


def _slack(settings: Settings) -> Sink:
    from detector.alerts.sinks.slack import SlackSink

    assert settings.slack.webhook_url is not None
    return SlackSink(settings.slack.webhook_url.get_secret_value(), timeout=settings.alerts.timeout_seconds)


def _webhook(settings: Settings) -> Sink:
    from detector.alerts.sinks.webhook import WebhookSink

    assert settings.webhook.url is not None
    secret = settings.webhook.secret
    return WebhookSink(
        settings.webhook.url.get_secret_value(),
        secret=secret.get_secret_value() if secret is not None else None,
        headers=settings.webhook.headers,
        timeout=settings.alerts.timeout_seconds,
    )


def _ocsf_file(settings: Settings) -> Sink:
    from detector.alerts.sinks.ocsf import OcsfFileSink

    assert settings.ocsf.file is not None
    return OcsfFileSink(settings.ocsf.file)


def _ocsf_kafka(settings: Settings) -> Sink:
    from detector.alerts.sinks.ocsf import OcsfKafkaSink

    assert settings.ocsf.topic is not None
    return OcsfKafkaSink(settings.kafka, settings.ocsf.topic, timeout=settings.alerts.timeout_seconds)


def _grafana(settings: Settings) -> Sink:
    from detector.alerts.sinks.grafana import GrafanaAnnotationSink

    assert settings.grafana.url is not None and settings.grafana.token is not None
    return GrafanaAnnotationSink(
        settings.grafana.url,
        settings.grafana.token.get_secret_value(),
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


def configured_sink_names(settings: Settings) -> list[str]:
    """The names of the sinks the settings configure, in a fixed order."""
    return [name for name, configured, _ in _SINKS if configured(settings)]


def build_sinks(settings: Settings) -> list[Sink]:
    """A sink for every receiver the settings configure, in the order of `configured_sink_names`."""
    return [build(settings) for _, configured, build in _SINKS if configured(settings)]


__all__ = ["SINK_NAMES", "DeliveryError", "Sink", "build_sinks", "configured_sink_names"]
