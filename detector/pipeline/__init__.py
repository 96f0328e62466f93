"""The processing chain (`steps`: Decode, Deduplicate, Restore, Sessionize, Detect) and its commit point
(`chain`): the only package that knows every step."""

from detector.pipeline.chain import (
    AlertListener,
    CommitPolicy,
    DeadLetterPublisher,
    Outbox,
    OutboxFull,
    Outputs,
    Pipeline,
    PipelineStats,
    PositionCommitter,
)
from detector.pipeline.steps import (
    Batch,
    DecodeStep,
    DeduplicateStep,
    DetectStep,
    RestoreStep,
    SessionizeStep,
    Step,
    record_digest,
)

__all__ = [
    "AlertListener",
    "Batch",
    "CommitPolicy",
    "DeadLetterPublisher",
    "DecodeStep",
    "DeduplicateStep",
    "DetectStep",
    "Outbox",
    "OutboxFull",
    "Outputs",
    "Pipeline",
    "PipelineStats",
    "PositionCommitter",
    "RestoreStep",
    "SessionizeStep",
    "Step",
    "record_digest",
]
