"""Calibration on baseline traffic that holds heavy legitimate clients (or an attacker): no single client
lifts a rule's threshold for everyone; such clients are reported with their evidence instead."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from detector.domain import AlertKind, Query, Severity
from detector.scoring.calibrate import collect_baseline, fit_scoring_model
from detector.scoring.detector import Detector
from detector.scoring.model import floor_outliers, rule_threshold
from tests.scoring.test_scoring import RULES, fired_on
from tests.streams import Stream, harvest, record, warmed_tracker

HARVEST_RULE = next(rule for rule in RULES if rule.kind is AlertKind.CONFIDENCE_HARVESTING)
# The harvesting rule as a paging rule (no exposure, no escalation): how calibration treats every rule that
# pages when many baseline clients reach its floor.
PAGING_HARVEST_RULE = replace(HARVEST_RULE, severity=Severity.MEDIUM, escalate={}, escalated_severity=None)
PAGING_RULES = [PAGING_HARVEST_RULE if rule is HARVEST_RULE else rule for rule in RULES]


def batches_of(queries: list[Query], size: int = 50) -> list[list[Query]]:
    return [queries[start : start + size] for start in range(0, len(queries), size)]


def ordinary_users(count: int = 40) -> list[Query]:
    rng = np.random.default_rng(3)
    queries = []
    for index in range(count):
        stream = Stream(f"user-{index}")
        queries += [
            stream.query(record(), gap=float(rng.uniform(5, 500))) for _ in range(int(rng.integers(3, 40)))
        ]
    return queries


def test_a_heavy_baseline_client_does_not_lift_the_threshold_for_everyone() -> None:
    """A nightly batch scorer asking for the probabilities of 2,000 records is in the baseline: the
    harvesting rule's threshold stays where the other clients put it (the floor here), so an attacker
    harvesting 300 records is still caught; the batch scorer is reported with the events that took it
    over the floor."""
    batch_scorer = harvest(Stream("nightly-batch-scorer"), records=2_000)
    calibration = fit_scoring_model(
        batches_of(ordinary_users() + batch_scorer), warmed_tracker(), RULES, 0.001, excluded=lambda _: False
    )
    threshold = calibration.model.rule_thresholds[HARVEST_RULE.id]
    assert threshold == HARVEST_RULE.floor  # the scorer alone would have made it more than 2,000
    assert HARVEST_RULE.id in calibration.at_floor()

    [crossing] = [c for c in calibration.crossings if c.rule == HARVEST_RULE.id]
    assert (crossing.model, crossing.client_id, crossing.kind) == (
        "m",
        "nightly-batch-scorer",
        HARVEST_RULE.kind,
    )
    assert crossing.value >= 2_000 and crossing.floor == HARVEST_RULE.floor
    # The evidence: the scorer's latest events when its snapshot first reached the floor.
    ids = [query.event_id for query in batch_scorer]
    assert crossing.evidence and set(crossing.evidence) <= set(ids)
    assert max(ids.index(event) for event in crossing.evidence) < 300

    tracker = warmed_tracker()
    attack = harvest(Stream("attacker"), records=300)
    for batch in batches_of(attack):
        tracker.update(batch)
    client = tracker.get(("m", "attacker"))
    assert client is not None
    detections = fired_on(Detector(RULES, calibration.model), ("m", "attacker"), client)
    assert AlertKind.CONFIDENCE_HARVESTING in {detection.kind for detection in detections}


def test_allow_listed_clients_are_neither_calibrated_on_nor_reported_but_their_profile_is_kept() -> None:
    batch_scorer = harvest(Stream("nightly-batch-scorer"), records=400)
    calibration = fit_scoring_model(
        batches_of(ordinary_users() + batch_scorer),
        warmed_tracker(),
        RULES,
        0.001,
        excluded=lambda client_id: client_id == "nightly-batch-scorer",
    )
    assert calibration.crossings == []
    assert calibration.model.baseline_clients == 40
    profiles = calibration.model.profiles
    assert len(profiles) == 41  # every baseline client, the allow-listed one included
    scorer = profiles[("m", "nightly-batch-scorer")]
    assert scorer.maxima[HARVEST_RULE.id] == 400
    assert scorer.asked_share == 1.0  # it asked for probabilities on every query
    assert scorer.peak_rate is not None and scorer.peak_rate > 0
    assert "MIA-001" not in profiles[("m", "user-0")].maxima  # a rule never scored on is left out
    assert all(
        0 < value <= 1
        for profile in profiles.values()
        for rule, value in profile.maxima.items()
        if rule == "MIA-ANOMALY"
    )
    # The baseline lasted less than a day: an hour a client never showed says nothing of its schedule.
    assert all(profile.hours is None for profile in profiles.values())


def test_a_baseline_below_every_floor_reports_nothing_and_calibrates_as_before() -> None:
    clients = collect_baseline(batches_of(ordinary_users()), warmed_tracker(), excluded=lambda _: False)
    assert len(clients) == 40
    assert all(len(client.evidence) == len(client.trajectory) for client in clients)
    calibration = fit_scoring_model(
        batches_of(ordinary_users()), warmed_tracker(), RULES, 0.001, excluded=lambda _: False
    )
    assert calibration.crossings == []
    assert calibration.thin_baseline()  # 40 clients cannot measure a rate of 1 in 1,000
    assert not fit_scoring_model(
        batches_of(ordinary_users()), warmed_tracker(), RULES, 0.05, excluded=lambda _: False
    ).thin_baseline()


def test_a_behaviour_common_in_the_baseline_is_calibrated_on_not_suggested() -> None:
    """Six batch scorers among 40 users (13%) are how this deployment is used: for a rule that pages they
    set the threshold and none is suggested for the allow-list; the rule is reported as common at its
    floor."""
    scorers = [query for index in range(6) for query in harvest(Stream(f"scorer-{index}"), records=250)]
    batches = batches_of(ordinary_users() + scorers)
    calibration = fit_scoring_model(batches, warmed_tracker(), PAGING_RULES, 0.001, excluded=lambda _: False)
    assert calibration.crossings == []
    assert calibration.common_at_floor == {HARVEST_RULE.id: 6}
    assert calibration.model.rule_thresholds[HARVEST_RULE.id] >= 250


def test_an_exposure_rule_stays_at_its_floor_however_common_the_behaviour() -> None:
    """The same six batch scorers and the harvesting rule as shipped (exposure, escalated with evidence):
    its threshold stays at the floor so that every harvest is recorded, and the scorers are listed."""
    scorers = [query for index in range(6) for query in harvest(Stream(f"scorer-{index}"), records=250)]
    batches = batches_of(ordinary_users() + scorers)
    calibration = fit_scoring_model(batches, warmed_tracker(), RULES, 0.001, excluded=lambda _: False)
    assert calibration.model.rule_thresholds[HARVEST_RULE.id] == HARVEST_RULE.floor
    assert calibration.common_at_floor == {}
    assert {c.client_id for c in calibration.crossings} == {f"scorer-{index}" for index in range(6)}


@pytest.mark.parametrize(
    ("reaching", "clients", "left_out"),
    [(1, 20, 1), (3, 20, 3), (4, 20, 0), (5, 100, 5), (6, 100, 0), (7, 200, 7), (11, 200, 0)],
)
def test_a_twentieth_of_the_clients_or_three_are_left_out(reaching: int, clients: int, left_out: int) -> None:
    maxima = [PAGING_HARVEST_RULE.floor * 3] * reaching + [1.0] * (clients - reaching)
    assert len(floor_outliers(PAGING_HARVEST_RULE, maxima)) == left_out
    assert len(floor_outliers(HARVEST_RULE, maxima)) == reaching  # exposure: every one, always
    threshold = rule_threshold(PAGING_HARVEST_RULE, maxima, 0.001)
    assert threshold == (PAGING_HARVEST_RULE.floor if left_out else PAGING_HARVEST_RULE.floor * 3 * 2)


def test_the_evidence_names_distinct_events_though_a_request_holds_many_rows() -> None:
    stream = Stream("batched")
    # Requests of 8 rows each: the rows of one request share its event id.
    queries = [replace(stream.query(record()), event_id=f"request-{index // 8}") for index in range(8 * 10)]
    [client] = collect_baseline(batches_of(queries), warmed_tracker(), excluded=lambda _: False)
    assert client.evidence[-1] == ("request-7", "request-8", "request-9")
    assert all(len(set(events)) == len(events) for events in client.evidence)
