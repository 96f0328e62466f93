"""The `mia-detector` command line. Commands parse options, call the service layer and print results.

Errors an operator can fix (bad arguments, bad configuration, an unreachable broker or database) end with a
one-line message on stderr and exit code 2 (usage, configuration) or 1 (runtime), never a traceback.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from detector import __version__
from detector.ingest.records import RawRecord
from detector.logs import configure_logging
from detector.sessions import SessionState
from detector.settings import ConfigError, Settings, load_settings

log = logging.getLogger("detector")

stderr = Console(stderr=True)
# Piped listings keep whole values instead of being squeezed to 80 columns.
stdout = Console() if sys.stdout.isatty() else Console(width=240)


class OutputFormat(StrEnum):
    """How listings are printed."""

    TABLE = "table"
    JSONL = "jsonl"


FORMAT_OPTION = click.option(
    "--format",
    "fmt",
    type=click.Choice([f.value for f in OutputFormat]),
    default=OutputFormat.TABLE.value,
    show_default=True,
    help="Table for people, JSON Lines for scripts.",
)
LIMIT_OPTION = click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="At most this many, newest first.",
)


class RuntimeFailure(Exception):
    """A failure at run time (broker or database unreachable, ...): one-line message, exit code 1."""


# -- settings and shared options -----------------------------------------------------------------------------


def _settings(ctx: click.Context, **groups: dict[str, Any]) -> Settings:
    """The effective settings: the global options of `ctx`, then command-specific `groups` on top."""
    base: dict[str, dict[str, Any]] = ctx.obj["overrides"]
    merged = {group: dict(values) for group, values in base.items()}
    for group, values in groups.items():
        merged.setdefault(group, {}).update(values)
    settings = load_settings(ctx.obj["config_file"], **merged)
    configure_logging(settings.log.format, settings.log.level)
    return settings


@click.group(
    name="mia-detector",
    help="Detects membership-inference and model-extraction attacks in ML prediction-request logs.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="mia-detector")
@click.option(
    "--config", "-c", type=click.Path(path_type=Path), envvar="MIA_CONFIG_FILE", help="TOML settings file."
)
@click.option("--database-url", help="SQLAlchemy URL (default: MIA_DATABASE_URL, a SQLite file).")
@click.option("--bootstrap-servers", help="Kafka bootstrap servers (default: MIA_KAFKA_BOOTSTRAP_SERVERS).")
@click.option("--log-format", type=click.Choice(["console", "json"]), help="Log line format.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.pass_context
def app(
    ctx: click.Context,
    config: Path | None,
    database_url: str | None,
    bootstrap_servers: str | None,
    log_format: str | None,
    log_level: str | None,
) -> None:
    """Global options apply to every command."""
    ctx.obj = {
        "config_file": config,
        "overrides": {
            "database": {"url": database_url},
            "kafka": {"bootstrap_servers": bootstrap_servers},
            "log": {"format": log_format, "level": log_level.upper() if log_level else None},
        },
    }


# -- progress ------------------------------------------------------------------------------------------------


@contextmanager
def _progress(description: str, total: int | None, unit_bytes: bool) -> Iterator[Any]:
    """A progress bar on stderr (hidden when stderr is not a terminal); yields `advance(records)`."""
    columns = [TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=stderr, disable=not stderr.is_terminal, transient=True) as bar:
        task = bar.add_task(description, total=total)

        def advance(records: list[RawRecord]) -> None:
            amount = sum(len(r.value) + 1 for r in records) if unit_bytes else len(records)
            bar.advance(task, amount)

        yield advance


def _summary(stats: Any) -> str:
    dead = sum(stats.dead_letters.values())
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(stats.dead_letters.items()))
    return (
        f"{stats.records} records: {stats.events} events, {stats.queries} queries, "
        f"{stats.duplicates} duplicates skipped, {dead} dead letters" + (f" ({reasons})" if reasons else "")
    )


# -- streaming commands --------------------------------------------------------------------------------------


@app.command("run")
@click.option("--topic", "-t", "topics", multiple=True, help="Topic to consume (repeatable).")
@click.option("--group-id", help="Consumer group id.")
@click.option(
    "--exit-when-idle",
    type=click.FloatRange(min=0.1),
    help="Stop after this many seconds without records.",
)
@click.pass_context
def run(
    ctx: click.Context, topics: tuple[str, ...], group_id: str | None, exit_when_idle: float | None
) -> None:
    """Consume query logs from Kafka, process them and commit, until SIGTERM or SIGINT."""
    from detector.service import StopFlag, run_daemon

    settings = _settings(ctx, kafka={"topics": list(topics) or None, "group_id": group_id})
    stop = StopFlag()
    with stop.on_signals():
        stats = run_daemon(settings, stop, idle_exit_seconds=exit_when_idle)
    log.info("stopped: %s", _summary(stats))


@app.command("replay")
@click.argument("files", nargs=-1, required=True)
@click.pass_context
def replay(ctx: click.Context, files: tuple[str, ...]) -> None:
    """Process JSON Lines files exactly as the daemon processes a topic."""
    from detector.ingest.jsonl import total_bytes
    from detector.service import replay as replay_files

    for name in files:
        if name != "-" and not Path(name).is_file():
            raise click.BadParameter(f"no such file: {name}", param_hint="FILES")
    settings = _settings(ctx)
    with _progress("replaying", total_bytes(files), unit_bytes=True) as advance:
        stats = replay_files(settings, files, progress=advance)
    stderr.print(_summary(stats))


@app.command("produce")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--topic", "-t", required=True, help="Destination topic.")
@click.pass_context
def produce(ctx: click.Context, file: Path, topic: str) -> None:
    """Publish a JSON Lines file into a topic, one message a line, keyed by client id."""
    from detector.service import produce_file

    settings = _settings(ctx)
    with _progress("producing", None, unit_bytes=False) as advance:
        sent = produce_file(settings, file, topic, progress=advance)
    stderr.print(f"produced {sent} records to {topic} at {settings.kafka.bootstrap_servers}")


@app.command("broker")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=9092, show_default=True, help="Port on 127.0.0.1."
)
def broker(port: int) -> None:
    """Run the embedded Kafka-protocol broker (tansu, memory storage) in the foreground."""
    from detector.broker import EmbeddedBroker
    from detector.service import StopFlag

    stop = StopFlag()
    with stop.on_signals(), EmbeddedBroker(port=port) as running:
        stderr.print(f"broker listening on {running.bootstrap_servers} (memory storage; Ctrl-C stops it)")
        while not stop and running.running:
            time.sleep(0.2)
        if not running.running:
            raise RuntimeFailure("the broker exited")


@app.command("demo")
@click.option("--events", type=click.IntRange(min=1), default=5000, show_default=True, help="Sample records.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("var/demo"),
    show_default=True,
    help="Where the sample stream and the broker log go.",
)
@click.option(
    "--idle-seconds",
    type=click.FloatRange(min=0.5),
    default=5.0,
    show_default=True,
    help="Stop once the stream has been idle this long.",
)
@click.pass_context
def demo(ctx: click.Context, events: int, workdir: Path, idle_seconds: float) -> None:
    """Run the daemon end to end on an embedded broker with a sample stream, then summarise."""
    from detector.demo import run_demo
    from detector.service import StopFlag, open_store

    settings = _settings(ctx, kafka={"session_timeout_ms": 6000})
    stop = StopFlag()
    with stop.on_signals():
        result = run_demo(settings, workdir, events, idle_seconds, stop)
    stderr.print(
        f"broker {result.bootstrap_servers}: produced {result.produced} records from {result.sample_file}"
    )
    stderr.print(_summary(result.stats))
    with open_store(settings) as store:
        sessions = store.list_sessions(limit=100_000)
        counts = store.dead_letter_counts()
    busiest = sorted(sessions, key=lambda s: s.queries, reverse=True)[:10]
    _print_rows(map(_session_row, busiest), OutputFormat.TABLE, SESSION_COLUMNS, "busiest sessions")
    stderr.print(
        "dead letters by reason: " + (", ".join(f"{r} {n}" for r, n in sorted(counts.items())) or "none")
    )


# -- listings ------------------------------------------------------------------------------------------------


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
        "first_seen": _rfc3339(session.first_seen),
        "last_seen": _rfc3339(session.last_seen),
    }


def _print_rows(rows: Iterable[dict[str, Any]], fmt: str, columns: list[str], title: str) -> None:
    if fmt == OutputFormat.JSONL:
        out = sys.stdout.buffer
        for row in rows:
            out.write(orjson.dumps(row) + b"\n")
        out.flush()
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[column]) if row[column] is not None else "" for column in columns))
    stdout.print(table)


@app.group("sessions")
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
    from detector.service import open_store

    with open_store(_settings(ctx), migrate=True) as store:
        sessions = store.list_sessions(client_id=client, model=model, limit=limit)
    _print_rows(map(_session_row, sessions), fmt, SESSION_COLUMNS, "sessions")


@app.group("deadletters")
def deadletters_group() -> None:
    """Records that could not be processed."""


@deadletters_group.command("list")
@click.option("--reason", help="Only this reason.")
@LIMIT_OPTION
@FORMAT_OPTION
@click.pass_context
def deadletters_list(ctx: click.Context, reason: str | None, limit: int, fmt: str) -> None:
    """List dead letters (rejected records) with their reason and source, newest first."""
    from detector.service import open_store

    with open_store(_settings(ctx), migrate=True) as store:
        letters = store.list_dead_letters(reason=reason, limit=limit)
    rows = (
        {
            "id": letter.id,
            "reason": letter.reason,
            "detail": letter.detail,
            "source": letter.source,
            "raw_size": letter.raw_size,
            "raw": letter.raw.decode("utf-8", errors="replace"),
            "received_at": letter.received_at.isoformat(timespec="milliseconds"),
        }
        for letter in letters
    )
    _print_rows(rows, fmt, ["reason", "source", "detail", "raw_size", "received_at"], "dead letters")


# -- configuration, database, schemas ------------------------------------------------------------------------


@app.group("config")
def config_group() -> None:
    """Configuration."""


@config_group.command("show")
@click.pass_context
def config_show(ctx: click.Context) -> None:
    """Print the effective configuration as JSON, secrets masked."""
    settings = _settings(ctx)
    stdout.print_json(orjson.dumps(settings.masked()).decode())


@app.group("db")
def db_group() -> None:
    """Database schema."""


@db_group.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Apply the database migrations up to the latest schema."""
    from detector.storage import create_engine_for, current_revision, upgrade

    settings = _settings(ctx)
    engine = create_engine_for(settings.database.url.get_secret_value())
    upgrade(engine)
    stderr.print(f"database at revision {current_revision(engine)}")


