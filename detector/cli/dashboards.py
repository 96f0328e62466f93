"""`mia-detector dashboards ...`: write the Grafana dashboards as files, or publish them to a Grafana."""

from __future__ import annotations

from pathlib import Path

import click

from detector.cli.context import RuntimeFailure, settings_of
from detector.cli.output import stderr, stdout
from detector.settings import ConfigError
from detector.text import visible


@click.group("dashboards")
def dashboards_group() -> None:
    """Grafana dashboards: write them as JSON files, or publish them to a Grafana."""


@dashboards_group.command("build")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("dashboards"),
    show_default=True,
    help="Directory to write the dashboard JSON files to.",
)
def dashboards_build(out: Path) -> None:
    """Write every dashboard as a JSON file, for Grafana's file provisioning or its import page."""
    from detector.dashboards import write_dashboards

    for path in write_dashboards(out):
        stderr.print(f"wrote {path}")


# The defaults named in the help texts are `detector.dashboards.publish.DEFAULT_*`, written out here so that
# `--help` does not import the dashboards.
@dashboards_group.command("push")
@click.option("--url", help="Grafana's base URL, e.g. https://grafana.example (default: MIA_GRAFANA_URL).")
@click.option(
    "--prometheus-url",
    help="Prometheus as Grafana's server reaches it (default for a new data source: http://localhost:9090).",
)
@click.option("--postgres-host", help="The detector's PostgreSQL as host:port (default: localhost:5432).")
@click.option("--postgres-database", help="Its database (default: mia).")
@click.option("--postgres-user", help="A role that may only read it (default: grafana_reader).")
@click.option(
    "--postgres-sslmode",
    type=click.Choice(["disable", "require", "verify-ca", "verify-full"]),
    help="TLS to PostgreSQL (default: require).",
)
@click.pass_context
def dashboards_push(
    ctx: click.Context,
    url: str | None,
    prometheus_url: str | None,
    postgres_host: str | None,
    postgres_database: str | None,
    postgres_user: str | None,
    postgres_sslmode: str | None,
) -> None:
    """Publish the dashboards, their folder and their data sources to Grafana; safe to run again.

    The token is a Grafana service-account token with the Admin role, read from MIA_GRAFANA_TOKEN; the
    PostgreSQL role's password from MIA_GRAFANA_POSTGRES_PASSWORD. A data source that already exists is
    updated only when one of its options (or the password) is given; a provisioned one never is. Prints
    what was created, updated or left unchanged.
    """
    from detector.dashboards.publish import DataSourceOptions, grafana_client, publish
    from detector.grafana import GrafanaError

    settings = settings_of(ctx)
    url = url or settings.grafana.url
    if not url:
        raise click.UsageError("say where Grafana is: --url or MIA_GRAFANA_URL")
    try:
        client = grafana_client(settings, url)
    except ConfigError:
        raise
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--url") from None
    options = DataSourceOptions(
        prometheus_url, postgres_host, postgres_database, postgres_user, postgres_sslmode
    )
    try:
        report = publish(client, settings.grafana, options)
    except GrafanaError as exc:
        raise RuntimeFailure(str(exc)) from None
    finally:
        client.close()
    for change in report.changes:
        note = f" ({change.note})" if change.note else ""
        link = f"  {client.address.link(change.url)}" if change.kind == "dashboard" and change.url else ""
        # Titles, uids and notes come from the Grafana server.
        line = f"{change.action:<9} {change.kind:<10} {change.uid}  {change.title}{note}{link}"
        stdout.print(visible(line), highlight=False, soft_wrap=True)
    stderr.print(f"pushed to {client.address.base_url}: {report.summary}", highlight=False)


COMMANDS = [dashboards_group]
