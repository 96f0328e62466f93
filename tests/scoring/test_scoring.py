"""Rules as reviewed data, the scoring model (fit, thresholds, safe loading) and the decisions taken."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from detector.domain import AlertKind, Detection, Origin, Query, RawRecord, Requested, Severity
from detector.features.client import ClientFeatures, FeatureTracker, TrainingIndexes
from detector.features.probing import RECENT_FLIPS_KEPT
from detector.ingest.decode import RecordDecoder
from detector.scoring.detector import Detector, Moment
from detector.scoring.model import FOREST_FILE, MANIFEST_FILE, ModelError, ScoringModel, _manifest_hash
from detector.scoring.profiles import ClientProfile
from detector.scoring.rules import load_rules
from detector.settings import IngestSettings
from tests.streams import (
    SetIndex,
    Stream,
    augmentation_probe,
    boundary_walk,
    confidence_climb,
    harvest,
    rare_flips,
    record,
    rng,
    warmed_tracker,
)

RULES = load_rules()


def client_after(queries: list[Query], tracker: FeatureTracker | None = None) -> ClientFeatures:
    tracker = tracker or warmed_tracker()
    for start in range(0, len(queries), 50):
        tracker.update(queries[start : start + 50])
    client = tracker.get((queries[0].model, queries[0].client_id))
    assert client is not None
    return client


def fired_on(detector: Detector, key: tuple[str, str], client: ClientFeatures) -> list[Detection]:
    """The detections that fired on `client` judged now, on its latest query."""
    return [d for d in detector.evaluate(Moment.of(key, client, client.last_seen)) if d.fired]


def benign_clients() -> dict[str, ClientFeatures]:
    """Traffic of the benign habits that resemble attacks, one client each."""
    clients = {}
    retry = Stream("retry-storm")
    clients["retry"] = client_after(
        [retry.query(row, gap=0.1) for row in (record() for _ in range(30)) for _ in range(6)]
    )
    analyst, base = Stream("what-if"), record()
    edits = []
    for step in range(80):
        row = base.copy()
        row[step % 2] *= 1.0 + 0.01 * step
        edits.append(analyst.query(row, label=str(step % 2)))
    clients["what-if"] = client_after(edits)
    dashboard, shown = Stream("dashboard"), [record() for _ in range(5)]
    clients["dashboard"] = client_after([dashboard.query(row, gap=60) for _ in range(40) for row in shown])
    steady = Stream("steady")
    clients["steady"] = client_after(
        [steady.query(record(), requested=Requested.LABEL, gap=30) for _ in range(150)]
    )
    return clients


def test_every_rule_is_complete_reviewed_data() -> None:
    feature_names = set(ClientFeatures().snapshot())
    assert {rule.kind for rule in RULES} >= {
        AlertKind.BOUNDARY_PROBING,
        AlertKind.AUGMENTATION_PROBING,
        AlertKind.TRAINING_SET_TARGETING,
        AlertKind.CONFIDENCE_HARVESTING,
    }
    for rule in RULES:
        assert rule.atlas == "AML.T0024"
        assert len(rule.triage) > 100 and rule.known_false_positives and rule.references
        assert rule.floor > 0, "a rule must never act on no evidence"
        assert rule.score in feature_names
        assert set(rule.requires) <= feature_names and set(rule.explain) <= feature_names
        assert rule.score in rule.explain
    # Severity follows how direct the evidence of membership inference is.
    severity = {rule.kind: rule.severity for rule in RULES}
    assert severity[AlertKind.TRAINING_SET_TARGETING].rank >= severity[AlertKind.BOUNDARY_PROBING].rank
    assert severity[AlertKind.BOUNDARY_PROBING].rank > severity[AlertKind.CONFIDENCE_HARVESTING].rank


@pytest.mark.parametrize(
    ("rule_id", "behaviour"),
    [
        ("MIA-001", lambda: boundary_walk(Stream("walker"))),
        # The walk is the behaviour, whatever the API answers: one that always returns probabilities too.
        ("MIA-001", lambda: boundary_walk(Stream("walker"), requested=Requested.PROBABILITIES)),
        ("MIA-002", lambda: augmentation_probe(Stream("prober"))),
        ("MIA-006", lambda: augmentation_probe(Stream("prober"), records=40, variants=4, in_rounds=True)),
        ("MIA-004", lambda: harvest(Stream("harvester"), records=400)),
    ],
)
def test_each_rule_fires_on_its_behaviour_with_evidence(rule_id: str, behaviour) -> None:  # type: ignore[no-untyped-def]
    queries = behaviour()
    client = client_after(queries)
    detections = fired_on(Detector(RULES), (queries[0].model, queries[0].client_id), client)
    rule = next(rule for rule in RULES if rule.id == rule_id)
    fired = {detection.kind: detection for detection in detections}
    assert rule.kind in fired
    detection = fired[rule.kind]
    assert detection.rule_id == rule_id
    assert detection.score >= detection.threshold
    assert detection.evidence and set(detection.evidence) <= {query.event_id for query in queries}
    assert detection.reasons[0].feature == rule.score
    assert detection.queries == len(queries)


def test_training_set_targeting_fires_on_candidates_from_the_training_set() -> None:
    members = [record() for _ in range(50)]
    tracker = warmed_tracker()
    tracker.training_indexes = TrainingIndexes(default=SetIndex(members))
    stream = Stream("candidate-tester")
    queries = [stream.query(row) for row in members[:25]] + [stream.query(record()) for _ in range(25)]
    detections = fired_on(Detector(RULES), ("m", "candidate-tester"), client_after(queries, tracker))
    assert [d.kind for d in detections] == [AlertKind.TRAINING_SET_TARGETING]
    assert detections[0].severity is Severity.CRITICAL


def harvest_detection(
    detector: Detector, queries: list[Query], tracker: FeatureTracker | None = None
) -> Detection:
    client = client_after(queries, tracker)
    fired = fired_on(detector, (queries[0].model, queries[0].client_id), client)
    return next(detection for detection in fired if detection.kind is AlertKind.CONFIDENCE_HARVESTING)


def shadow_harvest(members: list[np.ndarray], member_share: float) -> tuple[list[Query], FeatureTracker]:
    """400 candidates asked for their probabilities, `member_share` of them training records, spread evenly
    through the harvest (a candidate set is shuffled)."""
    tracker = warmed_tracker()
    tracker.training_indexes = TrainingIndexes(default=SetIndex(members))
    stream, probabilities = Stream("shadow"), np.array([0.7, 0.2, 0.1], dtype=np.float32)
    taken = round(400 * member_share)
    at_member = set(np.linspace(0, 399, taken).round().astype(int).tolist()) if taken else set()
    chosen = iter(members[:taken])
    rows = [next(chosen) if index in at_member else record() for index in range(400)]
    return [stream.query(row, probabilities=probabilities) for row in rows], tracker


def test_harvesting_alone_is_exposure_and_escalates_with_membership_inference_evidence() -> None:
    detector, members = Detector(RULES), [record() for _ in range(400)]
    alone = harvest_detection(detector, harvest(Stream("harvester"), records=400))
    assert alone.severity is Severity.LOW
    assert alone.reasons[0].feature == "confidence.distinct_asked"

    # A tenth of the candidates are training records: beyond chance, a membership-inference candidate set.
    with_members = harvest_detection(detector, *shadow_harvest(members, 0.1))
    assert with_members.severity is Severity.HIGH
    assert with_members.reasons[0].feature == "training.peak_recent_hit_share"

    # Records synthesised by climbing the model's confidence, beside a harvest.
    stream = Stream("synthesiser")
    climbing = harvest_detection(detector, harvest(stream, records=300) + confidence_climb(stream, steps=90))
    assert climbing.severity is Severity.HIGH
    assert climbing.reasons[0].feature == "confidence.climbs"


def test_escalation_asks_for_more_than_the_baselines_usual_rate() -> None:
    """In a deployment where a tenth of every client's records are training records (customers scoring
    themselves), that rate escalates nothing: the minimum in force is the baseline's 90th percentile."""
    trajectories = [
        [{**snapshot, "training.peak_recent_hit_share": 0.25} for snapshot in t]
        for t in baseline_trajectories()
    ]
    model = ScoringModel.fit(trajectories, RULES, target_fpr=0.001, scales={})
    harvest_rule = next(rule for rule in RULES if rule.kind is AlertKind.CONFIDENCE_HARVESTING)
    assert Detector(RULES, model).scorer.escalation(harvest_rule)["training.peak_recent_hit_share"] == 0.25
    members = [record() for _ in range(400)]
    assert harvest_detection(Detector(RULES, model), *shadow_harvest(members, 0.1)).severity is Severity.LOW
    assert harvest_detection(Detector(RULES, model), *shadow_harvest(members, 0.5)).severity is Severity.HIGH


