"""Per-client clusters of variants of one record: the index every similarity feature reads.

Each query is matched against the client's recent clusters. Its fingerprint seen before → an exact repeat
(retries, polling dashboards); within `VARIANT_RADIUS` of a cluster's latest member (or, for image-like rows,
within `INVARIANT_RADIUS` of it in the shift/flip-invariant view) → a variant of that record; otherwise a
new record starts a cluster. Because a cluster is represented by its *latest* member, a decision-boundary
walk that drifts step by step stays one cluster. Memory is bounded: at most
`MAX_CLUSTERS` clusters (least recently matched ones are dropped, their counts kept) and `MAX_FINGERPRINTS`
remembered fingerprints, all held in numpy columns that grow by half again (no Python object per cluster or
fingerprint); older clusters' points are quantised (see `Representatives`). Search is exhaustive over the
bounded set of cluster representatives: O(MAX_CLUSTERS) per query, never O(n²).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from detector.features.columns import REBASED_SEQUENCE, SEQUENCE_LIMIT, extended, sequences
from detector.features.embedding import PROJECTION_DIM, Observation
from detector.features.representatives import Representatives
from detector.features.state_bytes import stored_column

VARIANT_RADIUS = 0.12
# Trigram sketches of two prompts that differ by a few words are ~0.2-0.3 apart, unrelated prompts ~1.
TEXT_VARIANT_RADIUS = 0.35
INVARIANT_RADIUS = 0.12
MAX_CLUSTERS = 256
# Beyond the clusters' own bound, fingerprints serve only repeats of the older variants of clusters still
# held: 512 of them keep a key's clusters and fingerprints within 50 KiB.
MAX_FINGERPRINTS = 512
# A cluster's size saturates here (an int32 column).
SIZE_LIMIT = 2**31 - 1
# Columns grow by half again (not by doubling) up to their bound: less slack in a client's memory.
GROWTH = 1.5
# A variant changing at least this share of the features is "dense" (noise, shifts, walks), not a what-if.
DENSE_CHANGE_SHARE = 0.5
# A variant arriving within this many queries of its cluster's previous member is part of a burst; benign
# traffic meets an old near-neighbour now and then, probing attacks query variants back to back.
BURST_GAP = 16
# A burst: a record and two copies (or three copies), each within BURST_GAP queries of the one before: the
# smallest augmentation probe (2r+1 queries with r=1). A cluster has one at most, its first such run.
BURST_SIZE = 3
# A record and two copies, each come back to a round of other records later: the smallest probe in rounds.
ROUND_SIZE = 3


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
    # True for the variant that completes its cluster's burst (see BURST_SIZE): a run of copies of one
    # record back to back, where `cluster_size` counts members over the cluster's lifetime.
    completes_burst: bool = False

    @property
    def in_burst(self) -> bool:
        """True for a dense variant that follows its cluster's previous member closely (see BURST_GAP)."""
        return self.kind is MatchKind.VARIANT and self.dense and self.gap <= BURST_GAP

    @property
    def completes_round(self) -> bool:
        """True for a dense variant beyond a burst's reach that makes its cluster `ROUND_SIZE`: the record
        came back, a second time, a round of other records after its previous copy."""
        return (
            self.kind is MatchKind.VARIANT
            and self.dense
            and self.gap > BURST_GAP
            and self.cluster_size == ROUND_SIZE
        )


# A cluster's label is held as a 32-bit code, 0 for none: a flip is a change of code, and two labels sharing
# a code (one pair in four billion) would hide one flip, where a string a cluster would cost 8 more bytes.
NO_LABEL = 0


def label_code(label: str | None) -> int:
    """The code of `label` (see NO_LABEL): `NO_LABEL` for none, else a CRC-32 of it, never `NO_LABEL`."""
    if label is None:
        return NO_LABEL
    return zlib.crc32(str(label).encode()) % 0xFFFFFFFF + 1


def _stored_label_codes(stored: Any) -> np.ndarray:
    """The clusters' label codes as a state holds them: a column of codes or, in a state stored as JSON,
    codes with null for none or (stored before label codes, or by a version keeping labels) the labels
    themselves. Raises `ValueError` on a code out of range."""
    if not isinstance(stored, np.ndarray) and not set(map(type, stored)) <= {int, bool, type(None)}:
        stored = [label if label is None or isinstance(label, int) else label_code(label) for label in stored]
    # Converted whole: null reads as NaN, and a code (below 2**32) exactly.
    codes = np.nan_to_num(np.array(stored, dtype=np.float64), nan=NO_LABEL)
    if codes.size and (codes.min() < 0 or codes.max() > 0xFFFFFFFF):
        raise ValueError("a stored label code is out of range")
    return codes.astype(np.uint32)


