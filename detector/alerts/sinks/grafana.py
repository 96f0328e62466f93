"""Grafana annotations: each alert is one annotation, a region from when it was raised to when it resolved.

The annotation is an organization annotation (tied to no dashboard) tagged `mia-detector`, the alert's kind,
severity and model, and `alert-<id>`. A dashboard shows them with an annotation query on the built-in
"-- Grafana --" data source, filtered by the tag `mia-detector`.

Nothing is stored locally: every delivery first looks the alert's annotation up by its tags
(`GET /api/annotations?tags=mia-detector&tags=alert-<id>`), then

- creates it when there is none: a point at `raised_at`, or at once a region up to `resolved_at` when the
  first notification that gets through is the resolution;
- otherwise changes what differs (`PATCH /api/annotations/:id`): the text and tags follow the alert's
  latest state (an escalation changes the severity tag), and the resolution sets `timeEnd`.

So a retried delivery (the first attempt reached Grafana but its answer was lost) finds the annotation the
first attempt made instead of adding a second one. A test notification is annotated the same way under the
tags `mia-detector`, `test` and `test-<idempotency key>`.

A canary's notifications carry no stored alert (their alert id is 0): each miss is annotated under
`canary-<client>`, its canary's client, in place of `alert-<id>`, and `canary_recovered`, which carries the
client of the last miss, closes that one's region as a resolution does.

The text is HTML, which Grafana sanitises and shows in the annotation's tooltip; every value from the
prediction API's callers (model, client ids) is shown as `display_name` shows it (one line, control
characters as escapes, at most 256 characters) and HTML-escaped, so it can neither add markup nor a link.
The token needs the Editor role (or the `annotations:read` and `annotations:write` permissions) in the
organization.
"""

from __future__ import annotations

import html
from datetime import timedelta
from urllib.parse import parse_qs, urlencode, urlsplit

from detector.alerts.sinks.base import DeliveryError, epoch_ms
from detector.domain import PRODUCT, Notification, NotificationEvent, display_name, rfc3339
from detector.grafana import GrafanaClient, GrafanaError

TAG = PRODUCT  # on every annotation of ours: what dashboards filter on
# Grafana keeps a tag (or each side of a `key:value` tag) in 100 characters.
MAX_TAG_CHARS = 100
MAX_CLIENTS = 10
REASONS = 3
# The dashboard link opens on the alert's time range with this much margin either side.
LINK_MARGIN = timedelta(minutes=15)


def identity_tag(notification: Notification) -> str:
    """The tag that finds the annotation of `notification`'s alert again: `alert-<id>`; `test-<key>` for a
    test notification and `canary-<client>` for a canary's, whose alert id (0) means nothing."""
    if notification.event is NotificationEvent.TEST:
        return f"test-{notification.idempotency_key}"[:MAX_TAG_CHARS]
    if notification.event.is_canary:
        return f"canary-{display_name(notification.alert.client_id)}"[:MAX_TAG_CHARS]
    return f"alert-{notification.alert.id}"


def annotation_tags(notification: Notification) -> list[str]:
    """`mia-detector`, kind, severity, model and the identity tag (`mia-detector`, `test` and the identity
    tag for a test notification)."""
    alert = notification.alert
    if notification.event is NotificationEvent.TEST:
        return [TAG, "test", identity_tag(notification)]
    tags = [
        TAG,
        alert.kind.value,
        alert.severity.value,
        display_name(alert.model)[:MAX_TAG_CHARS],
        identity_tag(notification),
    ]
    return list(dict.fromkeys(tags))  # a model named like a severity must not repeat a tag


