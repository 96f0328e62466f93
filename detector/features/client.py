"""Every feature of every active (model, client) key, updated one micro-batch at a time.

Features follow a client across its sessions (a slow attacker spreads one attack over many sessions), so
their state is keyed like sessions but outlives them; it is bounded per client and in the number of clients
(least recently active evicted first).

The state outlives the process too: the tracker tells which clients changed since their state was last
stored (`changed`, the evicted ones included), the pipeline stores them at its commit point with everything
else, and a client not in memory is restored from its stored state (`restore`) before its next query, after
a restart, a partition move or an eviction alike.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping
from typing import Any, Protocol

import numpy as np
import orjson

from detector.domain import Query
from detector.features import state_bytes
from detector.features.base import CounterFeature
from detector.features.clusters import ClusterMatch, MatchKind, RecordClusters
from detector.features.confidence import ConfidenceHarvesting
from detector.features.embedding import Observation, QueryEmbedder
from detector.features.exposure import ExposureCounts
from detector.features.probing import NearDuplicateProbing
from detector.features.proximity import TrainingSetProximity
from detector.features.similarity import QuerySimilarity
from detector.features.volume import VolumeTiming

ClientKey = tuple[str, str]  # (model, client id)
FEATURE_TYPES: tuple[type[CounterFeature], ...] = (
    VolumeTiming,
    QuerySimilarity,
    NearDuplicateProbing,
    ConfidenceHarvesting,
    TrainingSetProximity,
)
EVIDENCE_PER_KIND = 5


class TrainingLookup(Protocol):
    """What the feature tracker needs of a training-set index."""

    @property
    def width(self) -> int: ...

    def lookup(self, rows: np.ndarray) -> np.ndarray: ...


class TrainingIndexes:
    """The training-set index of each model: by model name, else a default for every model of its width."""

    def __init__(
        self, by_model: dict[str, TrainingLookup] | None = None, default: TrainingLookup | None = None
    ):
        self.by_model = by_model or {}
        self.default = default

    def for_model(self, model: str, width: int) -> TrainingLookup | None:
        """The index that applies to `model`'s rows of `width` features, if any."""
        index = self.by_model.get(model, self.default)
        return index if index is not None and index.width == width else None


def is_signal(observation: Observation, match: ClusterMatch) -> bool:
    """True for a query that adds to what the probing and training-set rules count: a burst or a round of a
    record's copies completed, a label flip within a burst, a new record from the training set. Rare in
    ordinary traffic, one comes every few queries of an attack, however long the key's history before it."""
    return (
        match.completes_burst
        or (match.label_flip and match.in_burst)
        or match.completes_round
        or (observation.training_hit != 0 and match.kind is MatchKind.NEW)
    )


def evidence_of(evidence: dict[str, list[str]], kinds: Iterable[str]) -> list[str]:
    """The event ids of `evidence` (event ids by evidence kind) of the given kinds, in their order."""
    return [event for kind in kinds for event in evidence.get(kind, [])]


