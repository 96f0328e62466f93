"""Volume and timing: how much, how fast, how regular, in what batches, over how much of the input space."""

from __future__ import annotations

import dataclasses
import math

from detector.features.base import CounterFeature, ratio
from detector.features.clusters import ClusterMatch
from detector.features.embedding import Observation

QUERIES_FEATURE = "volume.queries"  # a client's query count, as its snapshot names it


@dataclasses.dataclass(slots=True)
class VolumeTiming(CounterFeature):
    """Query and request counts, rate, burstiness and regularity of request inter-arrivals, batch sizes.

    Targets bulk harvesting and scripted probing (high, regular rates); resembled by steady apps and batch
    scorers, whose volume is their normal.
    """

    name = "volume"
    queries: int = 0
    requests: int = 0
    first: float = 0.0  # event time of the earliest and latest request; meaningless until one is counted
    last: float = 0.0
    gaps: int = 0
    gap_mean: float = 0.0
    gap_m2: float = 0.0

    def update(self, observation: Observation, match: ClusterMatch) -> None:
        query = observation.query
        self.queries += 1
        if not query.is_first_row:
            return
        self.requests += 1
        if self.requests == 1:
            self.first = self.last = query.timestamp
            return
        if query.timestamp >= self.last:
            gap = query.timestamp - self.last
            self.gaps += 1
            delta = gap - self.gap_mean
            self.gap_mean += delta / self.gaps
            self.gap_m2 += delta * (gap - self.gap_mean)
        self.first = min(self.first, query.timestamp)
        self.last = max(self.last, query.timestamp)

    def values(self) -> dict[str, float]:
        minutes = max((self.last - self.first) / 60.0, 1.0) if self.requests else 1.0
        std = math.sqrt(self.gap_m2 / (self.gaps - 1)) if self.gaps > 1 else 0.0
        return {
            "queries": self.queries,
            "requests": self.requests,
            "rate_per_minute": self.queries / minutes,
            "mean_batch": ratio(self.queries, self.requests),
            # Coefficient of variation of gaps: ~0 for a metronome script, ~1 for Poisson users, >1 bursty.
            "burstiness": ratio(std, self.gap_mean),
            "active_minutes": minutes,
        }
