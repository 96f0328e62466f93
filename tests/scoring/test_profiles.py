"""Per-client baselines: a known client judged against its own profile as well as the population."""

from __future__ import annotations

import numpy as np

from detector.domain import AlertKind, AllowEntry, AllowList
from detector.scoring.calibrate import fit_scoring_model
from detector.scoring.detector import Detector, Moment
from detector.scoring.profiles import (
    OFF_SCHEDULE_REASON,
    OWN_MAXIMUM_REASON,
    OWN_OUTPUT_REASON,
    OWN_RATE_REASON,
    ClientProfile,
    hour_bit,
)
from detector.scoring.rules import load_rules
from tests.streams import Stream, harvest, record, warmed_tracker

RULES = load_rules()
HARVEST_RULE = next(rule for rule in RULES if rule.kind is AlertKind.CONFIDENCE_HARVESTING)
HOUR = 3600.0
MIDNIGHT = 1_764_028_800.0  # 2025-11-25T00:00:00Z


def features(**values: float) -> dict[str, float]:
    return {"volume.queries": 100.0, "volume.rate_per_minute": 10.0, "confidence.asked_share": 1.0, **values}


def departed_by(profile: ClientProfile, score: float = 300.0, **values: float) -> list[str]:
    return [reason.feature for reason in profile.departures("MIA-004", score, features(**values))]


JOB = ClientProfile({"MIA-004": 300.0}, peak_rate=10.0, asked_share=1.0, hours=hour_bit(MIDNIGHT + 2 * HOUR))


def test_a_client_within_its_own_history_departs_from_nothing() -> None:
    # Twice its baseline maximum, four times its peak rate: ordinary growth.
    assert departed_by(JOB, score=600.0, **{"volume.rate_per_minute": 40.0}) == []
    # An hour early or late is on schedule: jobs drift.
    assert JOB.off_schedule(MIDNIGHT + 3 * HOUR) is None and JOB.off_schedule(MIDNIGHT + HOUR) is None


def test_each_way_of_departing_is_named_with_the_own_baseline_value() -> None:
    assert departed_by(JOB, score=601.0) == [OWN_MAXIMUM_REASON]
    assert departed_by(JOB, **{"volume.rate_per_minute": 40.1}) == ["volume.rate_per_minute", OWN_RATE_REASON]
    # Labels where it always asked for probabilities: a change of output choice, either way.
    assert departed_by(JOB, **{"confidence.asked_share": 0.5}) == [
        "confidence.asked_share",
        OWN_OUTPUT_REASON,
    ]
    # A rule it never scored on: any score departs.
    assert [reason.value for reason in JOB.departures("MIA-001", 4.0, features())] == [0.0]
    # The hour is evidence, named apart: a run at 14:00 is no departure by itself.
    off = JOB.off_schedule(MIDNIGHT + 14 * HOUR + 5)
    assert off is not None and off.text == "own_baseline.off_schedule_hour_utc = 14"


def test_what_the_baseline_could_not_know_is_not_held_against_a_client() -> None:
    unknown = ClientProfile({"MIA-004": 300.0})  # few queries, a baseline shorter than a day
    assert departed_by(unknown, **{"volume.rate_per_minute": 1e4}) == []
    assert unknown.off_schedule(MIDNIGHT + 14 * HOUR) is None
    # Nor are a young client's rate and share: a few queries make a rate of anything.
    assert departed_by(JOB, **{"volume.queries": 19.0, "volume.rate_per_minute": 1e4}) == []
    # The schedule wraps around midnight.
    late = ClientProfile({}, hours=hour_bit(MIDNIGHT + 23 * HOUR))
    assert late.on_schedule(MIDNIGHT + 24 * HOUR) and not late.on_schedule(MIDNIGHT + 25 * HOUR)


def test_the_bounded_anomaly_score_departs_halfway_to_its_bound() -> None:
    profile = ClientProfile({"MIA-ANOMALY": 0.6})
    assert profile.departures("MIA-ANOMALY", 0.8, features(), bounded=True) == []
    assert len(profile.departures("MIA-ANOMALY", 0.81, features(), bounded=True)) == 1


def test_a_trusted_batch_scorer_is_excused_until_its_key_departs_from_its_own_history() -> None:
    """Trained on a day holding the nightly batch scorer (allow-listed: 400 records, probabilities, at
    02:00), the detector excuses the same job the next night, and a late run; the same key used another way
    is alerted on with where it departed."""
    rng = np.random.default_rng(5)
    day = [Stream(f"user-{index}") for index in range(30)]
    baseline = []
    for index, stream in enumerate(day):
        stream.clock = MIDNIGHT + index * 3000.0  # one user every 50 minutes, all day
        baseline += [
            stream.query(record(), gap=float(rng.uniform(5, 120))) for _ in range(int(rng.integers(3, 30)))
        ]
    job = Stream("batch-job")
    job.clock = MIDNIGHT + 2 * HOUR
    baseline += harvest(job, records=400)
    baseline.sort(key=lambda query: query.timestamp)
    calibration = fit_scoring_model(
        [baseline[start : start + 50] for start in range(0, len(baseline), 50)],
        warmed_tracker(),
        RULES,
        0.01,
        excluded=lambda client_id: client_id == "batch-job",
    )
    profile = calibration.model.profiles[("m", "batch-job")]
    assert profile.hours == hour_bit(MIDNIGHT + 2 * HOUR)
    detector = Detector(RULES, calibration.model)
    allowlist = AllowList((AllowEntry("batch-job", "nightly batch scoring"),))

    def judged(queries: list) -> list:  # type: ignore[type-arg]
        tracker = warmed_tracker()
        for start in range(0, len(queries), 50):
            tracker.update(queries[start : start + 50])
        client = tracker.get(("m", "batch-job"))
        assert client is not None
        found = detector.evaluate(Moment.of(("m", "batch-job"), client, client.last_seen))
        return [detection for detection in found if detection.fired and detection.rule_id == HARVEST_RULE.id]

    job.clock = MIDNIGHT + 26 * HOUR  # the next night, same hour
    (next_night,) = judged(harvest(job, records=400))
    assert not next_night.departed and allowlist.excuses(next_night)

    job.clock = MIDNIGHT + 38 * HOUR  # 14:00: late, yet the same job
    (late,) = judged(harvest(job, records=400))
    assert not late.departed and allowlist.excuses(late)
    assert late.reasons[-1].feature == OFF_SCHEDULE_REASON  # named all the same, should it be alerted on

    # Three times its records, at twenty times its rate: not the job any more.
    (detection,) = judged([job.query(record(), gap=0.05) for _ in range(1200)])
    assert detection.departed and not allowlist.excuses(detection)
    named = [reason.feature for reason in detection.reasons]
    assert {OWN_MAXIMUM_REASON, OWN_RATE_REASON, OFF_SCHEDULE_REASON} <= set(named)
    assert named.index(OWN_MAXIMUM_REASON) > 0  # after the rule's own explanation

    # A client the baseline never saw is judged against the population alone.
    stranger = Stream("stranger")
    stranger.clock = MIDNIGHT + 38 * HOUR
    tracker = warmed_tracker()
    tracker.update(harvest(stranger, 400))
    client = tracker.get(("m", "stranger"))
    assert client is not None
    fired = [d for d in detector.evaluate(Moment.of(("m", "stranger"), client, client.last_seen)) if d.fired]
    assert fired and not any(detection.departed for detection in fired)
