"""Per-client clusters of variants of one record: the index every similarity feature reads.

Each query is matched against the client's recent clusters. Its fingerprint seen before → an exact repeat
(retries, polling dashboards); within `VARIANT_RADIUS` of a cluster's latest member (or, for image-like rows,
within `INVARIANT_RADIUS` of it in the shift/flip-invariant view) → a variant of that record; otherwise a new
record starts a cluster. Because a cluster is represented by its *latest* member, a decision-boundary walk
that drifts step by step stays one cluster. Memory is bounded: at most `MAX_CLUSTERS` clusters (least
recently matched ones are dropped, their counts kept) and `MAX_FINGERPRINTS` remembered fingerprints.
Search is exact over the bounded set of cluster representatives: O(MAX_CLUSTERS) per query, never O(n²).
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from detector.features.embedding import PROJECTION_DIM, Observation, pack, unpack

VARIANT_RADIUS = 0.12
# Trigram sketches of two prompts that differ by a few words are ~0.2-0.3 apart, unrelated prompts ~1.
TEXT_VARIANT_RADIUS = 0.35
INVARIANT_RADIUS = 0.12
INVARIANT_RECENT = 16
MAX_CLUSTERS = 256
MAX_FINGERPRINTS = 4096
# A variant changing at least this share of the features is "dense" (noise, shifts, walks), not a what-if.
DENSE_CHANGE_SHARE = 0.5
# A variant arriving within this many queries of its cluster's previous member is part of a burst; benign
# traffic meets an old near-neighbour now and then, probing attacks query variants back to back.
BURST_GAP = 16


class MatchKind(IntEnum):
    """How a query relates to the client's earlier queries."""

    NEW = 0
    EXACT = 1
    VARIANT = 2


@dataclass(slots=True)
class ClusterMatch:
    """The outcome of matching one query: its kind, cluster, distance to it, and what the variant changed."""

    kind: MatchKind
    cluster: int
    distance: float
    dense: bool = False
    label_flip: bool = False
    cluster_size: int = 1
    gap: int = 0  # queries since the cluster was last matched

    @property
    def in_burst(self) -> bool:
        """True for a dense variant that follows its cluster's previous member closely (see BURST_GAP)."""
        return self.kind is MatchKind.VARIANT and self.dense and self.gap <= BURST_GAP


