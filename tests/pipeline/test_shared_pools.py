"""Sybil pools shared between the members of a consumer group: a campaign whose keys are spread over
partitions owned by two members (two pipelines on one database, committing in turn as two replicas do) is
alerted on once, naming keys of both, as one process alerts on it once; on SQLite and PostgreSQL."""

from __future__ import annotations

import time
import zlib
from datetime import datetime
from pathlib import Path

import numpy as np
import orjson
import pytest

from detector.domain import Alert, AlertKind, Origin, RawRecord
from detector.metrics import Metrics
from detector.protocols import index_training_sets
from detector.service import build_pipeline
from detector.simulate.sample import START, oip_record, sample_records
from detector.storage import open_store
from tests.support import make_settings

MODEL = "credit-risk"  # the model of `sample_records`
DIM = 30
# Four keys from one /24, two distinct training records each: 8 hits, past the training-set rule's floor
# of 5 together; the two keys of one member hold 4, below it.
SYBILS = [f"sybil-{index}" for index in range(4)]
ROUND = 50  # records read by the members between two commits


def event_time(line: bytes) -> float:
    stamp = orjson.loads(line)["timestamp"]
    return float(stamp) if isinstance(stamp, int | float) else datetime.fromisoformat(stamp).timestamp()


def stream(training: np.ndarray) -> list[bytes]:
    """Benign records (their own random rows) and the sybils' records (two training rows each among eight
    of their own), in event-time order."""
    rng = np.random.default_rng(3)
    timed = [(event_time(line), line) for line in sample_records(clients=20, events=800, dim=DIM)]
    probabilities = np.array([[0.4, 0.6]], dtype=np.float32)
    for index, client in enumerate(SYBILS):
        rows = [training[2 * index], training[2 * index + 1], *rng.normal(size=(8, DIM)).astype(np.float32)]
        for step, row in enumerate(rows):
            at = START + 600.0 + 240.0 * step + 13.0 * index
            record = oip_record(f"{client}-{step}", at, client, row[None, :], probabilities, model=MODEL)
            record["client"]["ip"] = f"198.51.100.{10 + index}"
            timed.append((at, orjson.dumps(record)))
    return [line for _, line in sorted(timed)]


def owner(line: bytes, members: int) -> int:
    """The member whose partition holds the record's client: the sybils alternate, the rest by hash."""
    client = orjson.loads(line)["client"]["id"]
    return SYBILS.index(client) % members if client in SYBILS else zlib.crc32(client.encode()) % members


def coordinated(url: str, index: Path, lines: list[bytes], members: int) -> list[Alert]:
    """Read `lines` with `members` pipelines on the database at `url`, each its clients' records, a round of
    `ROUND` records at a time (each member commits after each of its batches); the coordinated alerts."""
    settings = make_settings(url, commit={"min_records": 1}).model_copy(update={"training_index": index})
    with open_store(settings) as store:
        pipelines = [build_pipeline(settings, store, Metrics(), group_id="detectors") for _ in range(members)]
        offsets = [0] * members
        for start in range(0, len(lines), ROUND):
            for member, pipeline in enumerate(pipelines):
                mine = [line for line in lines[start : start + ROUND] if owner(line, members) == member]
                origin = [Origin("kafka", "logs", member, offsets[member] + n) for n in range(len(mine))]
                offsets[member] += len(mine)
                if mine:
                    pipeline.submit(
                        [
                            RawRecord(line, None, at, time.time())
                            for line, at in zip(mine, origin, strict=True)
                        ]
                    )
        for pipeline in pipelines:
            pipeline.flush()
        return [a for a in store.alerts.list_alerts(limit=None) if a.kind is AlertKind.COORDINATED_CLIENTS]


@pytest.fixture
def training_index(tmp_path: Path) -> tuple[np.ndarray, Path]:
    training = np.random.default_rng(11).normal(size=(40, DIM)).astype(np.float32)
    np.save(tmp_path / f"training-{MODEL}.npy", training)
    return training, index_training_sets(tmp_path, tmp_path / "indexes")


def test_a_campaign_split_over_two_members_is_alerted_once_naming_keys_of_both(
    database_url: str, tmp_path: Path, training_index: tuple[np.ndarray, Path]
) -> None:
    training, index = training_index
    lines = stream(training)
    [alone] = coordinated(f"sqlite:///{tmp_path / 'one.db'}", index, lines, members=1)
    split = coordinated(database_url, index, lines, members=2)

    assert len(split) == 1, [alert.client_ids for alert in split]
    [alert] = split
    assert {owner_of for owner_of in (SYBILS.index(client) % 2 for client in alert.client_ids)} == {0, 1}
    assert set(alert.client_ids) <= set(SYBILS) and alert.score >= 5
    assert alert.dedup_key == alone.dedup_key == f"{MODEL}|group:198.51.100.0/24|coordinated_clients"
    assert set(alone.client_ids) <= set(SYBILS) and alone.score >= 5
