"""The `mia-detector` command line. Commands parse options, call the service layer and print results.

Errors an operator can fix (bad arguments, bad configuration, an unreachable broker or database) end with a
one-line message on stderr and exit code 2 (usage, configuration) or 1 (runtime), never a traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import click
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from detector import __version__
from detector.alerts import AlertKind, AlertStatus
from detector.alerts.model import Detection, Reason
from detector.ingest.records import RawRecord
from detector.logs import configure_logging
from detector.model import rfc3339
from detector.sessions import SessionState
from detector.settings import ConfigError, Settings, load_settings
from detector.text import json_line, terminal_text, visible

if TYPE_CHECKING:
    from pydantic import BaseModel

    from detector.alerts.notification import AlertReason
    from detector.storage import AlertStore, AlertUpdate, StoredAlert
    from detector.storage.alerts import AlertChange

log = logging.getLogger("detector")
alert_log = logging.getLogger("detector.alerts")

# What is printed quotes client ids, model names and other text from the prediction API's callers: rich must
# never read it as markup (`[link=...]`, or a `[/]` that ends the program) or emoji codes. Such text is also
# shown through `visible`, or as `terminal_text` in tables, so that no control character reaches the terminal.
# Lines on stderr are never broken at the console's width: log lines (which a progress bar passes through
# this console) must stay one line each.
stderr = Console(stderr=True, markup=False, emoji=False, soft_wrap=True)
# Piped listings keep whole values instead of being squeezed to 80 columns.
stdout = Console(markup=False, emoji=False, width=None if sys.stdout.isatty() else 240)


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


def _describe_reason(reason: Reason | AlertReason) -> str:
    """`feature=value (pNN)`, NN the baseline percentile, the feature as `visible` shows it."""
    text = f"{visible(reason.feature)}={reason.value:.4g}"
    if reason.baseline_percentile is None:
        return text
    return f"{text} (p{reason.baseline_percentile:.4g})"


def _log_alerts(opened: list[tuple[AlertChange, Detection]]) -> None:
    """One log record per newly opened alert (WARNING, logger `detector.alerts`), one line in either log
    format: who, what, how sure, and the top reasons, with names shown as `visible` shows them.

    The record's fields hold the facts exactly, for JSON logs: `alert_id`, `kind`, `severity`, `model`,
    `client_ids`, `rule_id`, `score`, `threshold`, `queries`, `top_reason`, and the event times (RFC 3339)
    `first_seen` and `detected_at` (of the query the alert was raised on).
    """
    for change, detection in opened:
        reasons = [_describe_reason(reason) for reason in detection.reasons[:3]]
        alert_log.warning(
            "ALERT %-8s %-22s client=%s model=%s score=%.4g (threshold %.4g) %s",
            detection.severity.value,
            detection.kind.value,
            visible(",".join(detection.client_ids)),
            visible(detection.model),
            detection.score,
            detection.threshold,
            ", ".join(reasons),
            extra={
                "alert_id": change.alert_id,
                "kind": detection.kind.value,
                "severity": detection.severity.value,
                "model": detection.model,
                "client_ids": list(detection.client_ids),
                "rule_id": detection.rule_id,
                "score": detection.score,
                "threshold": detection.threshold,
                "queries": detection.queries,
                "top_reason": reasons[0] if reasons else None,
                "first_seen": rfc3339(detection.first_seen),
                "detected_at": rfc3339(detection.last_seen),
            },
        )


def _summary(stats: Any) -> str:
    dead = sum(stats.dead_letters.values())
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(stats.dead_letters.items()))
    return (
        f"{stats.records} records: {stats.events} events, {stats.queries} queries, "
        f"{stats.duplicates} duplicates skipped, {dead} dead letters"
        + (f" ({reasons})" if reasons else "")
        + f", {sum(stats.alerts_opened.values())} alerts opened"
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
        stats = run_daemon(settings, stop, idle_exit_seconds=exit_when_idle, on_alerts=_log_alerts)
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
        stats = replay_files(settings, files, progress=advance, on_alerts=_log_alerts)
    log.info("replayed: %s", _summary(stats))


# The simulator's scenarios, named here so that `--help` does not have to import scikit-learn.
SCENARIO_NAMES = ["smoke", "standard", "evasive"]


@app.command("simulate")
@click.option(
    "--scenario",
    type=click.Choice(SCENARIO_NAMES),
    default="smoke",
    show_default=True,
    help="smoke: seconds; standard: a simulated day; evasive: a day of hiding attackers.",
)
@click.option("--seed", type=int, default=1, show_default=True, help="Same seed, same bytes.")
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output directory."
)
def simulate(scenario: str, seed: int, out: Path) -> None:
    """Write simulated traffic (benign populations and attacks on real models) with its ground truth."""
    from detector.simulate import simulate as run_simulation

    summary = run_simulation(scenario, seed, out)
    stderr.print(
        f"{summary.scenario} (seed {summary.seed}): {summary.records} records, {summary.queries} queries"
        f" from {summary.clients} clients ({summary.attackers} attacking) in {out}/events.jsonl; baseline "
        f"{summary.baseline_records} records in {out}/baseline.jsonl; truth in {out}/truth.jsonl "
        f"({summary.seconds:.1f} s)"
    )


@app.command("train")
@click.option(
    "--events",
    "events",
    multiple=True,
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Baseline (benign) traffic, JSON Lines; repeatable.",
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Model directory."
)
@click.option(
    "--target-fpr",
    type=click.FloatRange(min=1e-6, max=0.5),
    default=0.001,
    show_default=True,
    help="Share of baseline clients the thresholds may alert on.",
)
@click.pass_context
def train(ctx: click.Context, events: tuple[str, ...], out: Path, target_fpr: float) -> None:
    """Fit the anomaly model and calibrate every rule's threshold on baseline traffic."""
    from detector.service import train as train_model

    model = train_model(_settings(ctx), events, target_fpr, out)
    thresholds = ", ".join(f"{rule} {value:g}" for rule, value in sorted(model.rule_thresholds.items()))
    stderr.print(
        f"model {model.version} from {model.baseline_clients} baseline clients written to {out}; "
        f"thresholds at FPR {target_fpr:g}: {thresholds}; anomaly {model.forest_threshold:.4f}"
    )


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
@click.option(
    "--scenario",
    type=click.Choice(SCENARIO_NAMES),
    default="smoke",
    show_default=True,
    help="Simulated traffic to stream (smoke: a simulated hour, every attack kind among benign clients).",
)
@click.option("--seed", type=int, default=7, show_default=True, help="Simulation seed.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("var/demo"),
    show_default=True,
    help="Where the simulation, model, indexes, broker log and evaluation go.",
)
@click.option(
    "--idle-seconds",
    type=click.FloatRange(min=0.5),
    default=5.0,
    show_default=True,
    help="Stop the daemon once the stream has been idle this long.",
)
@click.pass_context
def demo(ctx: click.Context, scenario: str, seed: int, workdir: Path, idle_seconds: float) -> None:
    """Simulate traffic, train on its baseline, stream it through a local broker into the daemon (alerts
    shown live), then evaluate what was caught against the ground truth."""
    from detector.demo import run_demo
    from detector.service import StopFlag

    settings = _settings(ctx, kafka={"session_timeout_ms": 6000})
    stop = StopFlag()
    with stop.on_signals():
        result = run_demo(settings, workdir, scenario, seed, idle_seconds, stop, on_alerts=_log_alerts)
    stderr.print(
        f"{result.simulation.scenario}: {result.produced} records streamed through the broker at "
        f"{result.bootstrap_servers}; daemon: {_summary(result.stats)}",
        highlight=False,
    )
    _print_evaluation(result.evaluation)
    if result.findings is not None:
        stderr.print(f"notifications as OCSF findings: {result.findings}", highlight=False, soft_wrap=True)
    else:
        stderr.print(f"notifications delivered to: {', '.join(result.sinks)}", highlight=False)
    stderr.print(
        f"the daemon's sessions and alerts are in {result.database}: "
        f"MIA_DATABASE_URL=sqlite:///{result.database} mia-detector alerts list",
        highlight=False,
        soft_wrap=True,
    )