@app.group("schemas")
def schemas_group() -> None:
    """JSON Schemas of the input contract."""


@schemas_group.command("export")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("schemas"),
    show_default=True,
    help="Directory to write the *.schema.json files to.",
)
def schemas_export(out: Path) -> None:
    """Write the JSON Schemas of the input contract (envelope, OIP v2, KServe v1)."""
    from detector.model import export_json_schemas

    for path in export_json_schemas(out):
        stderr.print(f"wrote {path}")


# -- entry point ---------------------------------------------------------------------------------------------


def _fail(message: str, code: int) -> None:
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    stderr.print(f"mia-detector: error: {first_line}", markup=False, highlight=False, soft_wrap=True)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the command; turn known failures into one-line errors."""
    from kafka.errors import KafkaError
    from sqlalchemy.exc import SQLAlchemyError

    from detector.broker import BrokerError

    try:
        code = app.main(args=argv, prog_name="mia-detector", standalone_mode=False)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except click.ClickException as exc:
        _fail(exc.format_message(), 2)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except (BrokerError, RuntimeFailure) as exc:
        _fail(str(exc), 1)
    except KafkaError as exc:
        _fail(f"Kafka: {exc}", 1)
    except SQLAlchemyError as exc:
        _fail(f"database: {exc.__class__.__name__}: {exc}", 1)
    except OSError as exc:
        _fail(str(exc), 1)
    raise SystemExit(code if isinstance(code, int) else 0)