def test_a_rule_that_escalates_says_to_what_and_above_its_own_severity() -> None:
    harvest_rule = next(rule for rule in RULES if rule.kind is AlertKind.CONFIDENCE_HARVESTING)
    with pytest.raises(ValueError, match="go together"):
        replace(harvest_rule, escalated_severity=None)
    with pytest.raises(ValueError, match="above low"):
        replace(harvest_rule, escalated_severity=Severity.LOW)


def test_benign_look_alikes_stay_quiet() -> None:
    detector = Detector(RULES)
    for name, client in benign_clients().items():
        assert fired_on(detector, ("m", name), client) == [], name


def test_a_busy_clients_rare_flips_never_add_up_to_a_boundary_walk() -> None:
    client = client_after(rare_flips(Stream("busy-app"), flips=10))
    values = client.snapshot()
    assert values["probing.flips"] == 10 and values["probing.dense_variants"] == 10  # a lifetime's worth
    assert fired_on(Detector(RULES), ("m", "busy-app"), client) == []


def test_a_key_with_a_long_ordinary_history_is_caught_probing_as_a_new_key_is() -> None:
    stream = Stream("compromised")
    # Months of an app's ordinary queries (labels only: harvesting confidence is another rule's business).
    history = [stream.query(record(), requested=Requested.LABEL, gap=20) for _ in range(4_000)]
    probe = augmentation_probe(stream)  # then 12 records in bursts of 8 copies
    client = client_after(history + probe)
    assert client.snapshot()["probing.burst_share"] < 0.005  # a lifetime's share: diluted far below a pace
    detections = fired_on(Detector(RULES), ("m", "compromised"), client)
    assert [(d.kind, d.rule_id) for d in detections] == [(AlertKind.AUGMENTATION_PROBING, "MIA-002")]
    assert set(detections[0].evidence) <= {query.event_id for query in probe}


