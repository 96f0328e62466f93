"""The demo: an embedded broker, a sample stream produced into it, and the daemon consuming it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from detector.broker import EmbeddedBroker
from detector.pipeline import PipelineStats
from detector.service import StopFlag, produce_file, run_daemon
from detector.settings import Settings
from detector.simulate.sample import write_sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoResult:
    """What the demo did: where the broker ran, what was produced, what the daemon processed."""

    bootstrap_servers: str
    sample_file: Path
    produced: int
    stats: PipelineStats


def run_demo(
    settings: Settings, workdir: Path, events: int, idle_exit_seconds: float, stop: StopFlag
) -> DemoResult:
    """Start a local broker, produce `events` sample records into the first topic, consume them to the end.

    The daemon runs with `settings` (database, sessions, limits) but against the embedded broker, and stops
    once the stream has been idle for `idle_exit_seconds` (or on SIGINT/SIGTERM).
    """
    sample = workdir / "sample-stream.jsonl"
    write_sample(sample, clients=60, events=events, malformed_every=199)
    with EmbeddedBroker(log_file=workdir / "broker.log") as broker:
        local = settings.model_copy(
            update={
                "kafka": settings.kafka.model_copy(update={"bootstrap_servers": broker.bootstrap_servers})
            }
        )
        topic = local.kafka.topics[0]
        log.info(
            "embedded broker on %s; producing %d sample records to %s",
            broker.bootstrap_servers,
            events,
            topic,
        )
        produced = produce_file(local, sample, topic)
        stats = run_daemon(local, stop, idle_exit_seconds=idle_exit_seconds)
    return DemoResult(broker.bootstrap_servers, sample, produced, stats)