def annotation_text(notification: Notification) -> str:
    """The annotation's HTML: headline, state, score, clients, top reasons and a link to investigate."""
    alert = notification.alert
    escape = html.escape
    lines = [f"<b>{escape(notification.title)}</b>"]
    state = alert.status.value
    if notification.previous_severity is not None and notification.previous_severity != alert.severity:
        state += f", escalated from {notification.previous_severity.value}"
    if alert.resolved_at is not None:
        state += f" at {rfc3339(alert.resolved_at.timestamp())}"
    lines.append(f"Status: {escape(state)}")
    lines.append(
        escape(
            f"Rule {alert.rule_id} ({alert.atlas_technique}) scored {alert.score:.3g} "
            f"(threshold {alert.threshold:.3g}) over {alert.queries} queries; detected at "
            f"{rfc3339(alert.detected_at.timestamp())} after {alert.detected_after_queries} queries"
        )
    )
    clients = ", ".join(map(display_name, alert.client_ids[:MAX_CLIENTS]))
    if len(alert.client_ids) > MAX_CLIENTS:
        clients += f" and {len(alert.client_ids) - MAX_CLIENTS} more"
    lines.append(f"Clients: {escape(clients)}")
    if alert.exposure is not None:
        lines.append(f"Exposure: {escape(alert.exposure.summary())}")
    lines.extend(f"• {escape(reason.text)}" for reason in notification.top_reasons(REASONS))
    link = dashboard_link(notification)
    if link is not None:
        lines.append(f'<a href="{escape(link, quote=True)}">Investigate</a>')
    return "<br>\n".join(lines)


def dashboard_link(notification: Notification) -> str | None:
    """The notification's dashboard URL, opening on the alert's time range unless it names one; None
    without a URL or for one that is not http(s)."""
    url = notification.dashboard_url
    parts = urlsplit(url or "")
    if not url or parts.scheme not in ("http", "https"):
        return None
    if "from" in parse_qs(parts.query):
        return url
    alert = notification.alert
    start = epoch_ms(alert.first_seen - LINK_MARGIN)
    end: int | str = epoch_ms(alert.resolved_at + LINK_MARGIN) if alert.resolved_at is not None else "now"
    separator = "&" if parts.query else ("" if url.endswith("?") else "?")
    return f"{url}{separator}{urlencode({'from': start, 'to': end})}"


class GrafanaAnnotationSink:
    """Annotates alerts in the Grafana at `url` with a service-account `token` (see the module docstring).
    `timeout` is per request; `verify` checks TLS certificates."""

    name = "grafana"

    def __init__(self, url: str, token: str, *, timeout: float = 10.0, verify: bool = True) -> None:
        self._client = GrafanaClient(url, token, timeout=timeout, verify=verify)

    def deliver(self, notification: Notification) -> None:
        """Create or update the alert's annotation; raise `DeliveryError` unless Grafana took it (transient
        when no answer came, on 408/425/429 and 5xx; permanent otherwise, such as a refused token)."""
        alert = notification.alert
        tags = annotation_tags(notification)
        text = annotation_text(notification)
        start = epoch_ms(alert.raised_at)
        end: int | None = None
        if notification.event.ends_alert:
            end = max(start, epoch_ms(alert.resolved_at or notification.created_at))
        try:
            found = self._client.find_annotations([TAG, identity_tag(notification)])
            if not found:
                self._client.create_annotation(time_ms=start, time_end_ms=end, tags=tags, text=text)
                return
            # Should two exist (made by hand, say), the oldest is the alert's.
            annotation = min(found, key=lambda item: int(item.get("id") or 0))
            self._client.patch_annotation(
                int(annotation["id"]),
                text=text if annotation.get("text") != text else None,
                # Grafana may list tags in another order than they were given.
                tags=tags if set(annotation.get("tags") or []) != set(tags) else None,
                time_end_ms=end if end is not None and annotation.get("timeEnd") != end else None,
            )
        except GrafanaError as exc:
            # A 404 on the update: the annotation was deleted in between; the retry creates it again.
            permanent = not exc.transient and exc.status != 404
            raise DeliveryError(
                f"{self.name}: {exc.detail}", permanent=permanent, retry_after=exc.retry_after
            ) from None

    def close(self) -> None:
        """Close the connection pool; safe to call more than once."""
        self._client.close()
