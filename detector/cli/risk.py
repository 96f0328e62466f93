"""`mia-detector risk ...`: what gateways are told to do with clients (the risk feed), and the operators'
decisions that override the policy's, every change audited with who made it and why."""

from __future__ import annotations

import os
import time
from typing import Any

import click

from detector.cli.alerts import Duration
from detector.cli.context import RuntimeFailure, open_store, settings_of
from detector.cli.output import FORMAT_OPTION, LIMIT_OPTION, print_rows, stderr
from detector.domain import (
    Coarsening,
    RiskAction,
    RiskDecision,
    RiskParameters,
    rfc3339,
    risk_document,
    utc,
)
from detector.text import visible

DECISION_COLUMNS = [
    "model", "client_id", "action", "parameters", "expires_at", "source", "actor", "alert_ids",
]  # fmt: skip
AUDIT_COLUMNS = ["at", "model", "client_id", "change", "action", "parameters", "actor", "alert_id", "reason"]
BY_OPTION = click.option(
    "--by",
    "actor",
    default=lambda: os.environ.get("USER", "unknown"),
    show_default="$USER",
    help="Who decides (recorded in the audit).",
)


@click.group("risk")
def risk_group() -> None:
    """The risk feed: what gateways do with clients while incidents against them are open."""


@risk_group.command("list")
@click.option("--model", help="Only this model's clients.")
@click.option("--client", help="Only this client id.")
@click.option("--all", "every", is_flag=True, help="Every stored decision, not only the one in force.")
@FORMAT_OPTION
@click.pass_context
def risk_list(ctx: click.Context, model: str | None, client: str | None, every: bool, fmt: str) -> None:
    """The decision in force on each client that has one (an operator's over the policy's)."""
    from detector.alerts.risk_feed import RiskView
    from detector.storage import RiskStore

    with RiskStore(open_store(settings_of(ctx)).engine) as store:
        decisions = store.decisions(model, client)
    if every:
        rows = [
            risk_document(d.model, d.client_id, d, [d.alert_id] if d.alert_id is not None else [])
            for d in decisions
        ]
    else:
        view = RiskView(lambda: decisions)
        view.refresh()
        rows = [document for _, document in sorted(view.in_force().items())]
    print_rows(rows, fmt, DECISION_COLUMNS, "risk decisions")


@risk_group.command("set")
@click.argument("model")
@click.argument("client")
@click.option(
    "--action", type=click.Choice([a.value for a in RiskAction]), required=True, help="What gateways do."
)
@click.option("--coarsening", type=click.Choice([c.value for c in Coarsening]), help="For coarsen: how.")
@click.option("--decimals", type=click.IntRange(0, 6), help="For coarsen round: decimals kept.")
@click.option("--rpm", type=click.IntRange(min=1), help="For throttle: requests per minute.")
@click.option("--for", "duration", type=Duration(), help="How long, e.g. 2h or 7d (default: until cleared).")
@click.option("--reason", required=True, help="Why (recorded in the audit).")
@BY_OPTION
@click.pass_context
def risk_set(
    ctx: click.Context,
    model: str,
    client: str,
    action: str,
    coarsening: str | None,
    decimals: int | None,
    rpm: int | None,
    duration: float | None,
    reason: str,
    actor: str,
) -> None:
    """Decide what gateways do with CLIENT of MODEL, over the policy (`allow` exempts it from the policy)."""
    from detector.storage import RiskStore

    chosen = RiskAction(action)
    try:
        parameters = RiskParameters(
            coarsening=Coarsening(coarsening) if coarsening else None,
            decimals=decimals,
            requests_per_minute=rpm,
        ).check(chosen)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    if not reason.strip():
        raise click.UsageError("say why: --reason")
    now = utc(time.time())
    decision = RiskDecision(
        model=model,
        client_id=client,
        action=chosen,
        parameters=parameters,
        source="operator",
        actor=actor,
        reason=reason,
        decided_at=now,
        expires_at=utc(now.timestamp() + duration) if duration is not None else None,
    )
    with RiskStore(open_store(settings_of(ctx)).engine) as store:
        previous = store.override(decision)
    replaced = f" (was {previous.action})" if previous is not None else ""
    stderr.print(f"{visible(client)} of {visible(model)}: {chosen}{replaced}", highlight=False)


@risk_group.command("clear")
@click.argument("model")
@click.argument("client")
@click.option("--reason", required=True, help="Why (recorded in the audit).")
@BY_OPTION
@click.pass_context
def risk_clear(ctx: click.Context, model: str, client: str, reason: str, actor: str) -> None:
    """Remove the operator's decision on CLIENT of MODEL: the policy's decide again."""
    from detector.storage import RiskStore

    with RiskStore(open_store(settings_of(ctx)).engine) as store:
        cleared = store.clear(model, client, actor, reason)
    if cleared is None:
        raise RuntimeFailure(f"no operator decision on {client!r} of {model!r}: nothing cleared")
    stderr.print(f"{visible(client)} of {visible(model)}: {cleared.action} cleared", highlight=False)


@risk_group.command("audit")
@click.option("--model", help="Only this model's clients.")
@click.option("--client", help="Only this client id.")
@LIMIT_OPTION
@FORMAT_OPTION
@click.pass_context
def risk_audit(ctx: click.Context, model: str | None, client: str | None, limit: int, fmt: str) -> None:
    """Every change to the decisions, newest first: who, when, what and why."""
    from detector.storage import RiskStore

    with RiskStore(open_store(settings_of(ctx)).engine) as store:
        entries = store.audit_log(model, client, limit)
    print_rows((_audit_row(entry) for entry in entries), fmt, AUDIT_COLUMNS, "risk audit")


def _audit_row(entry: dict[str, Any]) -> dict[str, Any]:
    expires = entry["expires_at"]
    return entry | {
        "at": rfc3339(entry["at"].timestamp()),
        "expires_at": rfc3339(expires.timestamp()) if expires is not None else None,
    }


COMMANDS = [risk_group]
