"""One scoring for everyone: thresholds that could not give a ratio are refused at their source, and the
detector, the metrics and the evaluation read the same verdicts off the same snapshots."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from detector.domain import AlertKind, AllowEntry, AllowList, Requested, Severity, Verdict
from detector.evaluate import suspicion_scores
from detector.features.client import ClientFeatures, ClientKey, FeatureTracker, TrainingIndexes
from detector.metrics import PREFIX, SCORED_KINDS, Metrics
from detector.scoring.detector import Detector, Moment
from detector.scoring.model import MANIFEST_FILE, ModelError, ScoringModel
from detector.scoring.rules import load_rules
from detector.scoring.scorer import ANOMALY_MIN_QUERIES
from tests.scoring.test_model_files import rehash
from tests.scoring.test_scoring import RULES, baseline_trajectories
from tests.streams import SetIndex, Stream, augmentation_probe, boundary_walk, harvest, record, warmed_tracker

RULE_TOML = """
[[rules]]
id = "MIA-900"
kind = "boundary_probing"
title = "t"
severity = "high"
score = "probing.flips"
floor = {floor}
explain = ["probing.flips"]
known_false_positives = ["none"]
triage = "t"
atlas = "AML.T0024"
"""


# -- thresholds at their source ------------------------------------------------------------------------------


@pytest.mark.parametrize("floor", ["0", "-1", "nan", "inf"])
def test_a_rule_whose_floor_is_not_positive_and_finite_is_refused_when_rules_load(
    tmp_path: Path, floor: str
) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(RULE_TOML.format(floor=floor))
    with pytest.raises(ValueError, match=r"rule MIA-900: .*floor must be positive and finite"):
        load_rules(path)
    with pytest.raises(ValueError, match="floor must be positive"):
        replace(RULES[0], floor=float(floor))
    path.write_text(RULE_TOML.format(floor="0.5"))  # the check can pass
    assert [rule.floor for rule in load_rules(path)] == [0.5]


def test_calibrated_thresholds_never_fall_below_the_floor() -> None:
    model = ScoringModel.fit(baseline_trajectories(), RULES, 0.01, scales={})
    quiet = [rule for rule in RULES if rule.kind is AlertKind.TRAINING_SET_TARGETING]
    for rule in RULES:
        assert model.rule_thresholds[rule.id] >= rule.floor > 0
    # No baseline client ever touched the training set: without the floor these would be 0.
    assert [model.rule_thresholds[rule.id] for rule in quiet] == [rule.floor for rule in quiet]
    assert model.forest_threshold > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"forest_threshold": 0.0}, "forest threshold must be positive"),
        ({"forest_threshold": -0.5}, "forest threshold must be positive"),
        ({"forest_threshold": math.nan}, "forest threshold must be positive"),
        ({"rule_thresholds": {"MIA-001": -1.0}}, "rule thresholds must be finite and not negative"),
        ({"rule_thresholds": {"MIA-001": math.inf}}, "rule thresholds must be finite and not negative"),
    ],
)
def test_a_model_with_a_threshold_out_of_range_is_refused(change: dict[str, object], message: str) -> None:
    model = ScoringModel.fit(baseline_trajectories(), RULES, 0.01, scales={})
    with pytest.raises(ModelError, match=message):
        replace(model, **change)  # type: ignore[arg-type]


def test_a_saved_model_with_a_forest_threshold_of_zero_does_not_load(tmp_path: Path) -> None:
    directory = tmp_path / "model"
    ScoringModel.fit(baseline_trajectories(), RULES, 0.01, scales={}).save(directory)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    rehash(directory, manifest | {"forest_threshold": 0.0})  # as if saved so: the check is the threshold's
    with pytest.raises(ModelError, match=re.escape(f"scoring model at {directory}: the forest threshold")):
        ScoringModel.load(directory)


def test_an_older_model_calibrated_at_zero_loads_and_the_floor_applies(tmp_path: Path) -> None:
    model = ScoringModel.fit(baseline_trajectories(), RULES, 0.01, scales={})
    older = replace(model, rule_thresholds=dict.fromkeys(model.rule_thresholds, 0.0))
    scorer = Detector(RULES, older).scorer
    assert [scorer.threshold(rule) for rule in RULES] == [rule.floor for rule in RULES]


def test_a_threshold_calibrated_on_what_a_rule_no_longer_measures_is_not_applied(tmp_path: Path) -> None:
    fitted = ScoringModel.fit(baseline_trajectories(), RULES, 0.01, scales={})
    # As a busier baseline would have lifted them: every threshold above its floor.
    model = replace(fitted, rule_thresholds={rule.id: 3 * rule.floor for rule in RULES})
    directory = tmp_path / "model"
    model.save(directory)
    loaded = ScoringModel.load(directory)
    assert loaded.rule_measures == {rule.id: rule.measure for rule in RULES}
    scorer = Detector(RULES, loaded).scorer
    assert scorer.stale == []
    assert [scorer.threshold(rule) for rule in RULES] == [3 * rule.floor for rule in RULES]
    # A newer version's rules: one scores another feature, one has another guard, the others have another
    # floor and title, which change nothing the threshold measured.
    rescored, reguarded = RULES[0], RULES[1]
    newer = [
        replace(rule, score=rule.score + "_paced")
        if rule is rescored
        else replace(rule, requires=rule.requires | {"volume.queries": 2.0})
        if rule is reguarded
        else replace(rule, floor=rule.floor / 2, title="retitled")
        for rule in RULES
    ]
    scorer = Detector(newer, loaded).scorer
    assert [rule.id for rule in scorer.stale] == [rescored.id, reguarded.id]
    assert [scorer.threshold(rule) for rule in newer] == [
        rule.floor if rule.id in (rescored.id, reguarded.id) else 3 * rule.floor for rule in RULES
    ]


def test_a_model_that_does_not_record_its_measures_applies_its_thresholds(tmp_path: Path) -> None:
    directory = tmp_path / "model"
    model = ScoringModel.fit(baseline_trajectories(), RULES, 0.01, scales={})
    model.save(directory)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    del manifest["rule_measures"]
    rehash(directory, manifest)  # as a version before measures were recorded wrote it
    older = ScoringModel.load(directory)
    assert older.rule_measures is None
    scorer = Detector(RULES, older).scorer
    assert scorer.stale == []
    assert [scorer.threshold(rule) for rule in RULES] == [model.rule_thresholds[rule.id] for rule in RULES]
    rehash(directory, manifest | {"rule_measures": ["probing.flips"]})
    with pytest.raises(ModelError, match="rule measures must name"):
        ScoringModel.load(directory)


def test_a_verdict_needs_a_positive_threshold() -> None:
    verdict = Verdict(AlertKind.BOUNDARY_PROBING, "MIA-001", 6.0, 4.0, Severity.HIGH, (), "", "AML.T0024")
    assert verdict.fired and verdict.ratio == 1.5
    for threshold in (0.0, -4.0, math.nan):
        with pytest.raises(ValueError, match="positive"):
            replace(verdict, threshold=threshold)


# -- the same verdicts for the detector, the metrics and the evaluation -------------------------------------


def judged_clients() -> tuple[FeatureTracker, dict[ClientKey, ClientFeatures]]:
    """Attackers of every kind and benign look-alikes, in one tracker with a training-set index."""
    members = [record() for _ in range(40)]
    tracker = warmed_tracker()
    tracker.training_indexes = TrainingIndexes(default=SetIndex(members))
    streams = {
        "prober": augmentation_probe(Stream("prober")),
        "walker": boundary_walk(Stream("walker")),
        "harvester": harvest(Stream("harvester"), records=400),
        "candidates": [Stream("candidates").query(row) for row in members[:25]],
        "retry": [
            Stream("retry").query(row, gap=0.1) for row in (record() for _ in range(30)) for _ in range(6)
        ],
        "steady": [Stream("steady").query(record(), requested=Requested.LABEL, gap=30) for _ in range(150)],
        "newcomer": [Stream("newcomer").query(record()) for _ in range(ANOMALY_MIN_QUERIES - 1)],
    }
    for queries in streams.values():
        for start in range(0, len(queries), 50):
            tracker.update(queries[start : start + 50])
    return tracker, {key: client for key, client in tracker.items() if key[1] != "warmup"}


def test_the_detector_the_metrics_and_the_evaluation_agree_on_every_verdict() -> None:
    tracker, clients = judged_clients()
    detector = Detector(RULES, ScoringModel.fit(baseline_trajectories(), RULES, 0.01, scales={}))
    scorer = detector.scorer
    verdicts = dict(
        zip(clients, scorer.score([client.snapshot() for client in clients.values()]), strict=True)
    )
    metrics = Metrics(CollectorRegistry())

    moments = [Moment.of(key, client, client.last_seen) for key, client in clients.items()]
    detections = [
        detection
        for moment in moments
        for detection in detector.evaluate(moment, observe=metrics.observe_score_ratio)
    ]
    detections += detector.evaluate_anomalies(moments, observe=metrics.observe_score_ratio)

    # The detector: a detection for each verdict that fired, with its rule, score and threshold, and one
    # that did not fire for each verdict within the hold band below its threshold.
    fired = {
        (key, verdict.kind) for key, kinds in verdicts.items() for verdict in kinds.values() if verdict.fired
    }
    held = {
        (key, verdict.kind)
        for key, kinds in verdicts.items()
        for verdict in kinds.values()
        if verdict.holds and not verdict.fired
    }
    assert {((d.model, d.client_id), d.kind) for d in detections if d.fired} == fired
    assert {((d.model, d.client_id), d.kind) for d in detections if not d.fired} == held
    for detection in detections:
        verdict = verdicts[(detection.model, detection.client_id)][detection.kind]
        assert (detection.rule_id, detection.score, detection.threshold) == (
            verdict.rule_id,
            verdict.score,
            verdict.threshold,
        )
        assert [reason.feature for reason in detection.reasons] == list(verdict.contributions)
    fired_kinds = {kind for _, kind in fired}
    assert fired_kinds >= {
        AlertKind.AUGMENTATION_PROBING,
        AlertKind.BOUNDARY_PROBING,
        AlertKind.CONFIDENCE_HARVESTING,
        AlertKind.TRAINING_SET_TARGETING,
    }
    assert not any(key[1] in ("retry", "steady") for key, _ in fired)  # and something stays quiet

    # The metrics: one ratio per kind judged on each client, the verdicts' own.
    for kind in SCORED_KINDS:
        ratios = [kinds[kind].ratio for kinds in verdicts.values() if kind in kinds]
        labels = {"kind": kind.value}
        assert metrics.registry.get_sample_value(f"{PREFIX}_score_ratio_count", labels) == len(ratios)
        assert metrics.registry.get_sample_value(f"{PREFIX}_score_ratio_sum", labels) == pytest.approx(
            sum(ratios)
        )
    anomalous = [key for key, kinds in verdicts.items() if AlertKind.ANOMALOUS_SESSION in kinds]
    assert ("m", "newcomer") not in anomalous and len(anomalous) == len(clients) - 1

    # The evaluation: each client's highest ratio, over the kinds its allow-list entries leave.
    expected = {key[1]: max(verdict.ratio for verdict in kinds.values()) for key, kinds in verdicts.items()}
    scores = suspicion_scores(tracker, scorer, AllowList())
    assert {client: scores[client] for client in expected} == expected
    assert all(expected[client] >= 1.0 for client in ("prober", "walker", "harvester", "candidates"))
    allowed = AllowList((AllowEntry("prober", "a test suite", AlertKind.AUGMENTATION_PROBING),))
    without = max(
        v.ratio for v in verdicts[("m", "prober")].values() if v.kind is not AlertKind.AUGMENTATION_PROBING
    )
    assert suspicion_scores(tracker, scorer, allowed)["prober"] == without < expected["prober"]