def _stored_runs(stored: Any, sizes: np.ndarray, touched_at: np.ndarray, sequence: int) -> np.ndarray:
    """The clusters' runs as a state holds them: one count from 0 to 255 a cluster, BURST_SIZE and above
    meaning its burst is done. Raises `ValueError` otherwise. A state stored before runs were kept gives
    runs that count no burst twice: done for a cluster of BURST_SIZE members or more (its burst, if any,
    was counted), every member for one matched within BURST_GAP queries, else 1."""
    if stored is None:
        recent = sequence - touched_at.astype(np.int64) <= BURST_GAP
        derived: np.ndarray = np.where(sizes >= BURST_SIZE, BURST_SIZE, np.where(recent, sizes, 1))
        return derived.astype(np.uint8)
    runs = np.asarray(stored)
    if runs.shape != sizes.shape or (runs.size and runs.dtype.kind not in "iu"):
        raise ValueError("a stored state has not one integer run a cluster")
    if runs.size and (runs.min() < 0 or runs.max() > 255):
        raise ValueError("a stored run is out of range")
    kept: np.ndarray = np.minimum(runs, BURST_SIZE).astype(np.uint8)
    return kept


def _grown_capacity(capacity: int) -> int:
    """The next capacity of a column of `capacity` rows (before its bound)."""
    return max(capacity + 1, int(capacity * GROWTH))


