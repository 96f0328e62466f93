"""Slack: notifications as Block Kit messages posted to an incoming webhook.

Model names, client ids and reason features come from the prediction API's callers. In every text Slack
parses (mrkdwn and the `text` fallback):

- `&`, `<` and `>` are escaped as Slack requires: a client named `<!channel>` shows up as that text instead
  of pinging the channel, and a client id cannot smuggle in a link;
- those names are shown as inline code, where Slack applies no formatting (`*bold*`, `_italic_`,
  `~strike~`, `:emoji:`), with backticks and control characters shown as escapes (`\\x60`, `\\n`): a name
  can neither close its code span nor break the line;
- mrkdwn text objects are `verbatim`: Slack does not turn URLs or channel names in them into links, nor
  parse mentions by itself.

The header is plain text, which Slack never parses; names show there as `display_name` shows them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from detector.alerts.sinks.base import post_json
from detector.domain import PRODUCT, Notification, NotificationEvent, display_name, rfc3339
from detector.text import ELLIPSIS, shorten

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


def code(name: str) -> str:
    """`name` (a model, client id or feature) as mrkdwn inline code: `display_name(name)` with each backtick
    shown as `\\x60` and `&`, `<`, `>` escaped, between backticks."""
    return "`" + escape(display_name(name).replace("`", "\\x60")) + "`"


def _fit(text: str, limit: int) -> str:
    """mrkdwn `text`, cut (with `…`) to at most `limit` characters when longer: never inside an entity, and
    a code span the cut falls into is closed."""
    if len(text) <= limit:
        return text
    kept = text[: limit - 2]  # room for a closing backtick and the ellipsis
    entity = kept.rfind("&")
    if entity > kept.rfind(";"):
        kept = kept[:entity]
    if kept.count("`") % 2:
        kept = kept[:-1] if kept.endswith("`") else kept + "`"
    return kept + ELLIPSIS


def headline(notification: Notification, name: Callable[[str], str] = display_name) -> str:
    """What happened, in one line: `Resolved: [HIGH] training set targeting on m by client-17`, the model and
    client shown by `name`. The rest holds none of `&<>*_~` nor backticks."""
    alert = notification.alert
    clients = name(alert.client_id) if len(alert.client_ids) == 1 else f"{len(alert.client_ids)} clients"
    what = f"{alert.kind.value.replace('_', ' ')} on {name(alert.model)} by {clients}"
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
        case NotificationEvent.CANARY_MISSED:
            return f"Detection canary missed, detection may be blind (not an attack): {what}"
        case NotificationEvent.CANARY_RECOVERED:
            return f"Detection canaries pass again, detection works (not an attack): {what}"
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
        """The webhook body for `notification`: Block Kit `blocks` and the `text` fallback."""
        alert = notification.alert
        severity = alert.severity.value
        if notification.previous_severity is not None:
            severity = f"{notification.previous_severity.value} → {severity}"
        clients = ", ".join(map(code, alert.client_ids[:MAX_CLIENTS]))
        if len(alert.client_ids) > MAX_CLIENTS:
            clients += f" and {len(alert.client_ids) - MAX_CLIENTS} more"
        fields = [
            ("Model", code(alert.model)),
            ("Clients", clients),
            ("Kind", escape(alert.kind.value.replace("_", " "))),
            ("Severity", escape(severity)),
            ("Rule", escape(f"{alert.rule_id} ({alert.atlas_technique})")),
            ("Score", escape(f"{alert.score:.3g} (threshold {alert.threshold:.3g})")),
            ("Queries", str(alert.queries)),
            ("First seen", rfc3339(alert.first_seen.timestamp())),
            ("Last seen", rfc3339(alert.last_seen.timestamp())),
            (
                "Detected",
                f"{rfc3339(alert.detected_at.timestamp())} after {alert.detected_after_queries} queries",
            ),
        ]
        title = shorten(headline(notification), MAX_HEADER_CHARS)
        blocks: list[dict[str, Any]] = [
            {"type": "header", "text": {"type": "plain_text", "text": title}},
            {"type": "section", "fields": [_field(label, value) for label, value in fields]},
        ]
        reasons = [f"• {reason.describe(code)}" for reason in notification.top_reasons(REASONS)]
        if reasons:
            blocks.append(_section("Top reasons", "\n".join(reasons)))
        if alert.exposure is not None:
            blocks.append(_section("Exposure", escape(alert.exposure.summary())))
        if alert.triage:
            blocks.append(_section("Triage", escape(alert.triage)))
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
        blocks.append({"type": "context", "elements": [_mrkdwn(context, MAX_SECTION_CHARS)]})
        return {"text": _fit(headline(notification, code), MAX_SECTION_CHARS), "blocks": blocks}

    def close(self) -> None:
        """Close the connection pool; safe to call more than once."""
        self._client.close()


def _mrkdwn(text: str, limit: int) -> dict[str, Any]:
    """A mrkdwn text object of `text` (mrkdwn already) fitted to `limit`, which Slack parses for nothing
    but the markup it holds."""
    return {"type": "mrkdwn", "text": _fit(text, limit), "verbatim": True}


def _field(label: str, value: str) -> dict[str, Any]:
    return _mrkdwn(f"*{label}*\n{value}", MAX_FIELD_CHARS)


def _section(label: str, value: str) -> dict[str, Any]:
    return {"type": "section", "text": _mrkdwn(f"*{label}*\n{value}", MAX_SECTION_CHARS)}