def near_copies(count: int) -> tuple[list[np.ndarray], FeatureTracker]:
    """`count` training records, and a tracker whose index finds them as noisy copies of training records
    (near hits: MIA-005's exact copies are not what these tests are about)."""
    members = [record() for _ in range(count)]
    tracker = warmed_tracker()
    tracker.training_indexes = TrainingIndexes(default=SetIndex(members, near=True))
    return members, tracker


def test_a_key_with_a_long_ordinary_history_is_caught_sending_training_records_as_a_new_key_is() -> None:
    members, tracker = near_copies(60)
    stream = Stream("compromised")
    history = [stream.query(record(), requested=Requested.LABEL, gap=20) for _ in range(4_000)]
    # Then 60 training records, each behind an ordinary query of the key's owner.
    candidates = [stream.query(row, requested=Requested.LABEL) for row in members]
    owner = [stream.query(record(), requested=Requested.LABEL) for _ in members]
    attack = [query for pair in zip(owner, candidates, strict=True) for query in pair]
    client = client_after(history + attack, tracker)
    assert client.snapshot()["training.hit_rate"] < 0.1  # a lifetime's share: diluted below the guard
    detections = fired_on(Detector(RULES), ("m", "compromised"), client)
    assert [(d.kind, d.rule_id) for d in detections] == [(AlertKind.TRAINING_SET_TARGETING, "MIA-003")]
    assert set(detections[0].evidence) <= {query.event_id for query in candidates}


def test_chance_near_hits_of_a_busy_client_never_make_a_share_of_training_records() -> None:
    members, tracker = near_copies(200)
    stream = Stream("busy-app")
    # One record in a hundred meets a training record by chance: more than the index's held-out rate.
    chosen = iter(members)
    rows = [next(chosen) if index % 100 == 50 else record() for index in range(20_000)]
    client = client_after([stream.query(row, requested=Requested.LABEL) for row in rows], tracker)
    values = client.snapshot()
    assert values["training.distinct_hits"] == 200 and values["training.peak_recent_hit_share"] < 0.1
    assert fired_on(Detector(RULES), ("m", "busy-app"), client) == []


def test_a_busy_clients_chance_bursts_never_add_up_to_augmentation_probing() -> None:
    stream, queries = Stream("busy-app"), []
    for _ in range(
        12
    ):  # a burst of near-copies by chance every 600 queries: a lifetime's worth, never a pace
        queries += [stream.query(record(), requested=Requested.LABEL) for _ in range(600)]
        base = record()
        queries += [
            stream.query(base + 0.01 * row, requested=Requested.LABEL) for row in (record() for _ in range(3))
        ]
    client = client_after(queries)
    values = client.snapshot()
    assert values["probing.burst_clusters"] == 12 and values["probing.peak_recent_bursts"] == 2
    assert fired_on(Detector(RULES), ("m", "busy-app"), client) == []


