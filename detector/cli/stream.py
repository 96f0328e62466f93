"""Streaming commands: `run` (the daemon), `replay`, `produce`, `broker` and `demo`."""

from __future__ import annotations

import logging
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from detector.cli.context import RuntimeFailure, settings_of
from detector.cli.evaluation import print_evaluation
from detector.cli.models import SCENARIO_NAMES
from detector.cli.output import progress, stderr

if TYPE_CHECKING:
    from detector.alerts.alert_log import AlertLog
    from detector.settings import Settings

log = logging.getLogger("detector")


@click.command("run")
@click.option("--topic", "-t", "topics", multiple=True, help="Topic to consume (repeatable).")
@click.option("--group-id", help="Consumer group id.")
@click.option(
    "--exit-when-idle",
    type=click.FloatRange(min=0.1),
    help="Stop once no record came for this many seconds and none is left to read on the topics' "
    "partitions (those other members of the group hold included).",
)
@click.pass_context
def run(
    ctx: click.Context, topics: tuple[str, ...], group_id: str | None, exit_when_idle: float | None
) -> None:
    """Consume query logs from Kafka, process them and commit, until SIGTERM or SIGINT."""
    from detector.service.daemon import run_daemon
    from detector.service.stop import StopFlag

    settings = settings_of(ctx, kafka={"topics": list(topics) or None, "group_id": group_id})
    stop = StopFlag()
    with stop.on_signals():
        stats = run_daemon(settings, stop, idle_exit_seconds=exit_when_idle, alerts=_alert_log(settings))
    log.info("stopped: %s", stats.summary())


@click.command("replay")
@click.argument("files", nargs=-1, required=True)
@click.pass_context
def replay(ctx: click.Context, files: tuple[str, ...]) -> None:
    """Process JSON Lines files exactly as the daemon processes a topic."""
    from detector.ingest.jsonl import total_bytes
    from detector.service.replay import replay as replay_files

    for name in files:
        if name != "-" and not Path(name).is_file():
            raise click.BadParameter(f"no such file: {name}", param_hint="FILES")
    settings = settings_of(ctx)
    with progress("replaying", total_bytes(files), unit_bytes=True) as advance:
        stats = replay_files(settings, files, progress=advance, alerts=_alert_log(settings))
    log.info("replayed: %s", stats.summary())


@click.command("produce")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--topic", "-t", required=True, help="Destination topic.")
@click.option(
    "--partitions",
    type=click.IntRange(min=1),
    help="Create the topic with this many partitions when it is absent (the brokers' default replication "
    "factor); an existing topic is left as it is.",
)
@click.pass_context
def produce(ctx: click.Context, file: Path, topic: str, partitions: int | None) -> None:
    """Publish a JSON Lines file into a topic, one message a line, keyed by client id."""
    from detector.kafka import ensure_topic, message_limit
    from detector.service.produce import LinesNotSent, produce_file

    settings = settings_of(ctx)
    if partitions is not None:
        # Records as large as the detector reads (`ingest.max_record_bytes`), above the brokers' default.
        configs = {"max.message.bytes": str(message_limit(settings.ingest.max_record_bytes))}
        layout = ensure_topic(settings.kafka, topic, partitions, configs=configs)
        if layout.created:
            log.info("created topic %s with %d partitions", topic, layout.partitions)
        elif layout.partitions != partitions:
            log.warning(
                "topic %s exists with %d partitions, not %d: left as it is",
                topic,
                layout.partitions,
                partitions,
            )
    with progress("producing", None, unit_bytes=False) as advance:
        try:
            sent = produce_file(settings, file, topic, progress=advance)
        except LinesNotSent as refused:
            raise RuntimeFailure(str(refused)) from None
    stderr.print(f"produced {sent} records to {topic} at {settings.kafka.bootstrap_servers}")


@click.command("broker")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=9092, show_default=True, help="Port on 127.0.0.1."
)
def broker(port: int) -> None:
    """Run the embedded Kafka-protocol broker (tansu, memory storage) in the foreground."""
    from detector.broker import EmbeddedBroker
    from detector.service.stop import StopFlag

    stop = StopFlag()
    with stop.on_signals(), EmbeddedBroker(port=port) as running:
        stderr.print(f"broker listening on {running.bootstrap_servers} (memory storage; Ctrl-C stops it)")
        while not stop and running.running:
            time.sleep(0.2)
        if not running.running:
            raise RuntimeFailure("the broker exited")


@click.command("demo")
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
    from detector.service.stop import StopFlag

    settings = settings_of(ctx, kafka={"session_timeout_ms": 6000})
    stop = StopFlag()
    with stop.on_signals():
        result = run_demo(
            settings,
            workdir,
            scenario,
            seed,
            idle_seconds,
            stop,
            alerts=_alert_log(settings),
        )
    stderr.print(
        f"{result.simulation.scenario}: {result.produced} records streamed through the broker at "
        f"{result.bootstrap_servers}; daemon: {result.stats.summary()}",
        highlight=False,
    )
    print_evaluation(result.evaluation)
    if result.findings is not None:
        stderr.print(f"notifications as OCSF findings: {result.findings}", highlight=False, soft_wrap=True)
    else:
        stderr.print(f"notifications delivered to: {', '.join(result.sinks)}", highlight=False)
    stderr.print(
        f"the daemon's sessions and alerts are in {result.database}: "
        f"MIA_DATABASE_URL=sqlite:///{result.database} {_this_command()} alerts list",
        highlight=False,
        soft_wrap=True,
    )


def _alert_log(settings: Settings) -> AlertLog:
    """The log of the alerts found, paging as the lifecycle of `settings` notifies (its minimum severity,
    its canaries)."""
    from detector.alerts.alert_log import AlertLog
    from detector.alerts.lifecycle import NotificationPolicy
    from detector.alerts.sinks import configured_sink_names

    return AlertLog(NotificationPolicy.from_settings(settings, configured_sink_names(settings)))


COMMANDS = [run, replay, produce, broker, demo]


def _this_command() -> str:
    """The command as it was run, for a hint to paste: its path when run by path (`.venv/bin/mia-detector`
    from `make run`), else `mia-detector`."""
    program = sys.argv[0]
    return shlex.quote(program) if Path(program).name == "mia-detector" else "mia-detector"
