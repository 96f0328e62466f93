"""Near-duplicate probing: bursts of variants of one record, rounds of variants of many, and label flips
between near-identical inputs."""

from __future__ import annotations

import dataclasses

from detector.features.base import CounterFeature, moved_on, ratio
from detector.features.clusters import ClusterMatch, MatchKind
from detector.features.embedding import Observation

WALK_SIZE = 50  # beyond the largest augmentation bursts: a walk
# Probing in rounds returns to its records a round apart (the copies of the other candidates in between),
# as a benign client meets an old near-neighbour now and then: both add up over a lifetime. Its pace tells
# them apart: a round completes a record every few queries, chance neighbours one per ~60 (busy benign
# apps). Rounds are counted per half-window of `ROUND_HALF_WINDOW` queries, and the busiest two consecutive
# halves kept: any `ROUND_HALF_WINDOW` consecutive queries are counted whole, with three counters, not a
# list of positions.
ROUND_HALF_WINDOW = 256
# Bursts are counted at their pace too, per half-window of `BURST_HALF_WINDOW` queries (any 512 consecutive
# queries counted whole): a key with months of ordinary history that starts probing (a compromised key) shows
# the attack's pace, where a share of its lifetime's queries would be diluted below any guard. Benign clients
# meet a burst now and then (at most 2 a day in the simulated scenarios); attacks send one every few dozen
# queries, one per ~200 behind three cover queries for each attack query.
BURST_HALF_WINDOW = 512
# A boundary walk flips its label every few queries, behind cover traffic too; a busy benign client meets a
# near-neighbour of another label now and then (one flip per thousands of queries), and would reach any
# count of flips over its lifetime. So flips are also counted within `RECENT_QUERIES` consecutive queries,
# at most `RECENT_FLIPS_KEPT` (the most a rule may ask for: the latest flips are kept, not all).
RECENT_QUERIES = 512
RECENT_FLIPS_KEPT = 8


@dataclasses.dataclass(slots=True)
class NearDuplicateProbing(CounterFeature):
    """Clusters of dense variants of one record, their sizes, and label flips inside them.

    Targets augmentation probing (label-only and LiRA: many records, each queried in 2-50 small variants,
    in a burst per record or in rounds over all of them) and boundary probing (hundreds of near-identical,
    label-only queries whose label flips). Only variants in bursts count as probes (see
    `ClusterMatch.in_burst`): variants that change a few features (what-if analysts), exact repeats
    (retries, dashboards) and returns to an old near-neighbour (`revisits`) are counted apart. Rounds show
    among the revisits (see `ClusterMatch.completes_round`), at their pace.
    """

    name = "probing"
    queries: int = 0
    dense_variants: int = 0
    sparse_variants: int = 0
    revisits: int = 0
    round_clusters: int = 0
    # The most round clusters within two consecutive half-windows (see ROUND_HALF_WINDOW); and the counts
    # of the current half-window (number `round_half`) and of the one before.
    peak_recent_rounds: int = 0
    round_half: int = 0
    rounds_this_half: int = 0
    rounds_last_half: int = 0
    label_only_variants: int = 0
    flips: int = 0
    burst_clusters: int = 0
    # The most bursts within two consecutive half-windows (see BURST_HALF_WINDOW), and the counts of the
    # current half-window (number `burst_half`) and of the one before, as for rounds.
    peak_recent_bursts: int = 0
    burst_half: int = 0
    bursts_this_half: int = 0
    bursts_last_half: int = 0
    walk_clusters: int = 0
    max_cluster_size: int = 1
    # The most flips within `RECENT_QUERIES` consecutive queries so far. It only grows, like every counter
    # here: what a rule reads of it does not depend on when the client happens to be judged (every ~3 %
    # of its queries) or snapshotted for calibration (every 25 %).
    peak_recent_flips: int = 0
    # The query number (`queries` then) of each of the latest `RECENT_FLIPS_KEPT` flips, oldest first.
    flipped_at: list[int] = dataclasses.field(default_factory=list)

    def update(self, observation: Observation, match: ClusterMatch) -> None:
        self.queries += 1
        if match.kind is not MatchKind.VARIANT:
            return
        if not match.dense:
            self.sparse_variants += 1
            return
        if not match.in_burst:
            self.revisits += 1
            if match.completes_round:
                self._count_round()
            return
        self.dense_variants += 1
        if not observation.query.requested.is_confidence:
            self.label_only_variants += 1
        if match.label_flip:
            self.flips += 1
            self.flipped_at.append(self.queries)
            del self.flipped_at[:-RECENT_FLIPS_KEPT]
            # A window holds the most flips when it ends at one: this one.
            recent = sum(1 for at in self.flipped_at if self.queries - at < RECENT_QUERIES)
            self.peak_recent_flips = max(self.peak_recent_flips, recent)
        # A burst is a run of copies of one record, back to back, counted once a record: a record met again
        # long after, and then a near-neighbour or two by chance (busy benign clients of low-dimensional
        # data), is none, and nor is a second run over the same entity (monitoring re-scoring a few).
        if match.completes_burst:
            self.burst_clusters += 1
            self.burst_half, self.bursts_this_half, self.bursts_last_half, self.peak_recent_bursts = _paced(
                (self.burst_half, self.bursts_this_half, self.bursts_last_half, self.peak_recent_bursts),
                self.queries // BURST_HALF_WINDOW,
            )
        if match.cluster_size == WALK_SIZE:
            self.walk_clusters += 1
        self.max_cluster_size = max(self.max_cluster_size, match.cluster_size)

    def _count_round(self) -> None:
        self.round_clusters += 1
        self.round_half, self.rounds_this_half, self.rounds_last_half, self.peak_recent_rounds = _paced(
            (self.round_half, self.rounds_this_half, self.rounds_last_half, self.peak_recent_rounds),
            self.queries // ROUND_HALF_WINDOW,
        )

    def values(self) -> dict[str, float]:
        return {
            "dense_variants": self.dense_variants,
            "sparse_variants": self.sparse_variants,
            "revisits": self.revisits,
            "revisit_share": ratio(self.revisits, self.queries),
            "round_clusters": self.round_clusters,
            "peak_recent_rounds": self.peak_recent_rounds,
            "label_only_share": ratio(self.label_only_variants, self.dense_variants),
            "flips": self.flips,
            "flip_rate": ratio(self.flips, self.dense_variants),
            "peak_recent_flips": self.peak_recent_flips,
            "burst_clusters": self.burst_clusters,
            "peak_recent_bursts": self.peak_recent_bursts,
            # Bursts per query over the client's lifetime: probing sends one per few dozen queries, benign
            # near-neighbours one per thousands; a long history dilutes it (rules read the pace instead).
            "burst_share": ratio(self.burst_clusters, self.queries),
            "walk_clusters": self.walk_clusters,
            "max_cluster_size": self.max_cluster_size,
        }


_PaceCount = tuple[int, int, int, int]


def _paced(pace: _PaceCount, now: int) -> _PaceCount:
    """A pace count (half-window number, count in it, count in the one before, most in two consecutive
    half-windows) once one more event came in half-window `now` (never before the count's): the count of a
    half-window left behind moves to the one before, or to nothing when a whole half-window passed without
    an event."""
    half, this_half, last_half, peak = pace
    if now != half:
        (this_half, last_half), half = moved_on(half, now, this_half), now
    this_half += 1
    return half, this_half, last_half, max(peak, this_half + last_half)