def test_monitoring_that_re_scores_a_few_entities_in_short_runs_is_not_augmentation_probing() -> None:
    stream, entities, queries = Stream("monitoring"), [record() for _ in range(4)], []
    for _ in range(8):  # a session every 100 queries: three fresh readings of each entity, back to back
        for entity in entities:
            readings = [entity * rng.uniform(0.99, 1.01, entity.shape).astype(np.float32) for _ in range(3)]
            queries += [stream.query(reading, requested=Requested.LABEL) for reading in readings]
        queries += [stream.query(record(), requested=Requested.LABEL) for _ in range(100)]
    client = client_after(queries)
    assert client.snapshot()["probing.burst_clusters"] == 4  # each entity once
    assert fired_on(Detector(RULES), ("m", "monitoring"), client) == []


def test_no_rule_asks_for_more_flips_at_a_walks_pace_than_are_kept() -> None:
    for rule in RULES:
        assert rule.requires.get("probing.peak_recent_flips", 0.0) <= RECENT_FLIPS_KEPT, rule.id


def baseline_trajectories() -> list[list[dict[str, float]]]:
    trajectories = []
    for client in benign_clients().values():
        trajectories.append([client.snapshot()])
    rng = np.random.default_rng(5)
    tracker = warmed_tracker()
    for index in range(40):  # ordinary users of varying activity
        stream = Stream(f"user-{index}")
        client = client_after(
            [stream.query(record(), gap=float(rng.uniform(5, 500))) for _ in range(int(rng.integers(3, 60)))],
            tracker,
        )
        trajectories.append([client.snapshot()])
    return trajectories


def test_thresholds_come_from_the_target_false_alert_rate_and_never_go_below_the_floor() -> None:
    trajectories = baseline_trajectories()
    strict = ScoringModel.fit(trajectories, RULES, target_fpr=0.001, scales={})
    loose = ScoringModel.fit(trajectories, RULES, target_fpr=0.2, scales={})
    assert strict.forest_threshold >= loose.forest_threshold
    harvest_rule = next(rule for rule in RULES if rule.kind is AlertKind.CONFIDENCE_HARVESTING)
    assert strict.rule_thresholds[harvest_rule.id] >= loose.rule_thresholds[harvest_rule.id]
    detector = Detector(RULES, strict)
    for rule in RULES:
        assert detector.scorer.threshold(rule) >= rule.floor
    # The baseline's own clients stay (nearly) quiet at the calibrated thresholds.
    assert strict.baseline_clients == len(trajectories)


def test_a_saved_model_loads_back_and_scores_the_same(tmp_path: Path) -> None:
    model = ScoringModel.fit(
        baseline_trajectories(), RULES, 0.01, scales={"m": {"mean": [0.0], "std": [1.0]}}
    )
    model.profiles = {
        ("m", "svc-job"): ClientProfile({"MIA-003": 300.0}, 120.5, 1.0, 0b100),
        ("m", "a/b c"): ClientProfile({}),
    }
    model.save(tmp_path / "model")
    loaded = ScoringModel.load(tmp_path / "model")
    assert loaded.profiles == model.profiles
    snapshots = [client.snapshot() for client in benign_clients().values()]
    assert np.allclose(loaded.anomaly_scores(snapshots), model.anomaly_scores(snapshots))
    assert loaded.rule_thresholds == model.rule_thresholds and loaded.version == model.version
    probe = client_after(augmentation_probe(Stream("p"))).snapshot()
    assert loaded.percentile("probing.burst_clusters", probe["probing.burst_clusters"]) == 100.0


def test_a_model_knows_when_it_was_trained_from_its_version() -> None:
    model = ScoringModel.fit(baseline_trajectories(), RULES, 0.01, scales={})
    assert model.trained_at is not None and abs(model.trained_at - time.time()) < 120

    assert replace(model, version="20251129T080000Z-fpr0.001").trained_at == 1_764_403_200.0
    assert replace(model, version="hand-made").trained_at is None


def test_a_tampered_or_foreign_model_is_refused_before_anything_is_deserialised(tmp_path: Path) -> None:
    directory = tmp_path / "model"
    ScoringModel.fit(baseline_trajectories(), RULES, 0.01, scales={}).save(directory)
    forest = directory / FOREST_FILE
    original = forest.read_bytes()
    forest.write_bytes(original[:-10] + b"0123456789")
    with pytest.raises(ModelError, match="hash"):
        ScoringModel.load(directory)
    forest.write_bytes(original)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest | {"format_version": 99}))
    with pytest.raises(ModelError, match="format"):
        ScoringModel.load(directory)
    # Edited, its own hash recomputed, yet of another shape: refused in one line, not a traceback.
    edited = {key: value for key, value in manifest.items() if key != "client_profiles"}
    edited["manifest_sha256"] = _manifest_hash(edited)
    (directory / MANIFEST_FILE).write_text(json.dumps(edited))
    with pytest.raises(ModelError, match=r"malformed.*client_profiles"):
        ScoringModel.load(directory)
    with pytest.raises(ModelError, match="cannot read"):
        ScoringModel.load(tmp_path / "missing")


