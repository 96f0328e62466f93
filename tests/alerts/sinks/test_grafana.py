"""The Grafana annotation sink against `FakeGrafana`: one annotation per alert, a region once resolved."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from detector.alerts.sinks import SINK_NAMES, build_sinks, configured_sink_names
from detector.alerts.sinks.base import DeliveryError
from detector.alerts.sinks.grafana import GrafanaAnnotationSink, annotation_text
from detector.domain import Notification, NotificationEvent, Severity
from detector.settings import load_settings
from tests.grafana_server import FakeGrafana
from tests.support import canary_miss_and_recovery, make_notification

TOKEN = "glsa_editor_0123456789abcdef"


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    # The sink needs no more than an Editor's rights.
    with FakeGrafana(tokens={TOKEN: "Editor"}) as running:
        yield running


@pytest.fixture
def sink(grafana: FakeGrafana) -> Iterator[GrafanaAnnotationSink]:
    made = GrafanaAnnotationSink(grafana.url, TOKEN, timeout=2.0)
    yield made
    made.close()


def ms(notification: Notification, field: str) -> int:
    return int(getattr(notification.alert, field).timestamp() * 1000)


def only(grafana: FakeGrafana) -> dict[str, Any]:
    [annotation] = grafana.annotations.values()
    return annotation


def test_an_opened_alert_is_one_annotation_at_raised_at(
    grafana: FakeGrafana, sink: GrafanaAnnotationSink
) -> None:
    opened = make_notification(NotificationEvent.OPENED)

    sink.deliver(opened)

    annotation = only(grafana)
    assert annotation["time"] == annotation["timeEnd"] == ms(opened, "raised_at")
    assert annotation["tags"] == ["mia-detector", "training_set_targeting", "high", "credit-risk", "alert-7"]
    assert annotation["dashboardId"] == 0  # an organization annotation, on any dashboard that asks for it
    text = annotation["text"]
    assert "<b>[HIGH] training set targeting on credit-risk by client-17</b>" in text
    assert "training_hit_rate = 0.42 (p100 of baseline)" in text
    assert "distinct_training_hits = 57 (p99.9 of baseline)" in text
    assert '<a href="https://grafana.example/d/mia-client?var-client=client-17&amp;from=' in text
    assert "Status: open" in text


def test_a_retried_opened_does_not_make_a_second_annotation(
    grafana: FakeGrafana, sink: GrafanaAnnotationSink
) -> None:
    opened = make_notification(NotificationEvent.OPENED)
    sink.deliver(opened)
    writes = len(grafana.writes())

    sink.deliver(opened)

    assert len(grafana.annotations) == 1
    assert len(grafana.writes()) == writes  # the retry found everything as it should be


def test_an_answer_lost_on_the_way_back_does_not_duplicate(
    grafana: FakeGrafana, sink: GrafanaAnnotationSink
) -> None:
    opened = make_notification(NotificationEvent.OPENED)
    grafana.lose_next_answers(2)  # the lookup, then the creation: both done, neither answered

    for _ in range(2):
        with pytest.raises(DeliveryError) as raised:
            sink.deliver(opened)
        assert not raised.value.permanent

    sink.deliver(opened)  # the dispatcher's retry
    assert len(grafana.annotations) == 1


def test_resolving_closes_the_region(grafana: FakeGrafana, sink: GrafanaAnnotationSink) -> None:
    opened = make_notification(NotificationEvent.OPENED)
    sink.deliver(opened)
    resolved = make_notification(NotificationEvent.RESOLVED, sequence=2)

    sink.deliver(resolved)
    sink.deliver(resolved)  # a retry

    annotation = only(grafana)
    assert annotation["time"] == ms(opened, "raised_at")
    assert annotation["timeEnd"] == ms(resolved, "resolved_at") > annotation["time"]
    assert "Status: resolved at " in annotation["text"]
    patches = [r for r in grafana.writes() if r.method == "PATCH"]
    assert len(patches) == 1 and set(patches[0].json) == {"text", "timeEnd"}  # the tags were left alone


def test_a_resolution_without_an_annotation_creates_the_region(
    grafana: FakeGrafana, sink: GrafanaAnnotationSink
) -> None:
    resolved = make_notification(NotificationEvent.RESOLVED)

    sink.deliver(resolved)

    annotation = only(grafana)
    assert (annotation["time"], annotation["timeEnd"]) == (
        ms(resolved, "raised_at"),
        ms(resolved, "resolved_at"),
    )


def test_other_events_update_text_and_tags_of_the_same_annotation(
    grafana: FakeGrafana, sink: GrafanaAnnotationSink
) -> None:
    sink.deliver(make_notification(NotificationEvent.OPENED, severity=Severity.MEDIUM))
    sink.deliver(make_notification(NotificationEvent.UPDATED, severity=Severity.MEDIUM, sequence=2))
    escalated = make_notification(
        NotificationEvent.ESCALATED, severity=Severity.CRITICAL, previous_severity=Severity.MEDIUM, sequence=3
    )

    sink.deliver(escalated)

    annotation = only(grafana)
    assert "critical" in annotation["tags"] and "medium" not in annotation["tags"]
    assert "alert-7" in annotation["tags"]
    assert "Status: open, escalated from medium" in annotation["text"]
    assert annotation["text"] == annotation_text(escalated)


def test_each_alert_has_its_own_annotation(grafana: FakeGrafana, sink: GrafanaAnnotationSink) -> None:
    sink.deliver(make_notification(NotificationEvent.OPENED, alert_id=7))
    sink.deliver(make_notification(NotificationEvent.OPENED, alert_id=8, client_ids=("client-18",)))
    sink.deliver(make_notification(NotificationEvent.RESOLVED, alert_id=7, sequence=2))

    by_alert = {
        next(tag for tag in a["tags"] if tag.startswith("alert-")): a for a in grafana.annotations.values()
    }
    assert set(by_alert) == {"alert-7", "alert-8"}
    assert by_alert["alert-7"]["timeEnd"] > by_alert["alert-7"]["time"]
    assert by_alert["alert-8"]["timeEnd"] == by_alert["alert-8"]["time"]


def test_a_test_notification_is_annotated_once_and_apart(
    grafana: FakeGrafana, sink: GrafanaAnnotationSink
) -> None:
    test = make_notification(NotificationEvent.TEST)
    sink.deliver(test)
    sink.deliver(test)
    sink.deliver(make_notification(NotificationEvent.TEST, sequence=2))

    assert len(grafana.annotations) == 2
    for annotation in grafana.annotations.values():
        assert annotation["tags"][:2] == ["mia-detector", "test"]
        assert not any(tag.startswith("alert-") for tag in annotation["tags"])
        assert annotation["text"].startswith("<b>[TEST] ")


def test_a_canary_recovery_closes_the_region_of_the_miss(
    grafana: FakeGrafana, sink: GrafanaAnnotationSink
) -> None:
    earlier, _ = canary_miss_and_recovery()
    missed, recovered = canary_miss_and_recovery()
    for notification in (earlier, missed, recovered):
        sink.deliver(notification)

    by_canary = {
        next(tag for tag in a["tags"] if tag.startswith("canary-")): a for a in grafana.annotations.values()
    }
    # Each miss has an annotation of its own (their alert id, 0, names none of them).
    assert set(by_canary) == {f"canary-{earlier.alert.client_id}", f"canary-{missed.alert.client_id}"}
    earlier_miss = by_canary[f"canary-{earlier.alert.client_id}"]
    assert earlier_miss["time"] == earlier_miss["timeEnd"] == ms(earlier, "raised_at")
    last_miss = by_canary[f"canary-{missed.alert.client_id}"]
    assert last_miss["time"] == ms(missed, "raised_at")
    assert last_miss["timeEnd"] == ms(recovered, "resolved_at") > last_miss["time"]
    assert (
        last_miss["text"].startswith("<b>[CANARY RECOVERED] ") and "Status: resolved at " in last_miss["text"]
    )


def test_callers_text_is_escaped(grafana: FakeGrafana, sink: GrafanaAnnotationSink) -> None:
    sink.deliver(make_notification(NotificationEvent.OPENED, client_ids=('<img src=x onerror="alert(1)">',)))

    text = only(grafana)["text"]
    assert "<img" not in text and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in text


def test_a_grafana_that_is_down_is_a_transient_failure(
    grafana: FakeGrafana, sink: GrafanaAnnotationSink
) -> None:
    opened = make_notification(NotificationEvent.OPENED)
    grafana.stop()

    with pytest.raises(DeliveryError) as raised:
        sink.deliver(opened)

    error = raised.value
    assert not error.permanent
    assert str(error).startswith("grafana: find annotations: no answer (ConnectionError")
    assert "127.0.0.1" not in str(error) and "\n" not in str(error)
    grafana.start()
    sink.deliver(opened)
    assert len(grafana.annotations) == 1


@pytest.mark.parametrize(
    ("status", "permanent"), [(500, False), (503, False), (429, False), (400, True), (403, True)]
)
def test_grafana_errors_are_transient_or_permanent(
    grafana: FakeGrafana, sink: GrafanaAnnotationSink, status: int, permanent: bool
) -> None:
    grafana.fail_next(1, status)
    with pytest.raises(DeliveryError) as raised:
        sink.deliver(make_notification(NotificationEvent.OPENED))
    assert raised.value.permanent is permanent
    assert f"HTTP {status}" in str(raised.value) and str(raised.value).startswith("grafana: ")
    assert grafana.annotations == {}


def test_rate_limiting_carries_retry_after(grafana: FakeGrafana, sink: GrafanaAnnotationSink) -> None:
    grafana.fail_next(1, 429, headers={"Retry-After": "7"})
    with pytest.raises(DeliveryError) as raised:
        sink.deliver(make_notification(NotificationEvent.OPENED))
    assert not raised.value.permanent and raised.value.retry_after == 7.0


def test_a_refused_token_is_permanent_and_never_shown(grafana: FakeGrafana) -> None:
    wrong = "glsa_wrong_0123456789abcdef"
    sink = GrafanaAnnotationSink(grafana.url, wrong, timeout=2.0)
    with pytest.raises(DeliveryError) as raised:
        sink.deliver(make_notification(NotificationEvent.OPENED))
    sink.close()
    sink.close()  # safe twice
    assert raised.value.permanent and "HTTP 401" in str(raised.value) and wrong not in str(raised.value)


def test_the_settings_configure_it(grafana: FakeGrafana) -> None:
    assert "grafana" in SINK_NAMES
    settings = load_settings(None, grafana={"url": grafana.url})
    assert "grafana" not in configured_sink_names(settings)  # a URL without a token is not enough
    settings = load_settings(None, grafana={"url": grafana.url, "token": TOKEN})
    assert configured_sink_names(settings) == ["grafana"]
    assert TOKEN not in str(settings.masked())
    [sink] = build_sinks(settings)
    sink.deliver(make_notification(NotificationEvent.OPENED))
    sink.close()
    assert len(grafana.annotations) == 1