class FingerprintTable:
    """The slot of the cluster of each of the latest `MAX_FINGERPRINTS` fingerprints, the least recently used
    dropped first: three numpy columns (14 bytes a fingerprint), looked up by one vector comparison. A slot
    given to another cluster is forgotten (`forget_slot`): its fingerprints then find nothing."""

    __slots__ = ("_count", "_fingerprints", "_looked_up", "_slots", "_used_at")

    def __init__(self) -> None:
        self._fingerprints = np.zeros(16, dtype=np.uint64)
        self._slots = np.zeros(16, dtype=np.int16)  # -1: the cluster gave way
        self._used_at = np.zeros(16, dtype=np.int32)  # the client's query sequence at the last use
        self._count = 0
        # The last fingerprint looked up and where: a query's `put` follows its `get`, one scan a query.
        self._looked_up: tuple[int, int | None] | None = None

    def __len__(self) -> int:
        return self._count

    def _position(self, fingerprint: int) -> int | None:
        if self._looked_up is not None and self._looked_up[0] == fingerprint:
            return self._looked_up[1]
        # argmax of the comparison: the first match, in two array calls (flatnonzero takes four).
        matches = self._fingerprints[: self._count] == np.uint64(fingerprint)
        first = int(matches.argmax()) if self._count else 0
        position = first if self._count and matches[first] else None
        self._looked_up = (fingerprint, position)
        return position

    def get(self, fingerprint: int, now: int) -> int | None:
        """The slot of the cluster of `fingerprint`, marking it used at `now`; None when it is not
        remembered, or its cluster gave way."""
        position = self._position(fingerprint)
        if position is None:
            return None
        self._used_at[position] = now
        slot = int(self._slots[position])
        return slot if slot >= 0 else None

    def put(self, fingerprint: int, slot: int, now: int) -> None:
        """Remember `fingerprint` as a member of the cluster in `slot`, used at `now` (`now` grows with every
        call)."""
        position = self._position(fingerprint)
        if position is None:
            if self._count < MAX_FINGERPRINTS:
                position = self._count
                self._count += 1
                if position == self._fingerprints.shape[0]:
                    capacity = min(_grown_capacity(position), MAX_FINGERPRINTS)
                    self._fingerprints = extended(self._fingerprints, capacity)
                    self._slots = extended(self._slots, capacity)
                    self._used_at = extended(self._used_at, capacity)
            else:
                position = int(self._used_at.argmin())
            self._fingerprints[position] = fingerprint
        self._looked_up = (fingerprint, position)
        self._slots[position] = slot
        self._used_at[position] = now

    def forget_slot(self, slot: int) -> None:
        """The cluster in `slot` gave way to another: its fingerprints find nothing from now on."""
        slots = self._slots[: self._count]
        slots[slots == slot] = -1

    def rebase(self, shift: int) -> None:
        """Move every use back `shift` queries (see `detector.features.columns.sequences`)."""
        self._used_at = sequences(self._used_at, shift)

    def columns(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The fingerprints, least recently used first, and the cluster id of each, with `ids` the cluster id
        of each slot (-1 for a cluster that gave way)."""
        order = self._used_at[: self._count].argsort(kind="stable")
        slots = self._slots[order]
        clusters = np.full(slots.shape[0], -1, dtype=np.int64)
        held = slots >= 0
        clusters[held] = ids[slots[held]]
        return self._fingerprints[order], clusters

    @classmethod
    def of(cls, fingerprints: np.ndarray, clusters: np.ndarray, ids: np.ndarray) -> FingerprintTable:
        """The table of `fingerprints` (least recently used first) and the cluster id of each, with `ids`
        the cluster id of each slot held, all distinct (a fingerprint of a cluster not held finds nothing),
        used before any query to come."""
        table = cls()
        count = min(fingerprints.shape[0], MAX_FINGERPRINTS)
        kept = slice(fingerprints.shape[0] - count, None)
        capacity = min(max(16, count), MAX_FINGERPRINTS)
        table._fingerprints = np.zeros(capacity, dtype=np.uint64)
        table._slots = np.zeros(capacity, dtype=np.int16)
        table._used_at = np.zeros(capacity, dtype=np.int32)
        table._fingerprints[:count] = fingerprints[kept]
        table._slots[:count] = _slots_of(clusters[kept], ids)
        # Older than every query to come: a restored client's queries go on from its stored sequence.
        table._used_at[:count] = np.arange(-count, 0)
        table._count = count
        return table


def _stored_fingerprints(stored: Any) -> tuple[np.ndarray, np.ndarray]:
    """The fingerprints and their cluster ids a state holds: two columns, or (in a state stored as JSON)
    (fingerprint, cluster id) pairs. Raises `ValueError` on anything else, `OverflowError` on a number out of
    range."""
    if isinstance(stored, dict):
        fingerprints, clusters = stored["values"], stored["clusters"]
    elif all(isinstance(pair, list) and len(pair) == 2 for pair in stored):
        fingerprints = [pair[0] for pair in stored]
        clusters = [pair[1] for pair in stored]
    else:
        raise ValueError("a stored state's fingerprints are not (fingerprint, cluster) pairs")
    values, owners = np.array(fingerprints, dtype=np.uint64), np.array(clusters, dtype=np.int64)
    if values.ndim != 1 or values.shape != owners.shape:
        raise ValueError("a stored state's fingerprints are not two columns of one length")
    return values, owners


def _slots_of(clusters: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The slot of each of `clusters` in `ids` (the cluster id of each slot, all distinct), -1 where none."""
    if not ids.shape[0]:
        return np.full(clusters.shape[0], -1)
    order = ids.argsort(kind="stable")
    positions = np.minimum(np.searchsorted(ids[order], clusters), ids.shape[0] - 1)
    slots = order[positions]
    return np.where(ids[slots] == clusters, slots, -1)


class RecordClusters:
    """Bounded clusters of one client's queries (see the module docstring)."""

    __slots__ = (
        "_fingerprints",
        "_ids",
        "_label_codes",
        "_last_raw",
        "_next_id",
        "_representatives",
        "_runs",
        "_sequence",
        "_sizes",
        "_touched_at",
        "_used",
    )

    def __init__(self) -> None:
        # Columns grow by half again up to MAX_CLUSTERS: most clients never need more than a few slots. A
        # slot holds one cluster: its id, latest member's point (and invariant view, see
        # `Representatives`), label, size, run (see `ClusterMatch.completes_burst`), and the query
        # sequence at which it was last matched, which orders clusters from least to most recent.
        self._representatives = Representatives()
        self._label_codes = np.zeros(4, dtype=np.uint32)  # see `label_code`
        self._ids = np.zeros(4, dtype=np.int64)
        self._sizes = np.zeros(4, dtype=np.int32)  # at most SIZE_LIMIT
        # Members in the current run (each within BURST_GAP of the one before), up to BURST_SIZE: done.
        self._runs = np.zeros(4, dtype=np.uint8)
        self._touched_at = np.zeros(4, dtype=np.int32)
        self._used = 0
        self._sequence = 0
        self._fingerprints = FingerprintTable()
        self._next_id = 0
        self._last_raw: np.ndarray | None = None

    def __len__(self) -> int:
        return self._used

    def assign(self, observation: Observation) -> ClusterMatch:
        """Match `observation` to a cluster (creating one if needed) and remember it; return the match."""
        self._sequence += 1
        if self._sequence >= SEQUENCE_LIMIT:
            self._rebase(self._sequence - REBASED_SEQUENCE)
        match = self._match(observation)
        self._keep_last_raw(observation.raw)
        return match

    def _keep_last_raw(self, raw: np.ndarray | None) -> None:
        # A copy, written over the previous one in place: `raw` is a row of its micro-batch's matrix, which
        # a view would keep alive for as long as the client's next query does not come.
        previous = self._last_raw
        if raw is None:
            self._last_raw = None
        elif previous is not None and previous.shape == raw.shape and previous.dtype == raw.dtype:
            previous[...] = raw
        else:
            self._last_raw = raw.copy()

    def _match(self, observation: Observation) -> ClusterMatch:
        slot = self._fingerprints.get(observation.fingerprint, self._sequence)
        if slot is not None:
            gap = self._touch(slot)
            self._representatives.touch(slot, observation.invariant, self._sequence)
            if gap > BURST_GAP and self._runs[slot] < BURST_SIZE:
                self._runs[slot] = 1  # the record again, long after: copies of it may follow
            cluster = int(self._ids[slot])
            return ClusterMatch(MatchKind.EXACT, cluster, 0.0, cluster_size=int(self._sizes[slot]), gap=gap)

        nearest, distance = self._nearest(observation)
        if nearest is not None:
            slot = nearest
            cluster = int(self._ids[slot])
            gap = self._touch(slot)
            code = label_code(observation.query.label)
            held = int(self._label_codes[slot])
            flip = code != NO_LABEL and held != NO_LABEL and code != held
            self._label_codes[slot] = code
            self._representatives.put(slot, observation.point, observation.invariant, self._sequence)
            if self._sizes[slot] < SIZE_LIMIT:
                self._sizes[slot] += 1
            run, completes_burst = int(self._runs[slot]), False
            if run < BURST_SIZE:
                run = run + 1 if gap <= BURST_GAP else 1
                self._runs[slot], completes_burst = run, run == BURST_SIZE
            self._fingerprints.put(observation.fingerprint, slot, self._sequence)
            return ClusterMatch(
                MatchKind.VARIANT,
                cluster,
                distance,
                dense=self._dense_change(observation.raw),
                label_flip=flip,
                cluster_size=int(self._sizes[slot]),
                gap=gap,
                completes_burst=completes_burst,
            )

        cluster = self._new_cluster(observation)
        return ClusterMatch(MatchKind.NEW, cluster, distance)

    def _nearest(self, observation: Observation) -> tuple[int | None, float]:
        """The slot of the matching cluster (or None) and the distance to the nearest representative."""
        used = self._used
        if not used:
            return None, float("inf")
        best, squared = self._representatives.nearest(observation.point, used)
        nearest = math.sqrt(squared)
        if nearest <= (VARIANT_RADIUS if observation.raw is not None else TEXT_VARIANT_RADIUS):
            return best, nearest
        if observation.invariant is not None:
            found = self._representatives.nearest_invariant(observation.invariant, used)
            if found is not None and found[1] <= INVARIANT_RADIUS**2:
                return found[0], math.sqrt(found[1])
        return None, nearest

    def _new_cluster(self, observation: Observation) -> int:
        cluster = self._next_id
        self._next_id += 1
        if self._used >= MAX_CLUSTERS:
            slot = int(self._touched_at[: self._used].argmin())  # the least recently matched gives way
            self._fingerprints.forget_slot(slot)
        else:
            slot = self._used
            self._used += 1
            self._grow(slot + 1)
        self._ids[slot] = cluster
        self._label_codes[slot] = label_code(observation.query.label)
        self._sizes[slot] = 1
        self._runs[slot] = 1
        self._touched_at[slot] = self._sequence
        self._representatives.put(slot, observation.point, observation.invariant, self._sequence)
        self._fingerprints.put(observation.fingerprint, slot, self._sequence)
        return cluster

    def _grow(self, needed: int) -> None:
        capacity = self._ids.shape[0]
        if needed > capacity:
            capacity = min(max(_grown_capacity(capacity), needed), MAX_CLUSTERS)
            self._representatives.grow(capacity)
            self._ids = extended(self._ids, capacity)
            self._label_codes = extended(self._label_codes, capacity)
            self._sizes = extended(self._sizes, capacity)
            self._runs = extended(self._runs, capacity)
            self._touched_at = extended(self._touched_at, capacity)

    def _touch(self, slot: int) -> int:
        """Mark the cluster in `slot` matched now; return the queries since it was last matched."""
        gap = self._sequence - int(self._touched_at[slot])
        self._touched_at[slot] = self._sequence
        return gap

    def _rebase(self, shift: int) -> None:
        """Move the query sequence and every sequence held back `shift` queries: the columns are int32."""
        self._sequence -= shift
        self._touched_at = sequences(self._touched_at, shift)
        self._fingerprints.rebase(shift)
        self._representatives.rebase(shift)

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
        """The state (numpy columns beside plain values, see `detector.features.state_bytes`), sharing
        nothing with the clusters: representatives (see `Representatives.state`), label codes, sizes,
        runs, recency, fingerprints, and the previous query's row, which the next query's dense-change test
        compares against: the one raw input the state holds."""
        used = self._used
        fingerprints, clusters = self._fingerprints.columns(self._ids)
        return {
            "ids": self._ids[:used].copy(),
            "representatives": self._representatives.state(used),
            "labels": self._label_codes[:used].copy(),
            "sizes": self._sizes[:used].copy(),
            "runs": self._runs[:used].copy(),
            "touched_at": self._touched_at[:used].copy(),
            "sequence": self._sequence,
            "fingerprints": {"values": fingerprints, "clusters": clusters},
            "next_id": self._next_id,
            "last_row": None if self._last_raw is None else self._last_raw.astype(np.float32),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RecordClusters:
        """Clusters continuing from `state` (see `state`), sharing nothing with it. A state stored with exact
        float32 points for every cluster (before `Representatives`) comes back with them quantised. Raises
        `ValueError` on more clusters than are kept, labels or runs that are not one a cluster, a label code
        or a run out of range, or fingerprints that are not pairs (see `_stored_runs` for a state stored
        before runs were kept)."""
        clusters = cls()
        ids = np.array(state["ids"], dtype=np.int64)
        if ids.ndim != 1 or ids.shape[0] > MAX_CLUSTERS:
            raise ValueError(f"a stored state holds more than {MAX_CLUSTERS} clusters, or not one column")
        used = clusters._used = ids.shape[0]
        capacity = max(4, used)
        clusters._ids = extended(ids, capacity)
        if len(state["labels"]) != used:
            raise ValueError("a stored state has not one label a cluster")
        clusters._label_codes = extended(_stored_label_codes(state["labels"]), capacity)
        clusters._sizes = extended(
            np.minimum(np.array(state["sizes"], dtype=np.int64), SIZE_LIMIT).astype(np.int32), capacity
        )
        # A state stored past the int32 sequences (before they were) comes back rebased.
        sequence = int(state["sequence"])
        shift = sequence - REBASED_SEQUENCE if sequence >= SEQUENCE_LIMIT else 0
        clusters._touched_at = extended(sequences(state["touched_at"], shift), capacity)
        clusters._sequence = sequence - shift
        runs = _stored_runs(
            state.get("runs"), clusters._sizes[:used], clusters._touched_at[:used], sequence - shift
        )
        clusters._runs = extended(runs, capacity)
        if "representatives" in state:
            clusters._representatives = Representatives.from_state(
                state["representatives"], used, capacity, shift
            )
        else:
            points = stored_column(state["points"], "<f4").reshape(used, PROJECTION_DIM)
            stored = state["invariants"]
            invariants = None if stored is None else stored_column(stored, "<f4").reshape(used, -1)
            clusters._representatives = Representatives.of_points(
                points, invariants, clusters._touched_at[:used], capacity
            )
        clusters._fingerprints = FingerprintTable.of(
            *_stored_fingerprints(state["fingerprints"]), clusters._ids[:used]
        )
        clusters._next_id = int(state["next_id"])
        last_row = state["last_row"]
        clusters._last_raw = None if last_row is None else stored_column(last_row, "<f4")
        return clusters
