"""Administration: `config show`, `db upgrade`, `retention run` and `schemas export`."""

from __future__ import annotations

from pathlib import Path

import click
import orjson

from detector.cli.context import settings_of
from detector.cli.output import FORMAT_OPTION, print_rows, stderr, stdout
from detector.domain import rfc3339


@click.group("config")
def config_group() -> None:
    """Configuration."""


@config_group.command("show")
@click.pass_context
def config_show(ctx: click.Context) -> None:
    """Print the effective configuration as JSON, secrets masked."""
    settings = settings_of(ctx)
    stdout.print_json(orjson.dumps(settings.masked()).decode())


@click.group("db")
def db_group() -> None:
    """Database schema."""


@db_group.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Apply the database migrations up to the latest schema."""
    from detector.storage import create_engine_for, current_revision, upgrade

    settings = settings_of(ctx)
    engine = create_engine_for(settings.database.url.get_secret_value())
    upgrade(engine)
    stderr.print(f"database at revision {current_revision(engine)}")


@click.group("retention")
def retention_group() -> None:
    """Deleting stored data past its retention (MIA_RETENTION_*)."""


@retention_group.command("run")
@FORMAT_OPTION
@click.pass_context
def retention_run(ctx: click.Context, fmt: str) -> None:
    """Delete sessions, dead letters, seen event ids, resolved alerts and delivered notifications older than
    their retention, in small chunks; print what was deleted from each table."""
    from detector.storage import RetentionPolicy, open_retention

    settings = settings_of(ctx)
    with open_retention(settings, migrate=True) as retention:
        purges = retention.apply(RetentionPolicy.from_settings(settings))
    rows = (
        {
            "table": purge.table,
            "older_than": rfc3339(purge.before.timestamp()) if purge.before is not None else "kept for good",
            "deleted": purge.deleted,
        }
        for purge in purges
    )
    print_rows(rows, fmt, ["table", "older_than", "deleted"], "deleted past retention")


@click.group("schemas")
def schemas_group() -> None:
    """JSON Schemas of the input contract and of the notifications sent to webhooks."""


@schemas_group.command("export")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("schemas"),
    show_default=True,
    help="Directory to write the *.schema.json files to.",
)
def schemas_export(out: Path) -> None:
    """Write the JSON Schemas of the input contract (envelope, OIP v2, KServe v1) and of notifications."""
    from detector.schemas import export_json_schemas

    for path in export_json_schemas(out):
        stderr.print(f"wrote {path}")


COMMANDS = [config_group, db_group, retention_group, schemas_group]
