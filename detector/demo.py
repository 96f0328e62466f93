"""The demo: simulated traffic, a model trained on its benign baseline, the stream through a local broker into
the daemon (alerts shown as they open), and the evaluation of what it caught against the ground truth."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from detector.alerts.sinks import configured_sink_names
from detector.broker import EmbeddedBroker
from detector.evaluate import Evaluation, evaluate
from detector.pipeline import AlertListener, PipelineStats
from detector.protocols import index_training_sets, train_as_operator
from detector.service import StopFlag, produce_file, run_daemon
from detector.settings import Settings
from detector.simulate import SimulationSummary, simulate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoResult:
    """What the demo did: the simulation, where the broker ran, what the daemon processed, how well it did."""

    simulation: SimulationSummary
    database: Path
    bootstrap_servers: str
    produced: int
    stats: PipelineStats
    evaluation: Evaluation
    sinks: list[str]
    findings: Path | None


def run_demo(
    settings: Settings,
    workdir: Path,
    scenario: str,
    seed: int,
    idle_exit_seconds: float,
    stop: StopFlag,
    alerts: AlertListener | None = None,
) -> DemoResult:
    """Simulate `scenario`, train on its baseline, stream its events through an embedded broker into the
    daemon until idle (or SIGINT/SIGTERM), then evaluate the detector on the same events.

    The daemon writes to a fresh SQLite database in `workdir` (`demo.db`): the same seed gives the same
    event ids, which a database that saw them before would skip as already processed.
    """
    database = workdir / "demo.db"
    for stale in workdir.glob("demo.db*"):
        stale.unlink()
    settings = settings.model_copy(
        update={"database": settings.database.model_copy(update={"url": SecretStr(f"sqlite:///{database}")})}
    )
    findings: Path | None = None
    if not configured_sink_names(settings):
        # Notifications go somewhere real even on a laptop: OCSF findings in a file, as a SIEM would read.
        findings = workdir / "findings.jsonl"
        findings.unlink(missing_ok=True)
        settings = settings.model_copy(update={"ocsf": settings.ocsf.model_copy(update={"file": findings})})
    simulation = simulate(scenario, seed, workdir / "scenario")
    log.info("simulated %s: %d records from %d clients", scenario, simulation.records, simulation.clients)
    indexes = index_training_sets(simulation.out, workdir / "indexes")
    indexed = settings.model_copy(update={"training_index": indexes})
    trained, _ = train_as_operator(indexed, simulation.out / "baseline.jsonl", workdir / "model")
    with EmbeddedBroker(log_file=workdir / "broker.log") as broker:
        local = trained.model_copy(
            update={"kafka": trained.kafka.model_copy(update={"bootstrap_servers": broker.bootstrap_servers})}
        )
        topic = local.kafka.topics[0]
        produced = produce_file(local, simulation.out / "events.jsonl", topic)
        log.info("produced %d records to %s on %s; consuming", produced, topic, broker.bootstrap_servers)
        stats = run_daemon(local, stop, idle_exit_seconds=idle_exit_seconds, alerts=alerts)
    evaluation = evaluate(
        trained, simulation.out / "events.jsonl", simulation.out / "truth.jsonl", workdir / "evaluation"
    )
    return DemoResult(
        simulation,
        database,
        broker.bootstrap_servers,
        produced,
        stats,
        evaluation,
        configured_sink_names(settings),
        findings,
    )
