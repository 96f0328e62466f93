"""The contract every sink meets, run against each sink wired to a real target.

A sink is plugged in through a `SinkHarness`: it builds the sink, reads back what its target accepted,
names the identifier a receiver de-duplicates on, and can break the target. To add a sink, write a
harness and add its factory to `HARNESSES` (any sink) or `HTTP_HARNESSES` (sinks speaking HTTP, which
also get the HTTP failure checks below).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest

from detector.alerts.sinks.alertmanager import AlertmanagerSink
from detector.alerts.sinks.base import DeliveryError, Sink
from detector.alerts.sinks.grafana import GrafanaAnnotationSink
from detector.alerts.sinks.ocsf import OcsfFileSink
from detector.alerts.sinks.pagerduty import PagerDutySink
from detector.alerts.sinks.slack import SlackSink
from detector.alerts.sinks.webhook import WebhookSink
from detector.domain import Notification, NotificationEvent, Reason, Severity
from tests.alerts.sinks import test_alertmanager, test_grafana, test_pagerduty, test_slack, test_webhook
from tests.grafana_server import FakeGrafana
from tests.receivers import RecordedRequest, RecordingReceiver, Validator
from tests.support import make_notification

# What a URL must never leak into an error: the secret part of its path, and where it points.
URL_SECRET = "s3cr3t"


class SinkHarness(Protocol):
    """One sink and the real target it delivers to."""

    def make_sink(self) -> Sink:
        """A new sink delivering to the target."""
        ...

    def delivered(self) -> list[Any]:
        """What the target accepted, oldest first: one entry per successful `deliver`."""
        ...

    def identity(self, delivered: Any) -> str:
        """The identifier a receiver de-duplicates on (dedup key, idempotency key, label set)."""
        ...

    def break_target(self) -> None:
        """Make the target fail in a way a later retry can get past (a 503, a stopped broker...)."""
        ...

    def received(self, delivered: Any) -> str:
        """What the target got for `delivered`, as JSON text with every character as received."""
        ...

    def shown(self, received: Any) -> list[str]:
        """The texts of `received` (parsed) that the receiver shows people as they are: titles, summaries,
        labels, messages (not identifiers kept as data)."""
        ...

    def assert_inert(self, received: Any) -> None:
        """Fail if the receiver would render any text of `received` (parsed) as markup it did not mean:
        formatting, a link, a mention, or a second line where one is expected."""
        ...

    def close(self) -> None:
        """Stop the target and release what the harness holds."""
        ...


@dataclass
class HttpHarness:
    """An HTTP sink against a `RecordingReceiver` that validates the sink's native payload."""

    build: Callable[[str], Sink]  # the receiver's base URL → the sink
    identify: Callable[[RecordedRequest], str]
    validate: Validator
    show: Callable[[Any], list[str]]  # see `SinkHarness.shown`
    inert: Callable[[Any], None]  # see `SinkHarness.assert_inert`
    status: int = 200
    body: Any = b""
    receiver: RecordingReceiver = field(init=False)

    def __post_init__(self) -> None:
        self.receiver = RecordingReceiver(status=self.status, body=self.body, validate=self.validate)

    def make_sink(self) -> Sink:
        return self.build(self.receiver.url)

    def delivered(self) -> list[Any]:
        assert self.receiver.rejected == [], [request.error for request in self.receiver.rejected]
        return self.receiver.accepted

    def identity(self, delivered: Any) -> str:
        return self.identify(delivered)

    def break_target(self) -> None:
        self.receiver.fail_next(1_000, 503)

    def received(self, delivered: Any) -> str:
        return bytes(delivered.body).decode()

    def shown(self, received: Any) -> list[str]:
        return self.show(received)

    def assert_inert(self, received: Any) -> None:
        self.inert(received)

    def close(self) -> None:
        self.receiver.stop()


def _alertmanager_shown(alerts: list[dict[str, Any]]) -> list[str]:
    return [text for alert in alerts for part in ("labels", "annotations") for text in alert[part].values()]


def _alertmanager_inert(alerts: list[dict[str, Any]]) -> None:
    # Receivers put labels into subjects, titles and routing keys: one printable line each.
    for alert in alerts:
        for value in alert["labels"].values():
            assert value.isprintable() and len(value) <= 256, value[:300]


def _alertmanager(_: Path) -> HttpHarness:
    return HttpHarness(
        build=lambda url: AlertmanagerSink(url + test_alertmanager.PREFIX, hold_seconds=600.0, timeout=2.0),
        # Alertmanager identifies an alert by its labels.
        identify=lambda request: json.dumps([alert["labels"] for alert in request.json], sort_keys=True),
        validate=test_alertmanager.validate_alerts,
        show=_alertmanager_shown,
        inert=_alertmanager_inert,
    )