# -- evaluation ----------------------------------------------------------------------------------------------


def _print_evaluation(result: Any) -> None:
    """The evaluation's per-kind table, false alerts, ROC figures and where the report is."""
    from detector.evaluate import format_duration, format_share

    table = Table(title="detection by attack kind")
    for column in ("attack kind", "attackers", "detected", "as this kind", "median queries", "median time"):
        table.add_column(column, justify="left" if column == "attack kind" else "right")
    for kind in result.kinds:
        table.add_row(
            terminal_text(kind.kind),
            str(kind.attackers),
            format_share(kind.detected_share),
            format_share(kind.matched_share),
            "n/a" if kind.queries_median is None else f"{kind.queries_median:g}",
            format_duration(kind.seconds_median),
        )
    stdout.print(table)
    roc = result.roc
    tpr = ", ".join(f"TPR {format_share(rate)} at FPR {float(x):.1%}" for x, rate in roc.tpr_at_fpr.items())
    stdout.print(
        f"benign clients falsely alerted: {result.benign_alerted}/{result.benign_clients} "
        f"({format_share(result.benign_alerted_share)}); "
        f"ROC AUC {'n/a' if roc.auc is None else f'{roc.auc:.3f}'}, {tpr}",
        highlight=False,
    )
    stderr.print(f"report written to {result.report}", highlight=False, soft_wrap=True)


