"""Exposure accounting: what a client has been given by the model, counted whether or not a rule fires."""

from __future__ import annotations

import dataclasses

from detector.domain import Exposure, Query
from detector.features.base import CounterFeature
from detector.features.clusters import ClusterMatch, MatchKind
from detector.features.embedding import Observation

Counts = tuple[int, int, int, int]  # probability records, training records, label-only answers, probes


def answered_with_probabilities(query: Query) -> bool:
    """True when the client got a confidence vector back: the logged response says so when it holds
    probabilities, else what the client asked for does (a log without responses)."""
    if query.probabilities is not None:
        return query.probabilities.size > 1
    return query.requested.is_confidence


@dataclasses.dataclass(slots=True)
class ExposureCounts(CounterFeature):
    """The counts of `detector.domain.Exposure`, kept for one client (in its features) or for every client
    of the process (for metrics without client ids).

    Not a rule input: a batch scorer's exposure is as large as an attacker's, and the rules judge how it was
    gathered. It answers the question after an alert: how much did this client already get?
    """

    name = "exposure"
    probability_records: int = 0
    training_records: int = 0
    label_only_answers: int = 0
    probes: int = 0

    def update(self, observation: Observation, match: ClusterMatch) -> None:
        if not answered_with_probabilities(observation.query):
            self.label_only_answers += 1
        elif match.kind is MatchKind.NEW:
            self.probability_records += 1
            if observation.training_hit:
                self.training_records += 1
        if match.in_burst:
            self.probes += 1

    def values(self) -> dict[str, float]:
        return {
            "probability_records": self.probability_records,
            "training_records": self.training_records,
            "label_only_answers": self.label_only_answers,
            "probes": self.probes,
        }

    def counts(self) -> Counts:
        """The counts, in `Exposure`'s order: a tuple, cheap enough to take at every judgement."""
        return self.probability_records, self.training_records, self.label_only_answers, self.probes

    def exposure(self) -> Exposure:
        """The counts as the domain value alerts and reports carry."""
        return exposure_of(self.counts())


def exposure_of(counts: Counts) -> Exposure:
    """The domain value of `counts` (from `ExposureCounts.counts`)."""
    probability_records, training_records, label_only_answers, probes = counts
    return Exposure(
        probability_records=probability_records,
        training_records=training_records,
        label_only_answers=label_only_answers,
        probes=probes,
    )