def _pagerduty_inert(event: dict[str, Any]) -> None:
    # The summary is read out on phone calls and sent as SMS: plain text, one line.
    payload = event["payload"]
    for text in (payload["summary"], payload["source"]):
        assert text.isprintable(), text[:300]


def _pagerduty(_: Path) -> HttpHarness:
    return HttpHarness(
        build=lambda url: PagerDutySink(
            test_pagerduty.ROUTING_KEY, url=url + test_pagerduty.PATH, timeout=2.0
        ),
        identify=lambda request: str(request.json["dedup_key"]),
        validate=test_pagerduty.validate_event,
        show=lambda event: [event["payload"]["summary"], event["payload"]["source"]],
        inert=_pagerduty_inert,
        status=202,
        body=test_pagerduty.ACCEPTED,
    )


def _slack_identity(request: RecordedRequest) -> str:
    # Slack de-duplicates nothing; the message's context line names the notification for a reader.
    [context] = [block for block in request.json["blocks"] if block["type"] == "context"]
    return str(context["elements"][0]["text"].rsplit(" · ", 1)[-1])


def _slack_texts(message: dict[str, Any]) -> list[dict[str, Any]]:
    """Every text object of a message, the fallback `text` as a mrkdwn one."""
    found: list[dict[str, Any]] = [{"type": "mrkdwn", "text": message["text"], "verbatim": True}]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") in {"mrkdwn", "plain_text"} and isinstance(node.get("text"), str):
                found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(message["blocks"])
    return found


_CODE_SPAN = re.compile(r"`[^`\n]*`")


def _slack_inert(message: dict[str, Any]) -> None:
    for text in _slack_texts(message):
        if text["type"] == "plain_text":
            continue  # never parsed
        # Slack would otherwise link URLs and channel names by itself.
        assert text.get("verbatim") is True, text
        # Outside inline code Slack formats `*bold*`, `_italic_`, `~strike~`: attacker text stays inside.
        outside = _CODE_SPAN.sub("", text["text"])
        assert HOSTILE_MARK not in outside and "attacker" not in outside, outside[:300]
        assert "<" not in outside and "<" not in text["text"], text["text"][:300]


def _slack(_: Path) -> HttpHarness:
    return HttpHarness(
        build=lambda url: SlackSink(url + test_slack.PATH, timeout=2.0),
        identify=_slack_identity,
        validate=test_slack.validate_message,
        show=lambda message: [str(text["text"]) for text in _slack_texts(message)],
        inert=_slack_inert,
        body="ok",
    )


def _webhook(_: Path) -> HttpHarness:
    return HttpHarness(
        build=lambda url: WebhookSink(url + test_webhook.PATH, secret=test_webhook.SECRET, timeout=2.0),
        identify=lambda request: request.headers["idempotency-key"],
        validate=test_webhook.verifier(test_webhook.SECRET),
        # The notification as data: its receiver decides what to show, and how.
        show=lambda _: [],
        inert=lambda _: None,
    )


@dataclass
class GrafanaHarness:
    """The annotation sink against the fake Grafana API. Each delivery first looks up the alert's
    annotation by its tag: those look-ups, answered, are what was delivered."""

    grafana: FakeGrafana = field(default_factory=lambda: FakeGrafana(tokens={test_grafana.TOKEN: "Editor"}))

    def make_sink(self) -> Sink:
        return GrafanaAnnotationSink(self.grafana.url, test_grafana.TOKEN, timeout=2.0)

    def delivered(self) -> list[Any]:
        return [
            request
            for request in self.grafana.requests
            if request.method == "GET" and request.path.endswith("/api/annotations") and request.status == 200
        ]

    def identity(self, delivered: Any) -> str:
        # The alert's own tag (`alert-<id>`, `test-<key>`): one annotation per alert.
        return ",".join(tag for tag in delivered.query["tags"] if tag != "mia-detector")

    def break_target(self) -> None:
        self.grafana.fail_next(1_000, 503)

    def received(self, delivered: Any) -> str:
        # The annotation as Grafana stores it (the HTTP client sends JSON with \u escapes).
        [annotation] = self.grafana.annotations.values()
        return json.dumps(annotation, ensure_ascii=False)

    def shown(self, received: Any) -> list[str]:
        return [received["text"], *received["tags"]]

    def assert_inert(self, received: Any) -> None:
        # Grafana renders the text as (sanitised) HTML: the markup is ours, the only link the dashboard's.
        text = received["text"]
        ours = re.sub(r'</?b>|<br>|<a href="https://grafana\.example/[^"<>]*">|</a>', "", text)
        assert "<" not in ours and ">" not in ours, ours[:300]
        assert all(tag.isprintable() and len(tag) <= 100 for tag in received["tags"]), received["tags"]

    def close(self) -> None:
        self.grafana.stop()


