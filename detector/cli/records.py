"""`mia-detector sessions list`, `mia-detector clients show` and `mia-detector deadletters list`: what the
detector stored per client, and what it could not process."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from detector.cli.context import RuntimeFailure, open_store, settings_of
from detector.cli.output import FORMAT_OPTION, LIMIT_OPTION, print_rows
from detector.domain import DeadLetterReason, rfc3339

if TYPE_CHECKING:
    from detector.domain import SessionState
    from detector.storage import ClientExposure

SESSION_COLUMNS = [
    "model",
    "client_id",
    "status",
    "queries",
    "requests",
    "confidence_share",
    "first_seen",
    "last_seen",
]


def _session_row(session: SessionState) -> dict[str, Any]:
    return {
        "id": session.id,
        "model": session.model,
        "client_id": session.client_id,
        "status": session.status.value,
        "queries": session.queries,
        "requests": session.requests,
        "confidence_share": round(session.confidence_share, 4),
        "text_queries": session.text_queries,
        "max_batch_size": session.max_batch_size,
        "first_seen": rfc3339(session.first_seen),
        "last_seen": rfc3339(session.last_seen),
    }


@click.group("sessions")
def sessions_group() -> None:
    """Per-client sessions."""


@sessions_group.command("list")
@click.option("--client", help="Only this client id.")
@click.option("--model", help="Only this model.")
@LIMIT_OPTION
@FORMAT_OPTION
@click.pass_context
def sessions_list(ctx: click.Context, client: str | None, model: str | None, limit: int, fmt: str) -> None:
    """List sessions, newest first."""
    with open_store(settings_of(ctx)) as store:
        sessions = store.list_sessions(client_id=client, model=model, limit=limit)
    print_rows(map(_session_row, sessions), fmt, SESSION_COLUMNS, "sessions")


CLIENT_COLUMNS = [
    "model",
    "first_seen",
    "last_seen",
    "training_records",
    "probability_records",
    "label_only_answers",
    "probes",
    "open_alerts",
    "risk_action",
]


@click.group("clients")
def clients_group() -> None:
    """What the detector knows of a client."""


@clients_group.command("show")
@click.argument("client")
@click.option("--model", help="Only this model.")
@FORMAT_OPTION
@click.pass_context
def clients_show(ctx: click.Context, client: str, model: str | None, fmt: str) -> None:
    """What CLIENT was given by each model it queried, over which period (event time), with the alerts open
    on it and the risk decision gateways enforce. Exposure counts distinct records answered with a confidence
    vector (training_records: those in the training-set index), label-only answers and near-duplicate probes.
    """
    from detector.alerts.risk_feed import RiskView
    from detector.storage import AlertStore, RiskStore

    with open_store(settings_of(ctx)) as store:
        exposures = store.client_exposures(client, model)
        decisions = RiskStore(store.engine).decisions(model, client)
        opened = AlertStore(store.engine).list_alerts(status="open", client_id=client, limit=None)
    if not exposures:
        raise RuntimeFailure(f"no stored state for client {client!r}" + (f" of {model!r}" if model else ""))
    view = RiskView(lambda: decisions)
    view.refresh()
    in_force = view.in_force()
    rows = [
        _client_row(
            exposure,
            [alert.id for alert in opened if alert.model == exposure.model],
            in_force.get((exposure.model, client), {}).get("action", "allow"),
        )
        for exposure in exposures
    ]
    print_rows(rows, fmt, CLIENT_COLUMNS, f"client {client}")


def _client_row(stored: ClientExposure, open_alerts: list[int], risk_action: str) -> dict[str, Any]:
    return {
        "model": stored.model,
        "client_id": stored.client_id,
        "first_seen": rfc3339(stored.first_seen.timestamp()) if stored.first_seen else None,
        "last_seen": rfc3339(stored.last_seen.timestamp()),
        **stored.exposure.model_dump(),
        "open_alerts": open_alerts,
        "risk_action": risk_action,
        "updated_at": rfc3339(stored.updated_at.timestamp()),
    }


@click.group("deadletters")
def deadletters_group() -> None:
    """Records that could not be processed."""


@deadletters_group.command("list")
@click.option(
    "--reason", type=click.Choice([reason.value for reason in DeadLetterReason]), help="Only this reason."
)
@LIMIT_OPTION
@FORMAT_OPTION
@click.pass_context
def deadletters_list(ctx: click.Context, reason: str | None, limit: int, fmt: str) -> None:
    """List dead letters (rejected records) with their reason and source, newest first."""
    with open_store(settings_of(ctx)) as store:
        letters = store.list_dead_letters(reason=reason, limit=limit)
    rows = (
        {
            "id": letter.id,
            "reason": letter.reason,
            "detail": letter.detail,
            "source": letter.source,
            "raw_size": letter.raw_size,
            "raw": letter.raw.decode("utf-8", errors="replace"),
            "received_at": rfc3339(letter.received_at.timestamp()),
        }
        for letter in letters
    )
    print_rows(rows, fmt, ["reason", "source", "detail", "raw_size", "received_at"], "dead letters")


COMMANDS = [sessions_group, clients_group, deadletters_group]
