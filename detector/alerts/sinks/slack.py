"""Slack: notifications as Block Kit messages posted to an incoming webhook.

Client ids and model names come from the prediction API's callers, so every piece of text Slack parses
(mrkdwn and the `text` fallback) has `&`, `<` and `>` escaped: a client named `<!channel>` shows up as
that text instead of pinging the channel, and a client id cannot smuggle in a link.
"""

from __future__ import annotations

from typing import Any

import httpx

from detector.alerts.notification import PRODUCT, Notification, NotificationEvent
from detector.alerts.sinks.base import describe_reason, post_json, readable_time

# Block Kit limits (https://api.slack.com/reference/block-kit/blocks).
MAX_HEADER_CHARS = 150
MAX_FIELD_CHARS = 2000
MAX_SECTION_CHARS = 3000
MAX_URL_CHARS = 3000
# Client ids listed in a message; the rest are counted.
MAX_CLIENTS = 10
REASONS = 3


def escape(text: str) -> str:
    """`text` with the three characters Slack's markup uses escaped as Slack requires."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _escaped(text: str, limit: int) -> str:
    """`text` escaped, and cut (with `…`) so that the escaped form fits `limit`; never inside an entity."""
    escaped = escape(text)
    if len(escaped) <= limit:
        return escaped
    pieces: list[str] = []
    size = 0
    for char in text:
        piece = escape(char)
        if size + len(piece) > limit - 1:
            break
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces) + "…"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def headline(notification: Notification) -> str:
    """What happened, in one unescaped line: `Resolved: [HIGH] training set targeting on m by client-17`."""
    alert = notification.alert
    clients = alert.client_id if len(alert.client_ids) == 1 else f"{len(alert.client_ids)} clients"
    what = f"{alert.kind.value.replace('_', ' ')} on {alert.model} by {clients}"
    severity = alert.severity.value.upper()
    previous = notification.previous_severity
    match notification.event:
        case NotificationEvent.ESCALATED if previous is not None:
            return f"Escalated {previous.value.upper()} → {severity}: {what}"
        case NotificationEvent.ESCALATED:
            return f"Escalated to {severity}: {what}"
        case NotificationEvent.UPDATED:
            return f"Updated: [{severity}] {what}"
        case NotificationEvent.ACKNOWLEDGED:
            return f"Acknowledged: [{severity}] {what}"
        case NotificationEvent.RESOLVED:
            return f"Resolved: [{severity}] {what}"
        case NotificationEvent.TEST:
            return f"Test notification from {PRODUCT}, not an attack: {what}"
        case _:
            return f"[{severity}] {what}"


class SlackSink:
    """Posts notifications to a Slack incoming webhook (whose URL is a secret: it never appears in errors)."""

    name = "slack"

    def __init__(self, webhook_url: str, *, timeout: float = 10.0) -> None:
        self._url = webhook_url
        self._client = httpx.Client(timeout=timeout)

    def deliver(self, notification: Notification) -> None:
        """Post the message for `notification`; raise `DeliveryError` unless Slack accepted it."""
        post_json(self._client, self._url, self.message(notification), sink=self.name)

    def message(self, notification: Notification) -> dict[str, Any]:
        """The webhook body for `notification`: Block Kit `blocks` and the plain `text` fallback."""
        alert = notification.alert
        title = headline(notification)
        severity = alert.severity.value
        if notification.previous_severity is not None:
            severity = f"{notification.previous_severity.value} → {severity}"
        clients = ", ".join(alert.client_ids[:MAX_CLIENTS])
        if len(alert.client_ids) > MAX_CLIENTS:
            clients += f" and {len(alert.client_ids) - MAX_CLIENTS} more"
        fields = [
            ("Model", alert.model),
            ("Clients", clients),
            ("Kind", alert.kind.value.replace("_", " ")),
            ("Severity", severity),
            ("Rule", f"{alert.rule_id} ({alert.atlas_technique})"),
            ("Score", f"{alert.score:.3g} (threshold {alert.threshold:.3g})"),
            ("Queries", str(alert.queries)),
            ("First seen", readable_time(alert.first_seen)),
            ("Last seen", readable_time(alert.last_seen)),
        ]
        blocks: list[dict[str, Any]] = [
            # plain_text is never parsed for links or mentions, so the title needs no escaping here.
            {"type": "header", "text": {"type": "plain_text", "text": _cut(title, MAX_HEADER_CHARS)}},
            {"type": "section", "fields": [_field(label, value) for label, value in fields]},
        ]
        reasons = [f"• {describe_reason(reason)}" for reason in notification.top_reasons(REASONS)]
        if reasons:
            blocks.append(_section("Top reasons", "\n".join(reasons)))
        if alert.triage:
            blocks.append(_section("Triage", alert.triage))
        url = notification.dashboard_url
        if url and len(url) <= MAX_URL_CHARS:
            button = {
                "type": "button",
                "action_id": "investigate",
                "text": {"type": "plain_text", "text": "Investigate"},
                "url": url,
            }
            blocks.append({"type": "actions", "elements": [button]})
        event, key = notification.event.value, notification.idempotency_key
        context = escape(f"{PRODUCT} · alert {alert.id} · {event} · {key}")
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": context}]})
        return {"text": _escaped(title, MAX_SECTION_CHARS), "blocks": blocks}

    def close(self) -> None:
        """Close the connection pool; safe to call more than once."""
        self._client.close()


def _field(label: str, value: str) -> dict[str, str]:
    prefix = f"*{label}*\n"
    return {"type": "mrkdwn", "text": prefix + _escaped(value, MAX_FIELD_CHARS - len(prefix))}


def _section(label: str, value: str) -> dict[str, Any]:
    prefix = f"*{label}*\n"
    text = prefix + _escaped(value, MAX_SECTION_CHARS - len(prefix))
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}
