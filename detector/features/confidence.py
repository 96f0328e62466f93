"""Confidence harvesting: many distinct records, each asked for its full confidence vector."""

from __future__ import annotations

import dataclasses
import math

from detector.domain import Requested
from detector.features.base import CounterFeature, ratio
from detector.features.clusters import ClusterMatch, MatchKind
from detector.features.embedding import Observation


@dataclasses.dataclass
class ConfidenceHarvesting(CounterFeature):
    """Share of queries asking for probabilities / top-k / logprobs, how many distinct records were asked so,
    and statistics of the confidence returned (max, margin, entropy).

    Targets shadow-model and threshold attacks (one query per candidate record, full confidence vectors) and
    logprob harvesting on text models; resembled by heavy batch scorers and evaluation-set scoring.
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
                self.margin_sum += (first - second) / total
                self.entropy_sum -= sum(p / total * math.log(p / total) for p in values if p > 0)

    def values(self) -> dict[str, float]:
        return {
            "asked_share": ratio(self.asked, self.queries),
            "rich_share": ratio(self.asked_rich, self.queries),
            "distinct_asked": self.distinct_asked,
            "mean_max": ratio(self.max_sum, self.returned),
            "mean_margin": ratio(self.margin_sum, self.returned),
            "mean_entropy": ratio(self.entropy_sum, self.returned),
        }
