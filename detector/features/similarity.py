"""Query similarity: how close each query is to the client's earlier ones (exact, variant, or new)."""

from __future__ import annotations

import bisect
import dataclasses

from detector.features.base import CounterFeature, ratio
from detector.features.clusters import ClusterMatch, MatchKind
from detector.features.embedding import Observation

# Upper edges of the nearest-distance histogram, in units of the typical distance between unrelated records.
DISTANCE_EDGES = (0.0, 0.01, 0.03, 0.06, 0.12, 0.25, 0.5, 1.0)


@dataclasses.dataclass(slots=True)
class QuerySimilarity(CounterFeature):
    """Distribution of distances from each query to the nearest of the client's earlier queries.

    Targets near-duplicate probing of every kind; resembled by retry storms and polling dashboards (exact
    repeats, reported apart) and by what-if analysts (variants that change few features).
    """

    name = "similarity"
    queries: int = 0
    exact: int = 0
    variants: int = 0
    new: int = 0
    histogram: list[int] = dataclasses.field(default_factory=lambda: [0] * (len(DISTANCE_EDGES) + 1))

    def update(self, observation: Observation, match: ClusterMatch) -> None:
        self.queries += 1
        if match.kind is MatchKind.EXACT:
            self.exact += 1
        elif match.kind is MatchKind.VARIANT:
            self.variants += 1
        else:
            self.new += 1
        if match.distance != float("inf"):
            self.histogram[bisect.bisect_left(DISTANCE_EDGES, match.distance)] += 1

    def values(self) -> dict[str, float]:
        compared = sum(self.histogram)
        near = sum(self.histogram[: DISTANCE_EDGES.index(0.12) + 1])
        return {
            "exact_share": ratio(self.exact, self.queries),
            "variant_share": ratio(self.variants, self.queries),
            "distinct_share": ratio(self.new, self.queries),
            "near_share": ratio(near, compared),
            "nearest_median": self._median(),
        }

    def _median(self) -> float:
        half = sum(self.histogram) / 2
        if not half:
            return 1.0
        cumulative = 0
        for bucket, count in enumerate(self.histogram):
            cumulative += count
            if cumulative >= half:
                return DISTANCE_EDGES[bucket] if bucket < len(DISTANCE_EDGES) else 2.0
        return 2.0