@app.command("evaluate")
@click.option(
    "--events",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Query logs to replay, JSON Lines (a simulator's events.jsonl).",
)
@click.option(
    "--truth",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Ground truth, one JSON line per client (a simulator's truth.jsonl).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("var/evaluation"),
    show_default=True,
    help="Where report.md, roc.png, scores.png, summary.json (and the run's own database) go.",
)
@click.pass_context
def evaluate(ctx: click.Context, events: Path, truth: Path, out: Path) -> None:
    """Measure detection quality: replay labelled traffic through the detector and score its alerts."""
    from detector.evaluate import TruthError
    from detector.evaluate import evaluate as evaluate_files
    from detector.ingest.jsonl import total_bytes

    settings = _settings(ctx)
    with _progress("evaluating", total_bytes([str(events)]), unit_bytes=True) as advance:
        try:
            result = evaluate_files(settings, events, truth, out, progress=advance)
        except TruthError as exc:
            raise click.BadParameter(str(exc), param_hint="--truth") from None
    _print_evaluation(result)


# -- training-set index --------------------------------------------------------------------------------------


@app.command("index-training")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Index file to write (a .npz archive of hashes and sketches, no training rows).",
)
def index_training(file: Path, out: Path) -> None:
    """Index a model's training rows (.npy, .csv with a header, or .jsonl) for training-set look-ups.

    With MIA_TRAINING_INDEX_KEY set (hex), the index is keyed with it and the key stays out of the file;
    otherwise a random key is generated and stored in the file.
    """
    from detector.features.training import KEY_ENVIRONMENT_VARIABLE, TrainingSetIndex, load_training_rows

    hex_key = os.environ.get(KEY_ENVIRONMENT_VARIABLE, "")
    try:
        key = bytes.fromhex(hex_key) if hex_key else None
    except ValueError:
        raise click.ClickException(f"{KEY_ENVIRONMENT_VARIABLE} is not a hexadecimal key") from None
    try:
        rows = load_training_rows(file)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="FILE") from None
    try:
        index = TrainingSetIndex.build(rows, key=key)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    index.save(out, include_key=key is None)
    where = "stored in the file" if key is None else f"not stored (taken from {KEY_ENVIRONMENT_VARIABLE})"
    stderr.print(
        f"indexed {index.size} rows of width {index.width} into {out}; key {where}",
        highlight=False,
        soft_wrap=True,
    )


