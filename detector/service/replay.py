"""`replay`: JSON Lines files through the pipeline, exactly as the daemon processes a topic."""

from __future__ import annotations

from collections.abc import Sequence

from detector.alerts.dispatcher import RetryPolicy
from detector.domain import Backpressure
from detector.ingest.jsonl import FileSource
from detector.metrics import Metrics
from detector.pipeline import AlertListener, DetectStep, Outputs, PipelineStats
from detector.service.consume import Pressure, Progress, consume
from detector.service.process import prepare_process
from detector.service.stop import StopFlag
from detector.service.wiring import build_pipeline, persisting
from detector.settings import Settings


def replay(
    settings: Settings,
    paths: Sequence[str],
    progress: Progress | None = None,
    metrics: Metrics | None = None,
    alerts: AlertListener | None = None,
    detect: DetectStep | None = None,
) -> PipelineStats:
    """Process JSON Lines files (or stdin, `-`) to the end, exactly as the daemon would process a topic,
    alert notifications included. A database outage or a full outbox is waited out."""
    prepare_process()
    metrics = metrics or Metrics()
    retry = RetryPolicy(settings.database.retry_initial_seconds, settings.database.retry_max_seconds)
    with persisting(settings, metrics) as (store, dispatcher):
        pipeline = build_pipeline(
            settings, store, metrics, outputs=Outputs(alerts=alerts, outbox=dispatcher), detect=detect
        )
        pressure = Pressure(retry, metrics)
        source = FileSource(
            paths, settings.kafka.max_poll_records, max_line_bytes=settings.ingest.max_record_bytes
        )
        try:
            consume(source, pipeline, pressure, StopFlag(), progress=progress)
        finally:
            source.close()
        while True:
            try:
                pipeline.flush()
            except Backpressure as cause:
                pressure.applied(cause, pipeline)
                pressure.wait_until_due()
            else:
                pressure.relieved()
                return pipeline.stats
