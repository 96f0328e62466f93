"""Training-set proximity: how often a client's queries are (near-)copies of the model's training records."""

from __future__ import annotations

import dataclasses

from detector.features.base import CounterFeature, moved_on, ratio
from detector.features.clusters import ClusterMatch, MatchKind
from detector.features.embedding import Observation

# The share of a client's new records that are training records is also measured over its recent ones, per
# half-window of `HIT_HALF_WINDOW` queries: a key with months of ordinary history that starts sending training
# records (a compromised key) shows the attack's share, where its lifetime's share is diluted below any guard.
# Half-windows of 128 queries: an attack is diluted by at most 256 queries of the key's own traffic, and
# chance near hits (well under 1 % of ordinary records) never make a tenth of 128 records or more.
HIT_HALF_WINDOW = 128
# A recent share is measured only once the recent records hold this many training records (MIA-003's floor):
# one chance near hit among a young client's first records is no share of anything.
MIN_RECENT_HITS = 5


@dataclasses.dataclass(slots=True)
class TrainingSetProximity(CounterFeature):
    """Exact and near hit counts and rates into the training-set index (zero when no index is loaded).

    Targets membership inference itself: an attacker's candidates are, in part, the real training records.
    Resembled by internal jobs re-scoring the training data (allow-list them). `peak_recent_hit_share` is
    the highest share of training records among the new records (`MatchKind.NEW`: copies and retries of a
    record count once) of two consecutive half-windows (see `HIT_HALF_WINDOW`), taken at each distinct hit
    once those hold `MIN_RECENT_HITS`: the share while an attack goes on, however long the key's history.
    """

    name = "training"
    queries: int = 0
    exact_hits: int = 0
    near_hits: int = 0
    distinct_hits: int = 0
    distinct_exact_hits: int = 0
    # New records and distinct hits in the current half-window (number `recent_half`) and the one before;
    # the highest share of hits among them so far (see `peak_recent_hit_share`).
    recent_half: int = 0
    records_this_half: int = 0
    records_last_half: int = 0
    hits_this_half: int = 0
    hits_last_half: int = 0
    peak_recent_hit_share: float = 0.0

    def update(self, observation: Observation, match: ClusterMatch) -> None:
        self.queries += 1
        if observation.training_hit == 2:
            self.exact_hits += 1
        elif observation.training_hit == 1:
            self.near_hits += 1
        if match.kind is not MatchKind.NEW:
            return
        self._count_recent_record(hit=observation.training_hit != 0)
        if observation.training_hit:
            self.distinct_hits += 1
            if observation.training_hit == 2:
                self.distinct_exact_hits += 1

    def _count_recent_record(self, *, hit: bool) -> None:
        half = self.queries // HIT_HALF_WINDOW
        if half != self.recent_half:
            self.records_this_half, self.records_last_half = moved_on(
                self.recent_half, half, self.records_this_half
            )
            self.hits_this_half, self.hits_last_half = moved_on(self.recent_half, half, self.hits_this_half)
            self.recent_half = half
        self.records_this_half += 1
        if not hit:
            return
        self.hits_this_half += 1
        hits = self.hits_this_half + self.hits_last_half
        if hits >= MIN_RECENT_HITS:
            share = hits / (self.records_this_half + self.records_last_half)
            self.peak_recent_hit_share = max(self.peak_recent_hit_share, share)

    def values(self) -> dict[str, float]:
        hits = self.exact_hits + self.near_hits
        return {
            "hits": hits,
            "distinct_hits": self.distinct_hits,
            "distinct_exact_hits": self.distinct_exact_hits,
            "hit_rate": ratio(hits, self.queries),
            "exact_hit_rate": ratio(self.exact_hits, self.queries),
            "peak_recent_hit_share": self.peak_recent_hit_share,
        }