# -- listings ------------------------------------------------------------------------------------------------


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


def _print_rows(rows: Iterable[dict[str, Any]], fmt: str, columns: list[str], title: str) -> None:
    """`rows` as JSON Lines (each line exactly its row, every character printable: `json_line`), or as a
    table of `columns`, every cell shown as `terminal_text` shows it."""
    if fmt == OutputFormat.JSONL:
        out = sys.stdout.buffer
        for row in rows:
            out.write(json_line(row).encode() + b"\n")
        out.flush()
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(terminal_text("" if row[column] is None else str(row[column])) for column in columns))
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
    "raised_at",
    "top_reason",
]
ALERT_STATUS_OPTION = click.option(
    "--status", type=click.Choice([s.value for s in AlertStatus]), help="Only alerts with this status."
)


def _alert_record(alert: StoredAlert) -> dict[str, Any]:
    return {
        "id": alert.id,
        "dedup_key": alert.dedup_key,
        "client_id": alert.client_id,
        "client_ids": list(alert.client_ids),
        "model": alert.model,
        "kind": alert.kind.value,
        "severity": alert.severity.value,
        "status": alert.status.value,
        "rule_id": alert.rule_id,
        "score": alert.score,
        "threshold": alert.threshold,
        "reasons": [asdict(reason) for reason in alert.reasons],
        "evidence": alert.evidence,
        "atlas_technique": alert.atlas_technique,
        "triage": alert.triage,
        "queries": alert.queries,
        "updates": alert.updates,
        "first_seen": rfc3339(alert.first_seen.timestamp()),
        "last_seen": rfc3339(alert.last_seen.timestamp()),
        "raised_at": rfc3339(alert.raised_at.timestamp()),
        "updated_at": rfc3339(alert.updated_at.timestamp()),
        "resolved_at": rfc3339(alert.resolved_at.timestamp()) if alert.resolved_at else None,
    }


def _top_reason(alert: StoredAlert) -> str:
    """The first line of the explanation: `feature=value (pNN)`, NN the baseline percentile."""
    return _describe_reason(alert.reasons[0]) if alert.reasons else ""


@app.group("alerts")
def alerts_group() -> None:
    """Detected attacks: one open alert per model, client(s) and kind."""


