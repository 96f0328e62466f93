"""What commands take from the command line: the settings (global options, then the command's own) and the
database they name; and the failure a command reports at run time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from detector.logs import configure_logging
from detector.settings import Settings, load_settings

if TYPE_CHECKING:
    from detector.storage import AlertStore, Store


class RuntimeFailure(Exception):
    """A failure at run time (broker or database unreachable, ...): one-line message, exit code 1."""


def settings_of(ctx: click.Context, **groups: dict[str, Any]) -> Settings:
    """The effective settings: the global options of `ctx`, then command-specific `groups` on top; logging
    configured as they say."""
    base: dict[str, dict[str, Any]] = ctx.obj["overrides"]
    merged = {group: dict(values) for group, values in base.items()}
    for group, values in groups.items():
        merged.setdefault(group, {}).update(values)
    settings = load_settings(ctx.obj["config_file"], **merged)
    configure_logging(settings.log.format, settings.log.level)
    return settings


# Listings and edits of stored rows (alerts, sessions, dead letters, silences, the outbox) open the database
# through `detector.storage` alone: `detector.service` builds the pipeline, and importing it loads
# scikit-learn, which would triple the start-up time of `alerts list`. A command migrates the database it
# opens, whatever `database.migrate_on_start` says of the daemon.
def open_store(settings: Settings) -> Store:
    """The store (sessions, dead letters, checkpoints, transactions) on the configured database, migrated."""
    from detector.storage import open_store

    return open_store(settings, migrate=True)


def open_alert_store(settings: Settings) -> AlertStore:
    """The alert store on the configured database, migrated."""
    from detector.storage import open_alert_store

    return open_alert_store(settings, migrate=True)
