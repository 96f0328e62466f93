"""The Slack sink against a receiver that checks Block Kit structure, Slack's limits and escaping."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from detector.alerts.sinks.base import DeliveryError
from detector.alerts.sinks.slack import SlackSink
from detector.domain import Notification, NotificationEvent, Reason, Severity
from tests.receivers import RecordedRequest, RecordingReceiver
from tests.support import canary_miss_and_recovery, make_notification

# Incoming-webhook URLs are secrets: the token is in the path.
PATH = "/services/T000/B000/s3cr3t"

# What is left of mrkdwn text once Slack's three entities are taken out must hold no &, < or >.
_ENTITIES = re.compile(r"&(amp|lt|gt);")


def unescaped(text: str) -> bool:
    """Whether `text` has a raw `&`, `<` or `>`, which Slack would parse as a link, mention or entity."""
    return any(char in _ENTITIES.sub("", text) for char in "&<>")


def _text_object(obj: Any, *, kinds: set[str], limit: int) -> str:
    assert isinstance(obj, dict) and obj.get("type") in kinds, obj
    text = obj["text"]
    assert isinstance(text, str) and 0 < len(text) <= limit, f"text of {len(text)} chars"
    if obj["type"] == "mrkdwn":
        assert not unescaped(text), f"unescaped markup in {text!r}"
    return text


def validate_message(request: RecordedRequest) -> str | None:
    """Reject what Slack's incoming webhooks would (invalid_blocks), and any unescaped mrkdwn."""
    assert request.method == "POST" and request.path == PATH, (request.method, request.path)
    assert request.headers["content-type"] == "application/json"
    message = request.json
    assert isinstance(message, dict) and set(message) <= {"text", "blocks"}, "unexpected keys"
    text = message["text"]
    assert isinstance(text, str) and 0 < len(text) <= 4000 and not unescaped(text), f"text {text!r}"
    blocks = message["blocks"]
    assert isinstance(blocks, list) and 0 < len(blocks) <= 50, "1 to 50 blocks"
    for block in blocks:
        kind = block.get("type")
        if kind == "header":
            assert set(block) == {"type", "text"}
            _text_object(block["text"], kinds={"plain_text"}, limit=150)
        elif kind == "section":
            assert set(block) <= {"type", "text", "fields"} and ("text" in block or "fields" in block)
            if "text" in block:
                _text_object(block["text"], kinds={"mrkdwn", "plain_text"}, limit=3000)
            fields = block.get("fields", [])
            assert len(fields) <= 10, f"{len(fields)} fields"
            for field in fields:
                _text_object(field, kinds={"mrkdwn", "plain_text"}, limit=2000)
        elif kind == "actions":
            elements = block["elements"]
            assert 0 < len(elements) <= 25
            for element in elements:
                assert element["type"] == "button" and set(element) <= {"type", "text", "url", "action_id"}
                _text_object(element["text"], kinds={"plain_text"}, limit=75)
                url = element["url"]
                assert url.startswith(("http://", "https://")) and len(url) <= 3000
                assert len(element.get("action_id", "")) <= 255
        elif kind == "context":
            elements = block["elements"]
            assert 0 < len(elements) <= 10
            for element in elements:
                _text_object(element, kinds={"mrkdwn", "plain_text"}, limit=3000)
        else:
            raise AssertionError(f"unexpected block type {kind!r}")
    return None


@pytest.fixture
def receiver() -> Iterator[RecordingReceiver]:
    with RecordingReceiver(body="ok", validate=validate_message) as running:
        yield running


@pytest.fixture
def sink(receiver: RecordingReceiver) -> Iterator[SlackSink]:
    slack = SlackSink(receiver.url + PATH, timeout=2.0)
    yield slack
    slack.close()


def posted(sink: SlackSink, receiver: RecordingReceiver, notification: Notification) -> dict[str, Any]:
    """Deliver `notification`; return the message the receiver accepted."""
    sink.deliver(notification)
    assert receiver.rejected == []
    message: dict[str, Any] = receiver.accepted[-1].json
    return message


def header(message: dict[str, Any]) -> str:
    [block] = [block for block in message["blocks"] if block["type"] == "header"]
    text: str = block["text"]["text"]
    return text