def test_exact_training_records_hidden_in_cover_traffic_are_still_found() -> None:
    members = [record() for _ in range(20)]
    tracker = warmed_tracker()
    tracker.training_indexes = TrainingIndexes(default=SetIndex(members))
    stream = Stream("interleaver")
    rows = [members[index // 250] if index % 250 == 100 else record() for index in range(1000)]
    hidden = [stream.query(row, requested=Requested.LABEL) for row in rows]
    client = client_after(hidden, tracker)
    assert client.snapshot()["training.distinct_exact_hits"] == 4
    assert fired_on(Detector(RULES), ("m", "interleaver"), client) == []
    tracker.update([stream.query(row, requested=Requested.LABEL) for row in members[10:12]])
    detections = fired_on(Detector(RULES), ("m", "interleaver"), client)
    assert [(d.kind, d.rule_id) for d in detections] == [(AlertKind.TRAINING_SET_TARGETING, "MIA-005")]
    assert client.snapshot()["training.hit_rate"] < 0.01  # far below MIA-003's guard


TRAJECTORIES_SCRIPT = """
import hashlib, json
from detector.scoring.calibrate import collect_baseline
from tests.streams import Stream, record, warmed_tracker
streams = [Stream(f"client-{index}") for index in range(40)]
batch = [stream.query(record()) for _ in range(3) for stream in streams]
clients = collect_baseline([batch], warmed_tracker(), excluded=lambda client_id: False)
print(hashlib.sha256(json.dumps([(c.key, c.trajectory, c.evidence) for c in clients]).encode()).hexdigest())
"""


def test_the_same_baseline_gives_the_same_trajectories_in_any_process() -> None:
    """The forest is fitted on the trajectories in their order: it must not follow the string hashing."""
    digests = set()
    for seed in ("1", "2"):
        result = subprocess.run(
            [sys.executable, "-c", TRAJECTORIES_SCRIPT],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            cwd=Path(__file__).resolve().parents[2],
            timeout=120,
            check=True,
        )
        digests.add(result.stdout.strip())
    assert len(digests) == 1


def score_api_queries(client: str, rows: list[np.ndarray], scores: list[float]) -> list[Query]:
    """The queries decoded from KServe v1 records of a binary classifier answering with its score for
    class 1 (as XGBoost and LightGBM servers do), one row a record, a second apart."""
    decoder = RecordDecoder(IngestSettings())
    queries = []
    for number, (row, score) in enumerate(zip(rows, scores, strict=True)):
        envelope = {
            "event_id": f"{client}-{number}",
            "timestamp": 1_764_000_000.0 + number,
            "model": {"name": "m"},
            "client": {"id": client},
            "request": {"instances": [row.tolist()]},
            "response": {"predictions": [score]},
        }
        origin = Origin("file", "score-api.jsonl", 0, number)
        queries += decoder.decode(
            RawRecord(json.dumps(envelope).encode(), None, origin, 1_764_000_001.0 + number)
        )
    return queries


def test_entities_re_scored_through_a_score_api_make_no_label_flips() -> None:
    # Eight monitored entities re-scored in turn as their readings drift, their scores drifting too but
    # never across 0.5: a score read as a label of its own made every new reading a label flip.
    entities = [record() for _ in range(8)]
    rows, scores = [], []
    for step in range(40):
        for entity, base in enumerate(entities):
            rows.append(base + rng.normal(size=len(base)).astype(np.float32) * base * 0.002 * (step + 1))
            scores.append(0.2 + 0.01 * entity + 0.001 * step)
    client = client_after(score_api_queries("monitor", rows, scores))
    snapshot = client.snapshot()
    assert snapshot["probing.dense_variants"] >= 100  # the near-copies the walk rule reads
    assert snapshot["probing.flips"] == 0
    assert "MIA-001" not in {d.rule_id for d in fired_on(Detector(RULES), ("m", "monitor"), client)}


def test_a_harvest_through_a_score_api_is_a_harvest() -> None:
    rows = [record() for _ in range(400)]
    scores = [float(rng.uniform(0.01, 0.99)) for _ in rows]
    queries = score_api_queries("harvester", rows, scores)
    assert all(query.requested is Requested.PROBABILITIES for query in queries)
    fired = fired_on(Detector(RULES), ("m", "harvester"), client_after(queries))
    assert "MIA-004" in {d.rule_id for d in fired}
