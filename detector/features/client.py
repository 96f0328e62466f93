"""Every feature of every active (model, client) key, updated one micro-batch at a time.

Features follow a client across its sessions (a slow attacker spreads one attack over many sessions), so
their state is keyed like sessions but outlives them; it is bounded per client and in the number of clients
(least recently active evicted first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np

from detector.domain import Query
from detector.features.base import CounterFeature
from detector.features.clusters import MatchKind, RecordClusters
from detector.features.confidence import ConfidenceHarvesting
from detector.features.embedding import Observation, QueryEmbedder
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


def evidence_of(evidence: dict[str, list[str]], kinds: Iterable[str]) -> list[str]:
    """The event ids of `evidence` (event ids by evidence kind) of the given kinds, in their order."""
    return [event for kind in kinds for event in evidence.get(kind, [])]


class ClientFeatures:
    """The clusters, features and a little evidence (event ids) of one (model, client) key.

    `state()` holds everything the client's future depends on, `from_state()` continues from it: a client
    moved to another process (or restored after a restart) goes on exactly as it would have.
    """

    def __init__(
        self,
        clusters: RecordClusters | None = None,
        features: list[CounterFeature] | None = None,
        evidence: dict[str, list[str]] | None = None,
    ) -> None:
        self.clusters = clusters or RecordClusters()
        self.features = features or [feature_type() for feature_type in FEATURE_TYPES]
        self.evidence: dict[str, list[str]] = evidence or {}
        self.first_seen = 0.0  # event time of the earliest and latest query; meaningless before the first
        self.last_seen = 0.0
        self.queries = 0
        # When the rules last judged this client (kept by the detection step): its `queries` then, and the
        # event time of the query they were judged on.
        self.evaluated_at = 0
        self.evaluated_time = 0.0
        self.client_ip: str | None = None

    def update(self, observation: Observation) -> None:
        """Match the observation to the client's clusters, then update every feature with it and its match."""
        match = self.clusters.assign(observation)
        for feature in self.features:
            feature.update(observation, match)
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
        if observation.training_hit:
            self._keep("training", query.event_id)
        if match.kind is MatchKind.NEW and query.requested.is_confidence:
            self._keep("confidence", query.event_id)

    def snapshot(self) -> dict[str, float]:
        """Every feature's values, by name."""
        values: dict[str, float] = {}
        for feature in self.features:
            values.update(feature.snapshot())
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
        """The client's state as JSON-serialisable values (finite numbers, strings, lists, dicts), sharing
        nothing with the client: clusters (see `RecordClusters.state`), counters, evidence ids."""
        return {
            "clusters": self.clusters.state(),
            "features": {feature.name: feature.state() for feature in self.features},
            "evidence": {kind: list(events) for kind, events in self.evidence.items()},
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "queries": self.queries,
            "evaluated_at": self.evaluated_at,
            "evaluated_time": self.evaluated_time,
            "client_ip": self.client_ip,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ClientFeatures:
        """A client continuing from `state` (see `state`), sharing nothing with it."""
        features = [
            feature_type.from_state(state["features"][feature_type.name]) for feature_type in FEATURE_TYPES
        ]
        evidence = {str(kind): [str(event) for event in events] for kind, events in state["evidence"].items()}
        restored = cls(RecordClusters.from_state(state["clusters"]), features, evidence)
        restored.first_seen = float(state["first_seen"])
        restored.last_seen = float(state["last_seen"])
        restored.queries = int(state["queries"])
        restored.evaluated_at = int(state["evaluated_at"])
        restored.evaluated_time = float(state["evaluated_time"])
        restored.client_ip = state["client_ip"]
        return restored


class FeatureTracker:
    """Features of the active clients, at most `max_clients` of them (least recently active evicted).

    `admitted` and `evicted` count, since the tracker was made, the keys it started tracking (a first query,
    or the first since the key was evicted) and the keys it evicted: a stream of fresh client ids shows as
    both growing with the queries, and every eviction forgets a client's features.
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
        self._clients: OrderedDict[ClientKey, ClientFeatures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def get(self, key: ClientKey) -> ClientFeatures | None:
        """The features of `key`, if it is active."""
        return self._clients.get(key)

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

    def update_one(self, observation: Observation) -> tuple[ClientKey, ClientFeatures]:
        """Fold one observation (from `observe`) into its client's features; return the client's key and
        features, tracking the client if it is new (the least recently active evicted beyond the limit)."""
        key = (observation.query.model, observation.query.client_id)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = ClientFeatures()
            self.admitted += 1
            if len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
                self.evicted += 1
        else:
            self._clients.move_to_end(key)
        client.update(observation)
        return key, client

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
