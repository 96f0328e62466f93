"""Training-set proximity: how often a client's queries are (near-)copies of the model's training records."""

from __future__ import annotations

import dataclasses

from detector.features.base import CounterFeature, ratio
from detector.features.clusters import ClusterMatch, MatchKind
from detector.features.embedding import Observation


@dataclasses.dataclass(slots=True)
class TrainingSetProximity(CounterFeature):
    """Exact and near hit counts and rates into the training-set index (zero when no index is loaded).

    Targets membership inference itself: an attacker's candidates are, in part, the real training records.
    Resembled by internal jobs re-scoring the training data (allow-list them).
    """

    name = "training"
    queries: int = 0
    exact_hits: int = 0
    near_hits: int = 0
    distinct_hits: int = 0
    distinct_exact_hits: int = 0

    def update(self, observation: Observation, match: ClusterMatch) -> None:
        self.queries += 1
        if observation.training_hit == 0:
            return
        if observation.training_hit == 2:
            self.exact_hits += 1
        else:
            self.near_hits += 1
        if match.kind is MatchKind.NEW:
            self.distinct_hits += 1
            if observation.training_hit == 2:
                self.distinct_exact_hits += 1

    def values(self) -> dict[str, float]:
        hits = self.exact_hits + self.near_hits
        return {
            "hits": hits,
            "distinct_hits": self.distinct_hits,
            "distinct_exact_hits": self.distinct_exact_hits,
            "hit_rate": ratio(hits, self.queries),
            "exact_hit_rate": ratio(self.exact_hits, self.queries),
        }
