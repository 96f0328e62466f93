"""`mia-detector alerts ...`: list and export alerts, acknowledge and resolve them, silence them, look at and
retry their notifications, and test the sinks."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import click

from detector.cli.context import RuntimeFailure, open_alert_store, open_store, settings_of
from detector.cli.output import FORMAT_OPTION, LIMIT_OPTION, OutputFormat, print_rows, stderr, stdout
from detector.domain import AlertKind, AlertStatus, rfc3339
from detector.text import visible

if TYPE_CHECKING:
    from detector.alerts.lifecycle import AlertLifecycle, AlertRecords

ALERT_COLUMNS = [
    "id",
    "kind",
    "severity",
    "status",
    "client_id",
    "model",
    "score",
    "threshold",
    "queries",
    "detected_at",
    "raised_at",
    "top_reason",
]
ALERT_STATUS_OPTION = click.option(
    "--status", type=click.Choice([s.value for s in AlertStatus]), help="Only alerts with this status."
)


@click.group("alerts")
def alerts_group() -> None:
    """Detected attacks: one open alert per model, client(s) and kind."""


@alerts_group.command("list")
@ALERT_STATUS_OPTION
@click.option("--client", help="Only alerts naming this client id (alone or in a coordinated group).")
@click.option("--kind", type=click.Choice([k.value for k in AlertKind]), help="Only this kind of attack.")
@LIMIT_OPTION
@FORMAT_OPTION
@click.pass_context
def alerts_list(
    ctx: click.Context, status: str | None, client: str | None, kind: str | None, limit: int, fmt: str
) -> None:
    """List alerts with their strongest reason, newest raised first."""
    with open_alert_store(settings_of(ctx)) as store:
        alerts = store.list_alerts(status=status, client_id=client, kind=kind, limit=limit)
    rows = ({**alert.model_dump(mode="json"), "top_reason": alert.top_reason} for alert in alerts)
    print_rows(rows, fmt, ALERT_COLUMNS, "alerts")


@alerts_group.command("export")
@click.option(
    "--format",
    "fmt",
    type=click.Choice([OutputFormat.JSONL.value]),
    default=OutputFormat.JSONL.value,
    show_default=True,
    help="JSON Lines: one alert a line, times in RFC 3339 UTC.",
)
@ALERT_STATUS_OPTION
@click.pass_context
def alerts_export(ctx: click.Context, fmt: str, status: str | None) -> None:
    """Print every alert in full (explanation, evidence), newest raised first."""
    with open_alert_store(settings_of(ctx)) as store:
        alerts = store.list_alerts(status=status, limit=None)
    print_rows((alert.model_dump(mode="json") for alert in alerts), fmt, [], "alerts")


class Duration(click.ParamType[float]):
    """A duration such as `90s`, `15m`, `2h`, `1d` or `1h30m`, in seconds."""

    name = "duration"
    _PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
    _UNIT: ClassVar[dict[str, int]] = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, int | float):
            return float(value)
        text = str(value).strip().lower()
        parts = self._PART.findall(text)
        if not parts or "".join(number + unit for number, unit in parts) != text:
            self.fail(f"{value!r} is not a duration such as 90s, 15m, 2h, 1d or 1h30m", param, ctx)
        seconds = sum(float(number) * self._UNIT[unit] for number, unit in parts)
        if seconds <= 0:
            self.fail("the duration must be positive", param, ctx)
        return seconds


@alerts_group.command("silence")
@click.option("--client", help="Silence alerts involving this client id.")
@click.option("--model", help="Silence alerts on this model.")
@click.option("--kind", type=click.Choice([k.value for k in AlertKind]), help="Silence this kind of alert.")
@click.option("--rule", help="Silence alerts raised by this rule id (e.g. MIA-004).")
@click.option("--for", "duration", type=Duration(), required=True, help="How long, e.g. 2h or 30m.")
@click.option("--reason", default="", help="Why (shown with the silence).")
@click.pass_context
def alerts_silence(
    ctx: click.Context,
    client: str | None,
    model: str | None,
    kind: str | None,
    rule: str | None,
    duration: float,
    reason: str,
) -> None:
    """Keep matching alerts from notifying for a while (every option given must match).

    Matching alerts are still recorded; a resolution is still sent for an alert that was notified.
    """
    from detector.storage import SilenceStore

    # The store refuses a silence without criteria too; saying so here names the options, and comes before
    # the database is opened.
    if client is None and model is None and kind is None and rule is None:
        raise click.UsageError("say what to silence: --client, --model, --kind and/or --rule")
    with SilenceStore(open_store(settings_of(ctx)).engine) as store:
        silence = store.add(
            duration_seconds=duration,
            reason=reason,
            # Who runs the command, as the login shell says: a fact about the caller, not a setting.
            created_by=os.environ.get("USER", "unknown"),
            client_id=client,
            model=model,
            kind=kind,
            rule_id=rule,
        )
    until = rfc3339(silence.expires_at.timestamp())
    stderr.print(f"silence {silence.id} ({visible(silence.describe())}) until {until}")


@alerts_group.command("silences")
@click.option("--all", "include_expired", is_flag=True, help="Include expired silences.")
@FORMAT_OPTION
@click.pass_context
def alerts_silences(ctx: click.Context, include_expired: bool, fmt: str) -> None:
    """List the active silences (or all), newest first."""
    from detector.storage import SilenceStore

    with SilenceStore(open_store(settings_of(ctx)).engine) as store:
        silences = store.list(include_expired=include_expired)
    rows = (
        {
            "id": silence.id,
            "matches": silence.describe(),
            "reason": silence.reason,
            "created_by": silence.created_by,
            "created_at": rfc3339(silence.created_at.timestamp()),
            "expires_at": rfc3339(silence.expires_at.timestamp()),
        }
        for silence in silences
    )
    print_rows(rows, fmt, ["id", "matches", "reason", "created_by", "expires_at"], "silences")


@alerts_group.command("unsilence")
@click.argument("silence_id", type=int)
@click.pass_context
def alerts_unsilence(ctx: click.Context, silence_id: int) -> None:
    """End a silence now."""
    from detector.storage import SilenceStore

    with SilenceStore(open_store(settings_of(ctx)).engine) as store:
        if not store.expire(silence_id):
            raise click.BadParameter(f"no active silence {silence_id}", param_hint="SILENCE_ID")
    stderr.print(f"silence {silence_id} ended")


def _operate_on_alert(
    ctx: click.Context,
    alert_id: int,
    operation: Callable[[AlertLifecycle, AlertRecords, int], Any],
    done: str,
) -> None:
    """Apply a lifecycle `operation` to alert `alert_id` in one transaction; print what was `done`."""
    from detector.alerts.lifecycle import AlertLifecycle

    settings = settings_of(ctx)
    lifecycle = AlertLifecycle.from_settings(settings)
    with open_store(settings) as store:
        try:
            with store.transaction(f"{done} alert") as transaction:
                outcome = operation(lifecycle, transaction.alerts, alert_id)
        except LookupError as exc:
            raise click.BadParameter(str(exc), param_hint="ALERT_ID") from None
    queued = ", notification queued" if outcome.notifications else ""
    stderr.print(f"alert {alert_id}: {done}{queued}")


@alerts_group.command("acknowledge")
@click.argument("alert_id", type=int)
@click.pass_context
def alerts_acknowledge(ctx: click.Context, alert_id: int) -> None:
    """Mark an open alert as taken care of (PagerDuty acknowledges its incident)."""
    from detector.alerts.lifecycle import AlertLifecycle

    _operate_on_alert(ctx, alert_id, AlertLifecycle.acknowledge, "acknowledged")


@alerts_group.command("resolve")
@click.argument("alert_id", type=int)
@click.pass_context
def alerts_resolve(ctx: click.Context, alert_id: int) -> None:
    """Resolve an open alert now instead of after its quiet period."""
    from detector.alerts.lifecycle import AlertLifecycle

    _operate_on_alert(ctx, alert_id, AlertLifecycle.resolve, "resolved")


@alerts_group.command("test")
@click.pass_context
def alerts_test(ctx: click.Context) -> None:
    """Send one test notification to every configured sink; print, per sink, delivered or the error."""
    from datetime import UTC, datetime

    from detector.alerts.connectivity import check_sinks

    checks = []
    for check in check_sinks(settings_of(ctx), datetime.now(UTC)):
        outcome = "delivered" if check.error is None else f"FAILED: {visible(check.error)}"
        stdout.print(f"{check.sink}: {outcome}", highlight=False)
        checks.append(check)
    if not checks:
        raise click.UsageError(
            "no sink configured: set MIA_ALERTMANAGER_URL, MIA_PAGERDUTY_ROUTING_KEY, MIA_SLACK_WEBHOOK_URL,"
            " MIA_WEBHOOK_URL, MIA_OCSF_FILE, MIA_OCSF_TOPIC or MIA_GRAFANA_URL and MIA_GRAFANA_TOKEN"
        )
    failed = sum(not check.delivered for check in checks)
    if failed:
        raise RuntimeFailure(f"{failed} of {len(checks)} sinks did not take the test notification")


@alerts_group.command("outbox")
@click.option("--status", type=click.Choice(["pending", "delivered", "failed"]), help="Only this status.")
@click.option("--sink", help="Only this sink (alertmanager, pagerduty, slack, webhook, ocsf-file, ...).")
@LIMIT_OPTION
@FORMAT_OPTION
@click.pass_context
def alerts_outbox(ctx: click.Context, status: str | None, sink: str | None, limit: int, fmt: str) -> None:
    """List queued notifications per sink with their delivery state, newest first."""
    from detector.storage import OutboxStore

    with OutboxStore(open_store(settings_of(ctx)).engine) as outbox:
        queued = outbox.list(status=status, sink=sink, limit=limit)
    rows = (
        {
            "id": entry.id,
            "sink": entry.sink,
            "alert_id": entry.notification.alert.id,
            "event": entry.notification.event.value,
            "status": entry.status.value,
            "attempts": entry.attempts,
            "created_at": rfc3339(entry.created_at.timestamp()),
            "next_attempt_at": rfc3339(entry.next_attempt_at.timestamp()),
            "last_error": entry.last_error or "",
            "idempotency_key": entry.notification.idempotency_key,
        }
        for entry in queued
    )
    columns = ["id", "sink", "alert_id", "event", "status", "attempts", "created_at", "last_error"]
    print_rows(rows, fmt, columns, "notifications")


@alerts_group.command("redeliver")
@click.option("--sink", help="Only this sink's failed notifications.")
@click.pass_context
def alerts_redeliver(ctx: click.Context, sink: str | None) -> None:
    """Queue failed notifications again (after fixing what the receiver rejected)."""
    from detector.storage import OutboxStore

    with OutboxStore(open_store(settings_of(ctx)).engine) as outbox:
        count = outbox.retry_failed(sink)
    stderr.print(f"{count} notifications queued again")


COMMANDS = [alerts_group]
