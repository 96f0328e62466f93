"""`train`: fit the scoring model on baseline traffic."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from detector.domain import InvalidRecord, Query
from detector.features.client import FeatureTracker
from detector.features.embedding import QueryEmbedder
from detector.ingest.decode import RecordDecoder
from detector.ingest.jsonl import read_jsonl_batches
from detector.scoring.calibrate import fit_scoring_model
from detector.scoring.model import ScoringModel
from detector.scoring.rules import load_rules
from detector.service.process import prepare_process
from detector.service.wiring import load_training_indexes
from detector.settings import Settings


def decoded_batches(settings: Settings, paths: Sequence[str]) -> Iterator[list[Query]]:
    """The queries of JSON Lines files, one list per read batch; undecodable records are skipped (counted
    nowhere: use `replay` to see them as dead letters)."""
    decoder = RecordDecoder(settings.ingest.for_datasets())
    for batch in read_jsonl_batches(paths, settings.kafka.max_poll_records):
        queries: list[Query] = []
        for record in batch:
            try:
                queries.extend(decoder.decode(record))
            except InvalidRecord:
                continue
        yield queries


def train(settings: Settings, paths: Sequence[str], target_fpr: float, out: Path) -> ScoringModel:
    """Fit the scoring model on baseline traffic and save it to `out` (a directory).

    Allow-listed clients are left out of the calibration: they are silenced anyway, and one known-benign
    outlier (a nightly job scoring the training set) would otherwise set a rule's threshold by itself.
    """
    prepare_process()
    tracker = FeatureTracker(QueryEmbedder(), load_training_indexes(settings), max_clients=10_000_000)
    allowed = {entry.client_id for entry in settings.detection.allowlist}
    model = fit_scoring_model(
        decoded_batches(settings, paths),
        tracker,
        load_rules(settings.detection.rules_path),
        target_fpr,
        excluded=allowed.__contains__,
    )
    model.save(out)
    return model
