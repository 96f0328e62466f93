"""Confidence harvesting: many distinct records, each asked for its full confidence vector, and confidence
climbing: a record changed a few features at a time while the model's confidence in it keeps rising."""

from __future__ import annotations

import dataclasses
import math

from detector.domain import Requested
from detector.features.base import CounterFeature, ratio
from detector.features.clusters import ClusterMatch, MatchKind
from detector.features.embedding import Observation

# A rise in the top class's probability smaller than this is noise, not a step of a climb.
CLIMB_STEP = 0.01


@dataclasses.dataclass(slots=True)
class ConfidenceHarvesting(CounterFeature):
    """Share of queries asking for probabilities / top-k / logprobs, how many distinct records were asked so,
    and statistics of the confidence returned (max, margin, entropy).

    Targets shadow-model and threshold attacks (one query per candidate record, full confidence vectors) and
    logprob harvesting on text models; resembled by heavy batch scorers and evaluation-set scoring.

    `climbs` counts sparse variants (a few features changed) that raised the highest top-class probability
    seen in their record's cluster by at least `CLIMB_STEP`: shadow-data synthesis (Shokri et al.) hill-climbs
    one record at a time towards high confidence, where a what-if user's changes go up and down a few times.
    One climb is followed at a time, the cluster of the latest new record or sparse variant.
    """

    name = "confidence"
    queries: int = 0
    asked: int = 0
    asked_rich: int = 0
    distinct_asked: int = 0
    returned: int = 0
    max_sum: float = 0.0
    margin_sum: float = 0.0
    entropy_sum: float = 0.0
    climbs: int = 0
    climb_cluster: int = -1
    climb_best: float = 0.0

    def update(self, observation: Observation, match: ClusterMatch) -> None:
        query = observation.query
        self.queries += 1
        if query.requested.is_confidence:
            self.asked += 1
            if query.requested in (Requested.TOP_K, Requested.LOGPROBS):
                self.asked_rich += 1
            if match.kind is MatchKind.NEW:
                self.distinct_asked += 1
        probabilities = query.probabilities
        if probabilities is not None and probabilities.size > 1:
            # Plain floats: for the few classes of most models this is several times faster than numpy.
            values = probabilities.tolist()
            total = sum(values)
            if total > 0 and math.isfinite(total):
                second, first = sorted(values)[-2:]
                self.returned += 1
                self.max_sum += first / total
                self._climb(match, first / total)
                self.margin_sum += (first - second) / total
                self.entropy_sum -= sum(p / total * math.log(p / total) for p in values if p > 0)

    def _climb(self, match: ClusterMatch, top: float) -> None:
        if match.kind is MatchKind.NEW or (match.kind is MatchKind.VARIANT and not match.dense):
            if match.kind is MatchKind.VARIANT and match.cluster == self.climb_cluster:
                if top >= self.climb_best + CLIMB_STEP:
                    self.climbs += 1
                self.climb_best = max(self.climb_best, top)
            else:
                self.climb_cluster, self.climb_best = match.cluster, top

    def values(self) -> dict[str, float]:
        return {
            "asked_share": ratio(self.asked, self.queries),
            "rich_share": ratio(self.asked_rich, self.queries),
            "distinct_asked": self.distinct_asked,
            "mean_max": ratio(self.max_sum, self.returned),
            "mean_margin": ratio(self.margin_sum, self.returned),
            "mean_entropy": ratio(self.entropy_sum, self.returned),
            "climbs": self.climbs,
        }