def fields(message: dict[str, Any]) -> dict[str, str]:
    """The field blocks as {label: value}."""
    texts = [field["text"] for block in message["blocks"] for field in block.get("fields", [])]
    return dict(text.removeprefix("*").split("*\n", 1) for text in texts)


def sections(message: dict[str, Any]) -> list[str]:
    return [
        block["text"]["text"] for block in message["blocks"] if "text" in block and block["type"] == "section"
    ]


@pytest.mark.parametrize(
    ("notification", "expected"),
    [
        (make_notification(), "[HIGH] training set targeting on credit-risk by client-17"),
        (make_notification(NotificationEvent.UPDATED), "Updated: [HIGH] training set targeting"),
        (
            make_notification(
                NotificationEvent.ESCALATED, severity=Severity.CRITICAL, previous_severity=Severity.MEDIUM
            ),
            "Escalated MEDIUM → CRITICAL: training set targeting",
        ),
        (make_notification(NotificationEvent.ACKNOWLEDGED), "Acknowledged: [HIGH]"),
        (make_notification(NotificationEvent.RESOLVED), "Resolved: [HIGH] training set targeting"),
        (make_notification(NotificationEvent.TEST), "Test notification from mia-detector, not an attack"),
        (
            make_notification(client_ids=("a", "b", "c")),
            "[HIGH] training set targeting on credit-risk by 3 c",
        ),
        (
            canary_miss_and_recovery()[0],
            "Detection canary missed, detection may be blind (not an attack): augmentation probing on "
            "mia-canary by mia-canary-",
        ),
        (
            canary_miss_and_recovery()[1],
            "Detection canaries pass again, detection works (not an attack): augmentation probing on "
            "mia-canary by mia-canary-",
        ),
    ],
    ids=[
        "opened",
        "updated",
        "escalated",
        "acknowledged",
        "resolved",
        "test",
        "group",
        "canary_missed",
        "canary_recovered",
    ],
)
def test_the_header_says_what_happened(
    sink: SlackSink, receiver: RecordingReceiver, notification: Notification, expected: str
) -> None:
    message = posted(sink, receiver, notification)
    assert header(message).startswith(expected)
    # The fallback shows the model and client as inline code.
    assert message["text"].replace("`", "").startswith(expected)


def test_the_message_carries_the_facts_reasons_triage_and_a_link(
    sink: SlackSink, receiver: RecordingReceiver
) -> None:
    notification = make_notification(
        NotificationEvent.ESCALATED, severity=Severity.HIGH, previous_severity=Severity.MEDIUM
    )
    many_reasons = [Reason(feature=f"feature_{i}", value=i, baseline_percentile=90.0) for i in range(6)]
    alert = notification.alert.model_copy(update={"reasons": many_reasons})
    message = posted(sink, receiver, notification.model_copy(update={"alert": alert}))
    shown = fields(message)
    assert shown["Model"] == "`credit-risk`"
    assert shown["Clients"] == "`client-17`"
    assert shown["Kind"] == "training set targeting"
    assert shown["Severity"] == "medium → high"
    assert shown["Rule"] == "MIA-003 (AML.T0024)"
    assert shown["Score"] == "0.42 (threshold 0.1)"
    assert shown["Queries"] == "136"
    assert shown["First seen"].endswith("Z") and shown["Last seen"] >= shown["First seen"]
    [reasons, exposure, triage] = sections(message)
    assert exposure == (
        "*Exposure*\n57 training records with probabilities (120 records), 16 label-only answers, 0 probes"
    )
    assert reasons.splitlines() == [
        "*Top reasons*",
        "• `feature_0` = 0 (p90 of baseline)",
        "• `feature_1` = 1 (p90 of baseline)",
        "• `feature_2` = 2 (p90 of baseline)",
    ]
    assert triage == "*Triage*\nclient queried 57 distinct training records"
    [actions] = [block for block in message["blocks"] if block["type"] == "actions"]
    assert actions["elements"][0]["text"]["text"] == "Investigate"
    assert actions["elements"][0]["url"] == notification.dashboard_url


def test_without_a_dashboard_there_is_no_button(sink: SlackSink, receiver: RecordingReceiver) -> None:
    message = posted(sink, receiver, make_notification(dashboard_url=None))
    assert all(block["type"] != "actions" for block in message["blocks"])