class ClientFeatures:
    """The clusters, features, exposure and a little evidence (event ids) of one (model, client) key.

    `state()` holds everything the client's future depends on, `from_state()` continues from it: a client
    moved to another process (or restored after a restart) goes on exactly as it would have.
    """

    __slots__ = (
        "client_ip",
        "clusters",
        "evaluated_at",
        "evaluated_time",
        "evidence",
        "exposure",
        "features",
        "first_seen",
        "last_seen",
        "queries",
        "signalled",
    )

    def __init__(
        self,
        clusters: RecordClusters | None = None,
        features: list[CounterFeature] | None = None,
        evidence: dict[str, list[str]] | None = None,
        exposure: ExposureCounts | None = None,
    ) -> None:
        self.clusters = clusters or RecordClusters()
        self.features = features or [feature_type() for feature_type in FEATURE_TYPES]
        self.exposure = exposure or ExposureCounts()
        self.evidence: dict[str, list[str]] = evidence or {}
        self.first_seen = 0.0  # event time of the earliest and latest query; meaningless before the first
        self.last_seen = 0.0
        self.queries = 0
        # When the rules last judged this client (kept by the detection step): its `queries` then, and the
        # event time of the query they were judged on.
        self.evaluated_at = 0
        self.evaluated_time = 0.0
        # A query since the last judgement signalled an attack (`is_signal`): the detection step judges the
        # client as soon as enough queries came since the last judgement, whatever queries follow.
        self.signalled = False
        self.client_ip: str | None = None

    def update(self, observation: Observation) -> ClusterMatch:
        """Match the observation to the client's clusters, then update every feature and the exposure with it
        and its match; return the match."""
        match = self.clusters.assign(observation)
        for feature in self.features:
            feature.update(observation, match)
        self.exposure.update(observation, match)
        query = observation.query
        if self.queries == 0:
            self.first_seen = self.last_seen = query.timestamp
        else:
            self.first_seen = min(self.first_seen, query.timestamp)
            self.last_seen = max(self.last_seen, query.timestamp)
        self.queries += 1
        self.client_ip = query.client_ip or self.client_ip
        if match.in_burst:
            self._keep("flip" if match.label_flip else "variant", query.event_id)
        elif match.completes_round:
            self._keep("round", query.event_id)
        if observation.training_hit:
            self._keep("training", query.event_id)
        if match.kind is MatchKind.NEW and query.requested.is_confidence:
            self._keep("confidence", query.event_id)
        return match

    def snapshot(self) -> dict[str, float]:
        """Every feature's values, by name."""
        values: dict[str, float] = {}
        for feature in self.features:
            feature.snapshot_into(values)
        return values

    def evidence_for(self, kinds: Iterable[str]) -> list[str]:
        """Event ids kept as evidence of the given kinds (most recent last)."""
        return evidence_of(self.evidence, kinds)

    def _keep(self, kind: str, event_id: str) -> None:
        kept = self.evidence.setdefault(kind, [])
        if event_id not in kept:
            kept.append(event_id)
            del kept[:-EVIDENCE_PER_KIND]

    def state(self) -> dict[str, Any]:
        """The client's state: finite numbers, strings, lists, dicts and (the clusters' columns) numpy arrays,
        as `detector.features.state_bytes` stores them, sharing nothing with the client: clusters (see
        `RecordClusters.state`), counters, evidence ids."""
        return {
            "clusters": self.clusters.state(),
            "features": {feature.name: feature.state() for feature in self.features},
            "exposure": self.exposure.state(),
            "evidence": {kind: list(events) for kind, events in self.evidence.items()},
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "queries": self.queries,
            "evaluated_at": self.evaluated_at,
            "evaluated_time": self.evaluated_time,
            "signalled": self.signalled,
            "client_ip": self.client_ip,
        }

    def to_bytes(self) -> bytes:
        """`state()` as bytes (`detector.features.state_bytes`): what is stored of the client. Not
        compressed: zlib's fastest level would take longer than all the rest and save under a third (the
        columns are projections and fingerprints)."""
        return state_bytes.dumps(self.state())

    @classmethod
    def from_bytes(cls, stored: bytes) -> ClientFeatures:
        """A client continuing from what `to_bytes` wrote (or, stored before it, the state as JSON); raises
        `ValueError` on anything else."""
        try:
            state = state_bytes.loads(stored) if state_bytes.is_state_bytes(stored) else orjson.loads(stored)
            return cls.from_state(state)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, OverflowError) as exc:
            raise ValueError(f"not a stored client state: {exc!r}") from None

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ClientFeatures:
        """A client continuing from `state` (see `state`), sharing nothing with it. A feature the state does
        not hold (stored by a version without it) starts anew; one this version does not have is left out."""
        stored = state["features"]
        features = [
            feature_type.from_state(stored[feature_type.name])
            if feature_type.name in stored
            else feature_type()
            for feature_type in FEATURE_TYPES
        ]
        evidence = {str(kind): [str(event) for event in events] for kind, events in state["evidence"].items()}
        # States stored before exposure was accounted for start counting it from their restore.
        exposure = ExposureCounts.from_state(state["exposure"]) if "exposure" in state else None
        restored = cls(RecordClusters.from_state(state["clusters"]), features, evidence, exposure)
        restored.first_seen = float(state["first_seen"])
        restored.last_seen = float(state["last_seen"])
        restored.queries = int(state["queries"])
        restored.evaluated_at = int(state["evaluated_at"])
        restored.evaluated_time = float(state["evaluated_time"])
        restored.signalled = bool(state.get("signalled", False))  # stored before signals were remembered
        client_ip = state["client_ip"]
        if client_ip is not None and not isinstance(client_ip, str):
            raise TypeError("a stored client address is not text")
        restored.client_ip = client_ip
        return restored