@dataclass
class OcsfFileHarness:
    """The OCSF file sink writing into the test's directory. A redelivered notification is not written
    twice: what was delivered is the distinct findings' notifications, in the order delivered."""

    directory: Path

    @property
    def path(self) -> Path:
        return self.directory / "findings" / "findings.jsonl"

    def make_sink(self) -> Sink:
        return OcsfFileSink(self.path)

    def delivered(self) -> list[Any]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines()]

    def identity(self, delivered: Any) -> str:
        return str(delivered["finding_info"]["uid"])

    def break_target(self) -> None:
        # A file where the directory must be: unwritable until an operator moves it away.
        self.directory.joinpath("findings").write_text("not a directory")

    def received(self, delivered: Any) -> str:
        [line] = [
            line for line in self.path.read_text().split("\n") if json.loads(line or "null") == delivered
        ]
        return line

    def shown(self, received: Any) -> list[str]:
        info = received["finding_info"]
        return [info["title"], info["desc"], received["message"]]

    def assert_inert(self, received: Any) -> None:
        # SIEM consoles show titles and messages on one line.
        for text in (received["finding_info"]["title"], received["message"]):
            assert text.isprintable(), text[:300]

    def close(self) -> None:
        pass


# Sink name → a factory given the test's temporary directory.
HTTP_HARNESSES: dict[str, Callable[[Path], HttpHarness]] = {
    "alertmanager": _alertmanager,
    "pagerduty": _pagerduty,
    "slack": _slack,
    "webhook": _webhook,
}
HARNESSES: dict[str, Callable[[Path], SinkHarness]] = {
    **HTTP_HARNESSES,
    "grafana": lambda _: GrafanaHarness(),
    "ocsf-file": OcsfFileHarness,
}


@pytest.fixture(params=sorted(HARNESSES))
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SinkHarness]:
    built = HARNESSES[request.param](tmp_path)
    yield built
    built.close()


@pytest.fixture(params=sorted(HTTP_HARNESSES))
def http_harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HttpHarness]:
    built = HTTP_HARNESSES[request.param](tmp_path)
    yield built
    built.close()


@pytest.fixture
def sink(harness: SinkHarness) -> Iterator[Sink]:
    made = harness.make_sink()
    yield made
    made.close()


@pytest.fixture
def http_sink(http_harness: HttpHarness) -> Iterator[Sink]:
    made = http_harness.make_sink()
    yield made
    made.close()


def notification_of(event: NotificationEvent, **overrides: Any) -> Notification:
    """A realistic notification of `event` (an escalation from medium to high)."""
    if event is NotificationEvent.ESCALATED:
        overrides = {"severity": Severity.HIGH, "previous_severity": Severity.MEDIUM, **overrides}
    return make_notification(event, **overrides)


def assert_hides_the_url(error: DeliveryError) -> None:
    assert URL_SECRET not in str(error) and "127.0.0.1" not in str(error), str(error)


# What the callers of a prediction API can put in a client id, a model name, an event id (and so in what is
# derived from them): rich and Slack markup, Slack mentions, HTML, a terminal escape sequence and hyperlink,
# a carriage return and a newline forging a line, a bidirectional override, C1 and Unicode line breaks, and
# 10 kB. The mark at its start is how a responder recognises it.
HOSTILE_MARK = "sybil-7"
HOSTILE = (
    f"{HOSTILE_MARK} [link=https://attacker.example]click[/link] [/] <!channel> <@U024BE7LH> *bold* _it_ ~x~"
    " `tick` :skull: <b>html</b><script>alert(1)</script> &amp; \x1b[2J\x1b]8;;https://attacker.example\x07"
    "link\x1b]8;;\x07 \r\nFORGED line \u202egnp.exe \x85\u2028\u2066 " + "A" * 10_000
)
# Our own texts break lines only with a newline (Alertmanager's description, Slack's fields).
_OUR_LINE_BREAKS = {"\n"}


def hostile_notification() -> Notification:
    """An opened alert whose client id, model, reason feature and evidence are all `HOSTILE`."""
    notification = make_notification(client_ids=(HOSTILE,))
    alert = notification.alert.model_copy(
        update={
            "model": HOSTILE,
            "reasons": [Reason(feature=HOSTILE, value=1.0, baseline_percentile=99.0)],
            "evidence": [HOSTILE],
        }
    )
    return notification.model_copy(update={"alert": alert})


def hidden(text: str) -> set[str]:
    """The control, format and line-separator characters in `text`."""
    return {char for char in text if unicodedata.category(char) in {"Cc", "Cf", "Cs", "Zl", "Zp"}}


