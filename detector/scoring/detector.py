"""Deciding: the verdicts that fired on a client, turned into detections with their reasons and evidence.

Scoring is separate from deciding: `Scorer` judges each alert kind on a client's snapshot (see
`detector.scoring.scorer`); `Detector` makes a `Detection` of every verdict that fired (or holds), explained
by the verdict's contributions and backed by the client's evidence events as they were at the `Moment` it
was judged. A client known from the baseline is judged against its own profile too: where it departs from
it is added to the reasons, and the detection is marked `departed` (no allow-list entry excuses it).
Whoever observes the ratios (the pipeline's metrics) is handed the very verdicts the decision was taken on.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from detector.domain import AlertKind, Detection, Reason, Verdict
from detector.features.client import ClientFeatures, ClientKey, evidence_of
from detector.features.exposure import Counts, exposure_of
from detector.scoring.model import ScoringModel
from detector.scoring.rules import Rule
from detector.scoring.scorer import ANOMALY_MIN_QUERIES, ANOMALY_RULE_ID, Scorer, Snapshot

EVIDENCE_KINDS: dict[AlertKind, tuple[str, ...]] = {
    AlertKind.BOUNDARY_PROBING: ("flip", "variant"),
    AlertKind.AUGMENTATION_PROBING: ("variant", "round", "flip"),
    AlertKind.TRAINING_SET_TARGETING: ("training",),
    AlertKind.CONFIDENCE_HARVESTING: ("confidence",),
    AlertKind.ANOMALOUS_SESSION: ("flip", "variant", "round", "training", "confidence"),
}
# Told the verdicts of every client judged, allow-listed or not (the pipeline's metrics).
RatioObserver = Callable[[Collection[Verdict]], None]


@dataclass(frozen=True)
class Moment:
    """A client as the rules judged it: its snapshot and what a detection reports of it, taken on the query
    at event time `at` (so that the anomaly model, which judges moments later in micro-batches, reports the
    very query its verdict was on)."""

    key: ClientKey
    values: Snapshot
    at: float
    queries: int
    first_seen: float
    last_seen: float
    evidence: dict[str, list[str]]  # the client's evidence event ids by evidence kind, as they were
    exposure: Counts  # what the client was given by then (`ExposureCounts.counts`)

    @classmethod
    def of(cls, key: ClientKey, client: ClientFeatures, at: float) -> Moment:
        """`client` now, judged on its query at event time `at`."""
        return cls(
            key,
            client.snapshot(),
            at,
            client.queries,
            client.first_seen,
            client.last_seen,
            # A copy of a few short lists: most moments give no detection, so ids are gathered per alert
            # kind only for those that do.
            {kind: list(events) for kind, events in client.evidence.items()},
            client.exposure.counts(),
        )


class Detector:
    """Detections from the verdicts of a `Scorer` over `rules` and `model`; see the module docstring.

    Every verdict that fired is a detection; one within the hold band below its threshold (`Verdict.holds`)
    is a detection that did not fire (`Detection.fired` False), which keeps an open alert alive.
    """

    def __init__(self, rules: Sequence[Rule], model: ScoringModel | None = None) -> None:
        self.scorer = Scorer(rules, model)

    @property
    def model(self) -> ScoringModel | None:
        """The scoring model in use, if any."""
        return self.scorer.model

    @property
    def judges_anomalies(self) -> bool:
        """True when a model with an anomaly forest is loaded."""
        return self.scorer.model is not None and self.scorer.model.forest is not None

    def evaluate(self, moment: Moment, *, observe: RatioObserver | None = None) -> list[Detection]:
        """The rule detections for one client's `moment`, one per alert kind whose verdict fired or holds
        (`score_rules`). `observe`, if given, is handed every kind's verdict."""
        verdicts = self.scorer.score_rules(moment.values)
        if observe is not None:
            observe(verdicts.values())
        return [self._detection(moment, verdict) for verdict in verdicts.values() if verdict.holds]

    def evaluate_anomalies(
        self, moments: Sequence[Moment], *, observe: RatioObserver | None = None
    ) -> list[Detection]:
        """Anomalous-session detections for `moments` (in order), scored in one micro-batch
        (`score_anomalies`); `observe`, if given, is handed the verdict of every moment the model judged."""
        if not self.judges_anomalies:
            return []
        eligible = [moment for moment in moments if moment.queries >= ANOMALY_MIN_QUERIES]
        if not eligible:
            return []
        judged = [
            (moment, verdict)
            for moment, verdict in zip(
                eligible, self.scorer.score_anomalies([moment.values for moment in eligible]), strict=True
            )
            if verdict is not None
        ]
        if observe is not None:
            observe([verdict for _, verdict in judged])
        return [self._detection(moment, verdict) for moment, verdict in judged if verdict.holds]

    def _detection(self, moment: Moment, verdict: Verdict) -> Detection:
        reasons = self.scorer.explain(moment.values, verdict)
        own, departed = self._against_own_profile(moment, verdict)
        # A live value the explanation already gives is not repeated beside the departure.
        explained = {reason.feature for reason in reasons}
        return Detection(
            model=moment.key[0],
            client_ids=(moment.key[1],),
            kind=verdict.kind,
            severity=verdict.severity,
            rule_id=verdict.rule_id,
            score=verdict.score,
            threshold=verdict.threshold,
            reasons=reasons + [reason for reason in own if reason.feature not in explained],
            evidence=evidence_of(moment.evidence, EVIDENCE_KINDS[verdict.kind]),
            first_seen=moment.first_seen,
            last_seen=moment.last_seen,
            queries=moment.queries,
            detected_at=moment.at,
            detected_after_queries=moment.queries,
            atlas_technique=verdict.atlas,
            triage=verdict.triage,
            fired=verdict.fired,
            departed=departed,
            exposure=exposure_of(moment.exposure),
        )

    def _against_own_profile(self, moment: Moment, verdict: Verdict) -> tuple[list[Reason], bool]:
        """What a client known from the baseline does beyond its own profile, and at an hour it was never
        active in (reasons, see `detector.scoring.profiles`); and whether it departed. Nothing for a client
        the baseline never saw."""
        profile = self.model.profiles.get(moment.key) if self.model is not None else None
        if profile is None:
            return [], False
        bounded = verdict.rule_id == ANOMALY_RULE_ID
        departures = profile.departures(verdict.rule_id, verdict.score, moment.values, bounded=bounded)
        off_schedule = profile.off_schedule(moment.at)
        return departures + ([off_schedule] if off_schedule else []), bool(departures)