class FeatureTracker:
    """Features of the active clients, at most `max_clients` of them (least recently active evicted).

    `admitted` and `evicted` count, since the tracker was made, the keys it started tracking (a first query,
    or the first since the key was evicted or released) and the keys it evicted: a stream of fresh client ids
    shows as both growing with the queries. `released` counts the idle keys let go once stored
    (`release_idle`). An evicted client whose change is not stored yet is kept aside until it
    is (`changed`, `stored`), and comes back from there, or from its stored state (`restore`). `exposure`
    counts what every client was given since the tracker was made (for metrics without client ids).
    """

    def __init__(
        self,
        embedder: QueryEmbedder | None = None,
        training_indexes: TrainingIndexes | None = None,
        max_clients: int = 20_000,
    ) -> None:
        self.embedder = embedder or QueryEmbedder()
        self.training_indexes = training_indexes or TrainingIndexes()
        self.max_clients = max_clients
        self.admitted = 0
        self.evicted = 0
        self.released = 0
        self.exposure = ExposureCounts()  # of every client since the tracker was made
        self._clients: OrderedDict[ClientKey, ClientFeatures] = OrderedDict()
        # Changed since their state was last stored: keys in memory, and evicted clients kept aside.
        self._changed: set[ClientKey] = set()
        self._evicted: dict[ClientKey, ClientFeatures] = {}

    def __len__(self) -> int:
        return len(self._clients)

    def get(self, key: ClientKey) -> ClientFeatures | None:
        """The features of `key`, if it is active."""
        return self._clients.get(key)

    def missing(self, keys: Iterable[ClientKey]) -> set[ClientKey]:
        """Those of `keys` whose features are not in memory, nor kept aside since their eviction: the keys
        whose stored state, if any, is to be restored before their queries."""
        return {key for key in keys if key not in self._clients and key not in self._evicted}

    def restore(self, stored: Mapping[ClientKey, bytes]) -> list[ClientKey]:
        """Take back clients from their stored states (`ClientFeatures.to_bytes`), those not in memory only;
        return the keys whose state could not be read (they start afresh)."""
        unreadable = []
        for key, state in stored.items():
            if key not in self._clients and key not in self._evicted:
                try:
                    self._admit(key, ClientFeatures.from_bytes(state))
                except ValueError:
                    unreadable.append(key)
        return unreadable

    def changed(self) -> dict[ClientKey, ClientFeatures]:
        """Every client changed since `stored` was last called, in memory or evicted: what to store."""
        changed = {key: self._clients[key] for key in self._changed if key in self._clients}
        return changed | self._evicted

    def stored(self, keys: Collection[ClientKey]) -> None:
        """Note that the states of `keys` (from `changed`) are stored: evicted ones are let go."""
        self._changed.difference_update(keys)
        for key in keys:
            self._evicted.pop(key, None)

    def release_idle(self, horizon: float) -> int:
        """Let go of the clients whose latest query is older than `horizon` (event time) and whose state is
        stored (not changed since): an idle client costs no memory, and comes back from its stored state
        with its next query. Returns how many were let go.

        Looks from the least recently updated client and stops at the first that is not idle: the order
        of updates follows event time closely enough, and a client missed is let go at a later call."""
        idle = []
        for key, client in self._clients.items():
            if client.last_seen >= horizon:
                break
            if key not in self._changed:
                idle.append(key)
        for key in idle:
            del self._clients[key]
        self.released += len(idle)
        return len(idle)

    def clear(self) -> None:
        """Forget every client, changed or not (their partitions moved away, or their changes will be
        replayed from the source): their stored states are what comes back."""
        self._clients.clear()
        self._changed.clear()
        self._evicted.clear()

    def items(self) -> list[tuple[ClientKey, ClientFeatures]]:
        """Every active client's key and features, least recently active first (a copy: safe to update)."""
        return list(self._clients.items())

    def update(self, queries: list[Query]) -> set[ClientKey]:
        """Update the features of every query's client; return the keys touched."""
        return {self.update_one(observation)[0] for observation in self.observe(queries)}

    def observe(self, queries: list[Query]) -> list[Observation]:
        """The observation of each query, in order, with its training-set hit marked: the part of an update
        done for a whole micro-batch at once (one matrix product, one index look-up per input width)."""
        observations = self.embedder.observe(queries)
        self._mark_training_hits(observations)
        return observations

    def update_one(self, observation: Observation) -> tuple[ClientKey, ClientFeatures, ClusterMatch]:
        """Fold one observation (from `observe`) into its client's features; return the client's key,
        features and how the observation matched its clusters, tracking the client if it is new (the least
        recently active evicted beyond the limit)."""
        key = (observation.query.model, observation.query.client_id)
        client = self._clients.get(key)
        if client is None:
            aside = self._evicted.pop(key, None)
            client = self._admit(key, aside if aside is not None else ClientFeatures())
        else:
            self._clients.move_to_end(key)
        match = client.update(observation)
        self.exposure.update(observation, match)
        self._changed.add(key)
        return key, client, match

    def _admit(self, key: ClientKey, client: ClientFeatures) -> ClientFeatures:
        self._clients[key] = client
        self.admitted += 1
        if len(self._clients) > self.max_clients:
            old, evicted = self._clients.popitem(last=False)
            self.evicted += 1
            if old in self._changed:
                self._evicted[old] = evicted
        return client

    def _mark_training_hits(self, observations: list[Observation]) -> None:
        groups: dict[tuple[str, int], list[Observation]] = {}
        for observation in observations:
            if observation.raw is not None:
                groups.setdefault((observation.query.model, observation.raw.shape[0]), []).append(observation)
        for (model, width), group in groups.items():
            index = self.training_indexes.for_model(model, width)
            if index is None:
                continue
            hits = index.lookup(np.stack([o.raw for o in group]))  # type: ignore[misc]
            for observation, hit in zip(group, hits, strict=True):
                observation.training_hit = int(hit)