def test_attacker_chosen_names_cannot_mention_or_link(sink: SlackSink, receiver: RecordingReceiver) -> None:
    hostile = ("<!channel>", "<https://evil.example|reset your password>", "a&b <@U024BE7LH>")
    notification = make_notification(client_ids=hostile)
    alert = notification.alert.model_copy(update={"model": "<!here> model", "triage": "see <http://x|y>"})
    message = posted(sink, receiver, notification.model_copy(update={"alert": alert}))
    # The validator found no raw markup; the names are still there, escaped.
    shown = fields(message)
    assert shown["Model"] == "`&lt;!here&gt; model`"
    assert "`&lt;!channel&gt;`" in shown["Clients"]
    assert "`a&amp;b &lt;@U024BE7LH&gt;`" in shown["Clients"]
    assert "`&lt;!here&gt; model`" in message["text"]
    assert sections(message)[-1] == "*Triage*\nsee &lt;http://x|y&gt;"


def test_attacker_chosen_names_cannot_format_or_break_lines(
    sink: SlackSink, receiver: RecordingReceiver
) -> None:
    name = "*bold* _it_ ~s~ `tick` :skull: https://evil.example #general\nFORGED"
    notification = make_notification(client_ids=(name,))
    alert = notification.alert.model_copy(update={"model": name})
    message = posted(sink, receiver, notification.model_copy(update={"alert": alert}))
    # Inline code, where Slack formats nothing; backticks and the newline shown as escapes.
    shown = "`*bold* _it_ ~s~ \\x60tick\\x60 :skull: https://evil.example #general\\nFORGED`"
    assert fields(message)["Model"] == shown and fields(message)["Clients"] == shown
    assert f"on {shown} by {shown}" in message["text"]
    assert header(message).startswith("[HIGH] training set targeting on *bold* _it_ ~s~ `tick`")
    # Slack links neither the URL nor the channel name by itself.
    mrkdwn = [field for block in message["blocks"] for field in block.get("fields", [])]
    assert mrkdwn and all(field["verbatim"] is True for field in mrkdwn)


def test_a_cut_never_leaves_inline_code_open() -> None:
    from detector.alerts.sinks.slack import MAX_FIELD_CHARS

    clients = tuple(f"client-{i:02d}-" + "&" * 250 for i in range(10))
    message = SlackSink("http://127.0.0.1:9/unused").message(make_notification(client_ids=clients))
    value = fields(message)["Clients"]
    assert value.endswith("`…") and value.count("`") % 2 == 0
    assert len("*Clients*\n" + value) <= MAX_FIELD_CHARS
    assert not unescaped(value)


def test_huge_groups_and_texts_fit_slacks_limits(sink: SlackSink, receiver: RecordingReceiver) -> None:
    clients = tuple(f"client-{i:05d}-{'<&>' * 300}" for i in range(500))
    notification = make_notification(client_ids=clients)
    alert = notification.alert.model_copy(update={"triage": "<&>" * 5000, "model": "m&" * 2000})
    message = posted(sink, receiver, notification.model_copy(update={"alert": alert}))
    shown = fields(message)
    assert shown["Clients"].endswith("…")
    assert len(header(message)) == 150
    assert sections(message)[-1].endswith("…")

    few = posted(sink, receiver, make_notification(client_ids=tuple(f"c{i:02d}" for i in range(25))))
    assert fields(few)["Clients"] == ", ".join(f"`c{i:02d}`" for i in range(10)) + " and 15 more"


@pytest.mark.parametrize(
    ("status", "body"),
    [(400, "invalid_blocks"), (403, "action_prohibited"), (404, "no_service"), (410, "channel_is_archived")],
)
def test_slack_refusals_are_permanent(
    sink: SlackSink, receiver: RecordingReceiver, status: int, body: str
) -> None:
    receiver.respond(status, body)
    with pytest.raises(DeliveryError) as raised:
        sink.deliver(make_notification())
    assert raised.value.permanent
    assert body in str(raised.value) and "s3cr3t" not in str(raised.value)


def test_rate_limiting_is_honoured(sink: SlackSink, receiver: RecordingReceiver) -> None:
    receiver.fail_next(1, 429, headers={"Retry-After": "30"})
    with pytest.raises(DeliveryError) as raised:
        sink.deliver(make_notification())
    assert not raised.value.permanent and raised.value.retry_after == 30.0
    sink.deliver(make_notification())
    assert len(receiver.accepted) == 1
