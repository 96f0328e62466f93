"""`train`: fit the scoring model on baseline traffic."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from detector.allowlists import allowlist_document
from detector.domain import AlertKind, AllowEntry, InvalidRecord, Query
from detector.features.client import FeatureTracker
from detector.features.embedding import QueryEmbedder
from detector.ingest.decode import RecordDecoder
from detector.ingest.jsonl import read_jsonl_batches
from detector.scoring.calibrate import Calibration, FloorCrossing, fit_scoring_model
from detector.scoring.rules import load_rules
from detector.service.process import prepare_process
from detector.service.wiring import load_training_indexes
from detector.settings import Settings


def decoded_batches(settings: Settings, paths: Sequence[str]) -> Iterator[list[Query]]:
    """The queries of JSON Lines files, one list per read batch; undecodable records are skipped (counted
    nowhere: use `replay` to see them as dead letters)."""
    decoder = RecordDecoder(settings.ingest.for_datasets())
    limit = settings.ingest.max_record_bytes
    for batch in read_jsonl_batches(paths, settings.kafka.max_poll_records, max_line_bytes=limit):
        queries: list[Query] = []
        for record in batch:
            try:
                queries.extend(decoder.decode(record))
            except InvalidRecord:
                continue
        yield queries


SUGGESTED_ALLOWLIST_FILE = "suggested-allowlist.toml"


def train(settings: Settings, paths: Sequence[str], target_fpr: float, out: Path) -> Calibration:
    """Fit the scoring model on baseline traffic and save it to `out` (a directory), with the allow-list
    `train` suggests beside it (`SUGGESTED_ALLOWLIST_FILE`, see `suggested_allowlist`).

    Allow-listed clients are left out of the calibration: they are silenced anyway. So, rule by rule, are
    the few clients that would fire a rule at its floor (`detector.scoring.model.floor_outliers`): they are
    the suggestions, for an operator to review.
    """
    prepare_process()
    tracker = FeatureTracker(QueryEmbedder(), load_training_indexes(settings), max_clients=10_000_000)
    allowed = {entry.client_id for entry in settings.detection.allowlist}
    calibration = fit_scoring_model(
        decoded_batches(settings, paths),
        tracker,
        load_rules(settings.detection.rules_path),
        target_fpr,
        excluded=allowed.__contains__,
    )
    calibration.model.save(out)
    (out / SUGGESTED_ALLOWLIST_FILE).write_text(suggested_allowlist(calibration), encoding="utf-8")
    return calibration


def suggested_allowlist(calibration: Calibration) -> str:
    """An allow-list file (`detector.allowlists`) with one entry per (client, alert kind) left out of a
    rule's calibration, its reason naming the rule, the value reached and the evidence events."""
    by_entry: dict[tuple[str, AlertKind], list[FloorCrossing]] = {}
    for crossing in calibration.crossings:
        by_entry.setdefault((crossing.client_id, crossing.kind), []).append(crossing)
    entries, notes = [], []
    for (client_id, kind), crossings in sorted(
        by_entry.items(), key=lambda item: (item[0][0], item[0][1].value)
    ):
        found = "; ".join(
            f"{c.rule} reached {c.value:g} (floor {c.floor:g}) on model {c.model}, "
            f"events {', '.join(c.evidence)}"
            for c in crossings
        )
        entries.append(AllowEntry(client_id, f"suggested by train: in the baseline, {found}", kind))
        notes.append(f"{client_id} / {kind.value}")
    header = [
        f"Suggested by `mia-detector train` for model {calibration.model.version}:",
        "baseline clients that would fire a rule at its floor. They did not lift that rule's threshold:",
        "live, they would be alerted on.",
        "Review each entry (a job of the model owner? a batch scorer? or an attacker in the baseline?),",
        "delete the ones you do not trust, and load the file with MIA_DETECTION_ALLOWLIST_FILE.",
    ]
    if not entries:
        header.append("No baseline client was left out of calibration: nothing to suggest.")
    return allowlist_document(entries, header, notes)
