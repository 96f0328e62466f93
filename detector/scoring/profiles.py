"""Per-client baselines: what each baseline client did, kept in the scoring model, and where a known client
departs from it live.

A profile holds the client's highest score per rule (and the anomaly model's), its peak query rate, its
output choice (the share of its queries asking for confidence rather than a label) and its schedule (the UTC
hours it was active, when the baseline covered a whole day). A known client is judged against the population
(the thresholds) and against its own profile: `ClientProfile.departures` names where what it does goes
beyond its own history, as reasons a responder reads on the alert; a client that departs is not excused by
its allow-list entry (`detector.domain.AllowList`): a compromised key at work, after weeks of ordinary use.

The margins are wide on purpose: a trusted client's ordinary growth (a re-scoring job whose customer base
grew, a batch a little faster than usual) stays within them; another behaviour does not. The schedule is
evidence, not a departure (`ClientProfile.off_schedule`): an alert names an hour the client was never active
in, but jobs are moved and delayed, and an allow-list entry withdrawn over a late run would page the owner's
own jobs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from detector.domain import OWN_BASELINE_PREFIX, Reason
from detector.features.volume import QUERIES_FEATURE

# A rule score more than twice the client's own baseline maximum departs: a heavy job can double from one
# night to the next, as the calibration's margin allows (`scoring.model`).
HISTORY_MARGIN = 2.0
# The anomaly score is bounded by 1: it departs past half the way from the client's own maximum to the bound.
ANOMALY_SHARE_OF_HEADROOM = 0.5
RATE_MARGIN = 4.0  # a rate more than four times the client's own peak departs
OUTPUT_SHIFT = 0.5  # the share of queries asking for confidence moved by half of them or more
SCHEDULE_SLACK_HOURS = 1  # an hour beside an active one is still on schedule: scheduled jobs drift
# Rate and output choice are read once a client sent this many queries, in the baseline and live alike: the
# first few queries of any client make a rate of anything.
PROFILE_MIN_QUERIES = 20
# A baseline whose first and last queries are this far apart covered a whole day (a day's log rarely holds
# a query in its very first and last second); with the schedule's slack, no hour is then left unseen.
WHOLE_DAY_SECONDS = 23 * 3600.0
HOURS = 24

RATE_FEATURE = "volume.rate_per_minute"
OUTPUT_FEATURE = "confidence.asked_share"

# The reasons a departure adds to a detection, each with the client's own baseline value.
OWN_MAXIMUM_REASON = f"{OWN_BASELINE_PREFIX}maximum"
OWN_RATE_REASON = f"{OWN_BASELINE_PREFIX}peak_rate_per_minute"
OWN_OUTPUT_REASON = f"{OWN_BASELINE_PREFIX}asked_share"
OFF_SCHEDULE_REASON = f"{OWN_BASELINE_PREFIX}off_schedule_hour_utc"  # the value is the hour of the detection


def hour_of(at: float) -> int:
    """The UTC hour of day (0-23) of event time `at` (epoch seconds)."""
    return int(at // 3600.0) % HOURS


def hour_bit(at: float) -> int:
    """The bit of event time `at`'s hour in a `ClientProfile.hours` mask."""
    return 1 << hour_of(at)


@dataclass(frozen=True)
class ClientProfile:
    """One baseline client's own history (see the module docstring).

    `maxima` maps rule id (and the anomaly model's) to the highest score the client reached; a rule it
    never scored on is absent (0). `peak_rate` and `asked_share` are None when the client sent fewer than
    `PROFILE_MIN_QUERIES` queries; `hours` (bit h set: active in UTC hour h) is None when the baseline did
    not cover a whole day, so that an hour it never showed says nothing.
    """

    maxima: Mapping[str, float]
    peak_rate: float | None = None
    asked_share: float | None = None
    hours: int | None = None

    @classmethod
    def of(
        cls,
        maxima: Mapping[str, float],
        trajectory: Sequence[Mapping[str, float]],
        hours: int | None,
    ) -> ClientProfile:
        """The profile of a baseline client with rule `maxima`, snapshots `trajectory` (as it grew, the last
        one its whole baseline) and active `hours` (None: unknown, see the class)."""
        grown = [
            snapshot for snapshot in trajectory if snapshot.get(QUERIES_FEATURE, 0.0) >= PROFILE_MIN_QUERIES
        ]
        return cls(
            {rule: value for rule, value in maxima.items() if value > 0.0},
            round(max(snapshot.get(RATE_FEATURE, 0.0) for snapshot in grown), 6) if grown else None,
            round(grown[-1].get(OUTPUT_FEATURE, 0.0), 6) if grown else None,
            hours,
        )

    def departures(
        self, rule_id: str, score: float, values: Mapping[str, float], *, bounded: bool = False
    ) -> list[Reason]:
        """Where a client with this profile, scoring `score` on `rule_id` with snapshot `values`, departs
        from its own history: one reason per departure, with the own baseline value it went beyond (the
        live value before it where the detection's reasons may lack it); none when it stays within.
        `bounded` says the score is the anomaly model's (at most 1)."""
        reasons = []
        highest = self.maxima.get(rule_id, 0.0)
        limit = highest + (1.0 - highest) * ANOMALY_SHARE_OF_HEADROOM if bounded else HISTORY_MARGIN * highest
        if score > limit:
            reasons.append(Reason(feature=OWN_MAXIMUM_REASON, value=highest))
        if values.get(QUERIES_FEATURE, 0.0) >= PROFILE_MIN_QUERIES:
            rate, share = values.get(RATE_FEATURE, 0.0), values.get(OUTPUT_FEATURE, 0.0)
            if self.peak_rate is not None and rate > RATE_MARGIN * self.peak_rate:
                reasons += [
                    Reason(feature=RATE_FEATURE, value=rate),
                    Reason(feature=OWN_RATE_REASON, value=self.peak_rate),
                ]
            if self.asked_share is not None and abs(share - self.asked_share) >= OUTPUT_SHIFT:
                reasons += [
                    Reason(feature=OUTPUT_FEATURE, value=share),
                    Reason(feature=OWN_OUTPUT_REASON, value=self.asked_share),
                ]
        return reasons

    def off_schedule(self, at: float) -> Reason | None:
        """The reason naming the hour of event time `at` when the client was never active in it (see
        `on_schedule`), else None."""
        return None if self.on_schedule(at) else Reason(feature=OFF_SCHEDULE_REASON, value=float(hour_of(at)))

    def on_schedule(self, at: float) -> bool:
        """True when event time `at` falls in an hour the client was active in, give or take
        `SCHEDULE_SLACK_HOURS` (always, when its hours are unknown)."""
        if self.hours is None:
            return True
        hour = hour_of(at)
        return any(
            self.hours >> ((hour + shift) % HOURS) & 1
            for shift in range(-SCHEDULE_SLACK_HOURS, SCHEDULE_SLACK_HOURS + 1)
        )

    def to_json(self) -> dict[str, Any]:
        """The profile as the model's manifest stores it."""
        return {
            "maxima": dict(self.maxima),
            "peak_rate": self.peak_rate,
            "asked_share": self.asked_share,
            "hours": self.hours,
        }

    @classmethod
    def from_json(cls, stored: Mapping[str, Any]) -> ClientProfile:
        """A profile read back from `to_json`; raises `KeyError` or `TypeError` on another shape."""
        return cls(dict(stored["maxima"]), stored["peak_rate"], stored["asked_share"], stored["hours"])
