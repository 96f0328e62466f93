"""The `mia-detector` command line. Commands parse options, call the service layer and print results; each
group of commands is a module of this package.

Errors an operator can fix (bad arguments, bad configuration, an unreachable broker or database) end with a
one-line message on stderr and exit code 2 (usage, configuration) or 1 (runtime), never a traceback.

Listing alerts, sessions or dead letters must start quickly: command modules import the pipeline, the
scoring model, scikit-learn and matplotlib only inside the commands that need them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import click

from detector import __version__
from detector.cli import admin, alerts, dashboards, models, records, risk, stream
from detector.cli.context import RuntimeFailure
from detector.cli.output import stderr
from detector.settings import ConfigError
from detector.text import visible


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
@click.option(
    "--log-format", type=click.Choice(["console", "json"], case_sensitive=False), help="Log line format."
)
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
            "log": {"format": log_format, "level": log_level},
        },
    }


# Every module of a command group lists, in `COMMANDS`, what it adds to `mia-detector`.
for _module in (stream, models, alerts, risk, records, admin, dashboards):
    for _command in _module.COMMANDS:
        app.add_command(_command)


# -- entry point ---------------------------------------------------------------------------------------------


def _fail(message: str, code: int) -> NoReturn:
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    # Errors may quote what they failed on: a client id given on the command line, a value from a record.
    stderr.print(f"mia-detector: error: {visible(first_line)}", highlight=False, soft_wrap=True)
    raise SystemExit(code)


def _known_failure(exc: Exception) -> tuple[str, int] | None:
    """The one-line message and exit code of a failure an operator can fix; None for anything else."""
    # Imported only once something failed: a command that succeeds does not pay for them.
    from kafka.errors import KafkaError
    from sqlalchemy.exc import SQLAlchemyError

    from detector.broker import BrokerError
    from detector.kafka.connect import KafkaUnreachable
    from detector.storage.errors import StorageError, describe

    # Importing the scoring model costs a second (scikit-learn): until some command has imported it, none of
    # its errors can have been raised.
    scoring_model = sys.modules.get("detector.scoring.model")
    index_files = sys.modules.get("detector.trainingset.files")
    if (
        isinstance(exc, ConfigError)
        or (scoring_model is not None and isinstance(exc, scoring_model.ModelError))
        or (index_files is not None and isinstance(exc, index_files.IndexFileError))
    ):
        return str(exc), 2
    if isinstance(exc, BrokerError | RuntimeFailure | KafkaUnreachable):
        return str(exc), 1
    if isinstance(exc, KafkaError):
        return f"Kafka: {exc}", 1
    if isinstance(exc, StorageError):
        return f"database: {exc}", 1
    if isinstance(exc, SQLAlchemyError):
        return f"database: {describe(exc)}", 1
    if isinstance(exc, OSError):
        return str(exc), 1
    return None


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the command; turn known failures into one-line errors."""
    try:
        code = app.main(args=argv, prog_name="mia-detector", standalone_mode=False)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except click.ClickException as exc:
        _fail(exc.format_message(), 2)
    except Exception as exc:
        failure = _known_failure(exc)
        if failure is None:
            raise
        _fail(*failure)
    raise SystemExit(code if isinstance(code, int) else 0)


__all__ = ["RuntimeFailure", "app", "main"]