def strings(value: Any) -> Iterator[str]:
    """Every string in a parsed JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


# --- Every sink ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("event", list(NotificationEvent))
def test_delivers_every_event(harness: SinkHarness, sink: Sink, event: NotificationEvent) -> None:
    sink.deliver(notification_of(event))
    assert len(harness.delivered()) == 1


def test_a_broken_target_is_a_transient_failure(harness: SinkHarness, sink: Sink) -> None:
    harness.break_target()
    with pytest.raises(DeliveryError) as raised:
        sink.deliver(notification_of(NotificationEvent.OPENED))
    assert not raised.value.permanent
    assert_hides_the_url(raised.value)
    assert harness.delivered() == []


@pytest.mark.parametrize("event", list(NotificationEvent))
def test_redelivery_keeps_the_identifier(harness: SinkHarness, sink: Sink, event: NotificationEvent) -> None:
    notification = notification_of(event)
    sink.deliver(notification)
    sink.deliver(notification)
    sink.deliver(notification_of(event, alert_id=8, client_ids=("client-18",)))
    identities = [harness.identity(delivered) for delivered in harness.delivered()]
    if len(identities) == 2:  # the target itself dropped the retry (the OCSF file sink does)
        identities.insert(1, identities[0])
    first, retry, other = identities
    assert first == retry
    assert other != first


def test_hostile_names_arrive_inert_bounded_and_recognisable(harness: SinkHarness, sink: Sink) -> None:
    sink.deliver(hostile_notification())
    [delivered] = harness.delivered()
    text = harness.received(delivered)
    # No raw control character on the wire or in the file: nothing for a log of it to break a line on or a
    # terminal to act on. JSON escapes stand for them where a value is kept as data.
    assert hidden(text) == set(), hidden(text)
    assert len(text) <= 64 * 1024, len(text)
    received = json.loads(text)
    assert max(map(len, strings(received))) <= 4096
    assert HOSTILE_MARK in text
    shown = harness.shown(received)
    for line in shown:
        assert hidden(line) <= _OUR_LINE_BREAKS, hidden(line)
        assert not any(part.startswith("FORGED") for part in line.split("\n")), line[:300]
    if shown:  # the responder recognises the client in what they are shown
        assert any(HOSTILE_MARK in line for line in shown), shown
    harness.assert_inert(received)


def test_close_is_safe_twice(harness: SinkHarness) -> None:
    sink = harness.make_sink()
    sink.deliver(notification_of(NotificationEvent.OPENED))
    sink.close()
    sink.close()


def test_names_are_those_the_dispatcher_knows(harness: SinkHarness, sink: Sink) -> None:
    from detector.alerts.sinks import SINK_NAMES

    assert sink.name in SINK_NAMES


# --- Every HTTP sink -------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
def test_server_errors_are_transient(http_harness: HttpHarness, http_sink: Sink, status: int) -> None:
    http_harness.receiver.fail_next(1, status)
    with pytest.raises(DeliveryError) as raised:
        http_sink.deliver(notification_of(NotificationEvent.OPENED))
    assert not raised.value.permanent and raised.value.retry_after is None
    assert_hides_the_url(raised.value)
    http_sink.deliver(notification_of(NotificationEvent.OPENED))
    assert len(http_harness.delivered()) == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 413, 422])
def test_client_errors_are_permanent(http_harness: HttpHarness, http_sink: Sink, status: int) -> None:
    http_harness.receiver.fail_next(1, status)
    with pytest.raises(DeliveryError) as raised:
        http_sink.deliver(notification_of(NotificationEvent.OPENED))
    assert raised.value.permanent
    assert f"HTTP {status}" in str(raised.value) and http_sink.name in str(raised.value)
    assert_hides_the_url(raised.value)


def test_rate_limiting_carries_retry_after(http_harness: HttpHarness, http_sink: Sink) -> None:
    http_harness.receiver.fail_next(1, 429, headers={"Retry-After": "7"})
    with pytest.raises(DeliveryError) as raised:
        http_sink.deliver(notification_of(NotificationEvent.OPENED))
    assert not raised.value.permanent and raised.value.retry_after == 7.0


def test_a_receiver_that_is_down_is_retried_until_it_is_back(
    http_harness: HttpHarness, http_sink: Sink
) -> None:
    notification = notification_of(NotificationEvent.OPENED)
    receiver = http_harness.receiver
    receiver.stop()
    for _ in range(2):
        with pytest.raises(DeliveryError) as raised:
            http_sink.deliver(notification)
        assert not raised.value.permanent
        assert_hides_the_url(raised.value)
    receiver.start()
    http_sink.deliver(notification)
    [delivered] = http_harness.delivered()
    assert receiver.requests == [delivered]  # nothing arrived while it was down