class RecordClusters:
    """Bounded clusters of one client's queries (see the module docstring)."""

    def __init__(self) -> None:
        # Storage grows by doubling up to MAX_CLUSTERS: most clients never need more than a few slots.
        self._points = np.zeros((4, PROJECTION_DIM), dtype=np.float32)
        self._invariants: np.ndarray | None = None
        self._labels: list[str | None] = []
        self._sizes: list[int] = []
        self._ids: list[int] = []
        self._touched_at: list[int] = []
        self._sequence = 0
        self._slots: OrderedDict[int, int] = OrderedDict()  # cluster id -> slot, least recent first
        self._fingerprints: OrderedDict[int, int] = OrderedDict()  # fingerprint -> cluster id
        self._next_id = 0
        self._last_raw: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._slots)

    def assign(self, observation: Observation) -> ClusterMatch:
        """Match `observation` to a cluster (creating one if needed) and remember it; return the match."""
        self._sequence += 1
        match = self._match(observation)
        self._last_raw = observation.raw
        return match

    def _match(self, observation: Observation) -> ClusterMatch:
        label = observation.query.label
        cluster = self._fingerprints.get(observation.fingerprint)
        if cluster is not None and cluster in self._slots:
            self._fingerprints.move_to_end(observation.fingerprint)
            slot, gap = self._touch(cluster)
            return ClusterMatch(MatchKind.EXACT, cluster, 0.0, cluster_size=self._sizes[slot], gap=gap)

        nearest, distance = self._nearest(observation)
        if nearest is not None:
            slot = nearest
            cluster = self._ids[slot]
            _, gap = self._touch(cluster)
            flip = label is not None and self._labels[slot] is not None and label != self._labels[slot]
            self._labels[slot] = label
            self._points[slot] = observation.point
            if observation.invariant is not None and self._invariants is not None:
                self._invariants[slot] = observation.invariant
            self._sizes[slot] += 1
            self._remember(observation.fingerprint, cluster)
            return ClusterMatch(
                MatchKind.VARIANT,
                cluster,
                distance,
                dense=self._dense_change(observation.raw),
                label_flip=flip,
                cluster_size=self._sizes[slot],
                gap=gap,
            )

        cluster = self._new_cluster(observation)
        return ClusterMatch(MatchKind.NEW, cluster, distance)

    def _nearest(self, observation: Observation) -> tuple[int | None, float]:
        """The slot of the matching cluster (or None) and the distance to the nearest representative."""
        used = len(self._ids)
        if not used:
            return None, float("inf")
        difference = self._points[:used] - observation.point
        squared = np.einsum("ij,ij->i", difference, difference)
        best = int(squared.argmin())
        nearest = math.sqrt(float(squared[best]))
        if nearest <= (VARIANT_RADIUS if observation.raw is not None else TEXT_VARIANT_RADIUS):
            return best, nearest
        if observation.invariant is not None and self._invariants is not None:
            recent = np.fromiter(reversed(self._slots.values()), dtype=np.int64, count=used)[
                :INVARIANT_RECENT
            ]
            difference = self._invariants[recent] - observation.invariant
            squared = np.einsum("ij,ij->i", difference, difference)
            candidate = int(squared.argmin())
            if squared[candidate] <= INVARIANT_RADIUS**2:
                return int(recent[candidate]), math.sqrt(float(squared[candidate]))
        return None, nearest

    def _new_cluster(self, observation: Observation) -> int:
        cluster = self._next_id
        self._next_id += 1
        if len(self._ids) >= MAX_CLUSTERS:
            _, slot = self._slots.popitem(last=False)
            self._ids[slot] = cluster
            self._labels[slot] = observation.query.label
            self._sizes[slot] = 1
            self._touched_at[slot] = self._sequence
        else:
            slot = len(self._ids)
            self._ids.append(cluster)
            self._touched_at.append(self._sequence)
            self._labels.append(observation.query.label)
            self._sizes.append(1)
            self._grow(slot + 1, observation)
        self._points[slot] = observation.point
        if observation.invariant is not None and self._invariants is not None:
            self._invariants[slot] = observation.invariant
        self._slots[cluster] = slot
        self._remember(observation.fingerprint, cluster)
        return cluster

    def _grow(self, needed: int, observation: Observation) -> None:
        capacity = self._points.shape[0]
        if needed > capacity:
            capacity = min(max(capacity * 2, needed), MAX_CLUSTERS)
            self._points = np.resize(self._points, (capacity, PROJECTION_DIM))
            if self._invariants is not None:
                self._invariants = np.resize(self._invariants, (capacity, self._invariants.shape[1]))
        if observation.invariant is not None and self._invariants is None:
            self._invariants = np.zeros((capacity, observation.invariant.shape[0]), dtype=np.float32)

    def _touch(self, cluster: int) -> tuple[int, int]:
        """Mark `cluster` matched now; return its slot and the queries since it was last matched."""
        self._slots.move_to_end(cluster)
        slot = self._slots[cluster]
        gap = self._sequence - self._touched_at[slot]
        self._touched_at[slot] = self._sequence
        return slot, gap

    def _remember(self, fingerprint: int, cluster: int) -> None:
        self._fingerprints[fingerprint] = cluster
        self._fingerprints.move_to_end(fingerprint)
        if len(self._fingerprints) > MAX_FINGERPRINTS:
            self._fingerprints.popitem(last=False)

    def _dense_change(self, raw: np.ndarray | None) -> bool:
        """True when the variant changed most features since the previous query (noise, shifts, walks),
        False when it changed a few (a what-if analyst editing one or two fields)."""
        previous = self._last_raw
        if raw is None or previous is None or previous.shape != raw.shape:
            return True
        scale = np.maximum(np.abs(previous), 1e-6)
        changed = np.abs(raw - previous) > 1e-4 * scale
        return bool(changed.mean() >= DENSE_CHANGE_SHARE)

    # -- state ---------------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """JSON-serialisable state, sharing nothing with the clusters: representatives' points (float32,
        base64), labels, sizes, recency, fingerprints, and the previous query's row, which the next query's
        dense-change test compares against: the one raw input the state holds."""
        used = len(self._ids)
        return {
            "ids": list(self._ids),
            "points": pack(self._points[:used]),
            "invariants": None if self._invariants is None else pack(self._invariants[:used]),
            "labels": list(self._labels),
            "sizes": list(self._sizes),
            "touched_at": list(self._touched_at),
            "sequence": self._sequence,
            "recency": [[cluster, slot] for cluster, slot in self._slots.items()],
            "fingerprints": [[fingerprint, cluster] for fingerprint, cluster in self._fingerprints.items()],
            "next_id": self._next_id,
            "last_row": None if self._last_raw is None else pack(self._last_raw),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RecordClusters:
        """Clusters continuing from `state` (see `state`), sharing nothing with it."""
        clusters = cls()
        clusters._ids = [int(cluster) for cluster in state["ids"]]
        used = len(clusters._ids)
        clusters._labels = [None if label is None else sys.intern(str(label)) for label in state["labels"]]
        clusters._sizes = [int(size) for size in state["sizes"]]
        clusters._touched_at = [int(sequence) for sequence in state["touched_at"]]
        clusters._sequence = int(state["sequence"])
        if used:
            clusters._points = unpack(state["points"]).reshape(used, PROJECTION_DIM)
        if state["invariants"] is not None:
            clusters._invariants = unpack(state["invariants"]).reshape(used, -1)
        clusters._slots = OrderedDict((int(cluster), int(slot)) for cluster, slot in state["recency"])
        clusters._fingerprints = OrderedDict((int(fp), int(cluster)) for fp, cluster in state["fingerprints"])
        clusters._next_id = int(state["next_id"])
        clusters._last_raw = None if state["last_row"] is None else unpack(state["last_row"])
        return clusters