@alerts_group.command("list")
@ALERT_STATUS_OPTION
@click.option("--client", help="Only alerts whose primary client is this id.")
@click.option("--kind", type=click.Choice([k.value for k in AlertKind]), help="Only this kind of attack.")
@LIMIT_OPTION
@FORMAT_OPTION
@click.pass_context
def alerts_list(
    ctx: click.Context, status: str | None, client: str | None, kind: str | None, limit: int, fmt: str
) -> None:
    """List alerts with their strongest reason, newest raised first."""
    from detector.service import open_alert_store

    with open_alert_store(_settings(ctx), migrate=True) as store:
        alerts = store.list_alerts(status=status, client_id=client, kind=kind, limit=limit)
    rows = ({**_alert_record(alert), "top_reason": _top_reason(alert)} for alert in alerts)
    _print_rows(rows, fmt, ALERT_COLUMNS, "alerts")


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
    from detector.service import open_alert_store

    with open_alert_store(_settings(ctx), migrate=True) as store:
        alerts = store.list_alerts(status=status, limit=None)
    _print_rows(map(_alert_record, alerts), fmt, [], "alerts")


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
    from detector.service import open_engine
    from detector.storage import SilenceStore

    if client is None and model is None and kind is None and rule is None:
        raise click.UsageError("say what to silence: --client, --model, --kind and/or --rule")
    with SilenceStore(open_engine(_settings(ctx), migrate=True)) as store:
        silence = store.add(
            duration_seconds=duration,
            reason=reason,
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
    from detector.service import open_engine
    from detector.storage import SilenceStore

    with SilenceStore(open_engine(_settings(ctx), migrate=True)) as store:
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
    _print_rows(rows, fmt, ["id", "matches", "reason", "created_by", "expires_at"], "silences")


@alerts_group.command("unsilence")
@click.argument("silence_id", type=int)
@click.pass_context
def alerts_unsilence(ctx: click.Context, silence_id: int) -> None:
    """End a silence now."""
    from detector.service import open_engine
    from detector.storage import SilenceStore

    with SilenceStore(open_engine(_settings(ctx), migrate=True)) as store:
        if not store.expire(silence_id):
            raise click.BadParameter(f"no active silence {silence_id}", param_hint="SILENCE_ID")
    stderr.print(f"silence {silence_id} ended")


def _operate_on_alert(
    ctx: click.Context, alert_id: int, operation: Callable[[AlertStore, int], AlertUpdate], done: str
) -> None:
    from detector.service import open_alert_store

    with open_alert_store(_settings(ctx), migrate=True) as store:
        try:
            outcome = operation(store, alert_id)
        except LookupError as exc:
            raise click.BadParameter(str(exc), param_hint="ALERT_ID") from None
    queued = ", notification queued" if outcome.notifications else ""
    stderr.print(f"alert {alert_id}: {done}{queued}")


@alerts_group.command("acknowledge")
@click.argument("alert_id", type=int)
@click.pass_context
def alerts_acknowledge(ctx: click.Context, alert_id: int) -> None:
    """Mark an open alert as taken care of (PagerDuty acknowledges its incident)."""
    from detector.storage import AlertStore

    _operate_on_alert(ctx, alert_id, AlertStore.acknowledge, "acknowledged")


@alerts_group.command("resolve")
@click.argument("alert_id", type=int)
@click.pass_context
def alerts_resolve(ctx: click.Context, alert_id: int) -> None:
    """Resolve an open alert now instead of after its quiet period."""
    from detector.storage import AlertStore

    _operate_on_alert(ctx, alert_id, AlertStore.resolve, "resolved")


@alerts_group.command("test")
@click.pass_context
def alerts_test(ctx: click.Context) -> None:
    """Send one test notification to every configured sink; print, per sink, delivered or the error."""
    from datetime import UTC, datetime

    from detector.alerts.lifecycle import connectivity_check
    from detector.alerts.sinks import DeliveryError, build_sinks

    settings = _settings(ctx)
    sinks = build_sinks(settings)
    if not sinks:
        raise click.UsageError(
            "no sink configured: set MIA_ALERTMANAGER_URL, MIA_PAGERDUTY_ROUTING_KEY, MIA_SLACK_WEBHOOK_URL,"
            " MIA_WEBHOOK_URL, MIA_OCSF_FILE, MIA_OCSF_TOPIC or MIA_GRAFANA_URL and MIA_GRAFANA_TOKEN"
        )
    notification = connectivity_check(datetime.now(UTC), settings.dashboard.url)
    failed = 0
    for sink in sinks:
        try:
            sink.deliver(notification)
        except DeliveryError as exc:
            failed += 1
            stdout.print(f"{sink.name}: FAILED: {visible(str(exc))}", highlight=False)
        else:
            stdout.print(f"{sink.name}: delivered", highlight=False)
        finally:
            sink.close()
    if failed:
        raise RuntimeFailure(f"{failed} of {len(sinks)} sinks did not take the test notification")


@alerts_group.command("outbox")
@click.option("--status", type=click.Choice(["pending", "delivered", "failed"]), help="Only this status.")
@click.option("--sink", help="Only this sink (alertmanager, pagerduty, slack, webhook, ocsf-file, ...).")
@LIMIT_OPTION
@FORMAT_OPTION
@click.pass_context
def alerts_outbox(ctx: click.Context, status: str | None, sink: str | None, limit: int, fmt: str) -> None:
    """List queued notifications per sink with their delivery state, newest first."""
    from detector.service import open_engine
    from detector.storage import OutboxStore

    with OutboxStore(open_engine(_settings(ctx), migrate=True)) as outbox:
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
    _print_rows(rows, fmt, columns, "notifications")


@alerts_group.command("redeliver")
@click.option("--sink", help="Only this sink's failed notifications.")
@click.pass_context
def alerts_redeliver(ctx: click.Context, sink: str | None) -> None:
    """Queue failed notifications again (after fixing what the receiver rejected)."""
    from detector.service import open_engine
    from detector.storage import OutboxStore

    with OutboxStore(open_engine(_settings(ctx), migrate=True)) as outbox:
        count = outbox.retry_failed(sink)
    stderr.print(f"{count} notifications queued again")


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


def exported_models() -> dict[str, type[BaseModel]]:
    """Every model whose JSON Schema is published in `schemas/`, by file stem."""
    from detector.alerts.notification import Notification
    from detector.model import SCHEMA_MODELS

    return {**SCHEMA_MODELS, "notification": Notification}


@app.group("schemas")
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
    from detector.model import export_json_schemas

    for path in export_json_schemas(out, exported_models()):
        stderr.print(f"wrote {path}")


# -- Grafana dashboards --------------------------------------------------------------------------------------


@app.group("dashboards")
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
    from detector.dashboards import FOLDER_TITLE, build_dashboards
    from detector.dashboards.grafana import GrafanaClient, GrafanaError
    from detector.dashboards.push import postgres_datasource, prometheus_datasource, push

    settings = _settings(ctx)
    url = url or settings.grafana.url
    if not url:
        raise click.UsageError("say where Grafana is: --url or MIA_GRAFANA_URL")
    if settings.grafana.token is None:
        raise click.UsageError("set MIA_GRAFANA_TOKEN to a Grafana service-account token (role Admin)")
    try:
        client = GrafanaClient(
            url,
            settings.grafana.token.get_secret_value(),
            timeout=settings.alerts.timeout_seconds,
            verify=settings.grafana.verify_tls,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--url") from None
    postgres_options = (postgres_host, postgres_database, postgres_user, postgres_sslmode)
    # The password too comes from the environment (or the settings file), never an option: `ps` shows those.
    password = settings.grafana.postgres_password
    prometheus = prometheus_datasource(prometheus_url or "http://localhost:9090")
    postgres = postgres_datasource(
        postgres_host or "localhost:5432",
        postgres_database or "mia",
        postgres_user or "grafana_reader",
        password=password.get_secret_value() if password is not None else None,
        sslmode=postgres_sslmode or "require",
    )
    datasources = [
        dataclasses.replace(prometheus, update_existing=prometheus_url is not None),
        dataclasses.replace(
            postgres, update_existing=any(option is not None for option in (*postgres_options, password))
        ),
    ]
    try:
        report = push(client, build_dashboards(), datasources, FOLDER_TITLE)
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


# -- entry point ---------------------------------------------------------------------------------------------


def _fail(message: str, code: int) -> None:
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    # Errors may quote what they failed on: a client id given on the command line, a value from a record.
    stderr.print(f"mia-detector: error: {visible(first_line)}", highlight=False, soft_wrap=True)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the command; turn known failures into one-line errors."""
    from kafka.errors import KafkaError
    from sqlalchemy.exc import SQLAlchemyError

    from detector.broker import BrokerError
    from detector.ingest.kafka_connect import KafkaUnreachable
    from detector.scoring.model import ModelError
    from detector.storage.errors import StorageError, describe

    try:
        code = app.main(args=argv, prog_name="mia-detector", standalone_mode=False)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except click.ClickException as exc:
        _fail(exc.format_message(), 2)
    except (ConfigError, ModelError) as exc:
        _fail(str(exc), 2)
    except (BrokerError, RuntimeFailure, KafkaUnreachable) as exc:
        _fail(str(exc), 1)
    except KafkaError as exc:
        _fail(f"Kafka: {exc}", 1)
    except StorageError as exc:
        _fail(f"database: {exc}", 1)
    except SQLAlchemyError as exc:
        _fail(f"database: {describe(exc)}", 1)
    except OSError as exc:
        _fail(str(exc), 1)
    raise SystemExit(code if isinstance(code, int) else 0)
