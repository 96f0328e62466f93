"""Cross-client coordination: one attack split over several API keys (sybils), each below every threshold.

Sybil keys deal the attack's candidate records between them, so each key alone shows too little. What they
share is the target — exact records of the model's training set — and, usually, the network they come from.
Over a sliding window of event time, the keys of one model and one network (IPv4 /24, IPv6 /48) that sent
exact training records are pooled; when together they reach the training-set rule's threshold, a detection
names all of them, raised on the query that took the pool over it. Keys already pooled into a detection are
not pooled again, so a campaign that grows is detected once per wave, never once per key; every detection
of a pool names the pool's alert (`Detection.group`), so that the waves of a campaign while its alert is
open update that one alert, which names all their keys. Keys without a known address are not pooled.

Memory is bounded whatever the keys do: a key leaves the pool once its last hit is older than the window,
the keys already reported are forgotten after the window too, and at most `max_participants` keys are
pooled at once (least recently seen let go first), like the feature tracker's `max_clients`.

Pools are shared between the members of a consumer group, each of which sees the keys of its own partitions
only: at each commit, every pool changed since the last one is exchanged through the database (`exchange`,
in the commit's transaction, the pools locked). The stored pool's keys join this member's, its reported keys
leave it, the merged pool is judged (a detection when the keys of several members reach the threshold only
together) and written back. When members each cross the threshold with their own keys of one campaign, each
raises a detection of the same pool: they update one alert, whichever commits first opening it. The stored
pools also bring back what a restart, a rebalance or the `max_participants` bound let go.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from detector.domain import AlertKind, Detection, Exposure, Reason, Severity
from detector.features.client import ClientFeatures, ClientKey
from detector.features.exposure import Counts, exposure_of
from detector.scoring.rules import ATLAS_EXFILTRATION_VIA_INFERENCE_API
from detector.scoring.scorer import Snapshot

WINDOW_SECONDS = 6 * 3600.0
MIN_HIT_RATE = 0.02  # of exact hits: a key sending training records now and then among its own data
MIN_CLIENTS = 2
# Keys a stored pool holds at most (the latest): a bound on the row every commit touching it rewrites.
MAX_STORED_KEYS = 20_000
TRIAGE = (
    "Several keys of one model together queried many records of its training set, each key too few to be "
    "alerted alone: a membership-inference attack split over sybil keys. Check whether the keys share an "
    "owner, an IP range or a creation date; revoke them together."
)


@dataclass
class _Participant:
    distinct_hits: int
    hit_rate: float
    queries: int
    first_seen: float
    last_seen: float
    evidence: list[str] = field(default_factory=list)
    # What the key had been given by its latest query pooled (`ExposureCounts.counts`); None when pooled
    # by a version that did not keep it.
    exposure: Counts | None = None


PoolKey = tuple[str, str]  # (model, network)


@dataclass(frozen=True)
class PoolState:
    """One pool as stored for every member: its participants by client id, and the keys already named in an
    alert with the event time of their latest query."""

    participants: dict[str, _Participant]
    reported: dict[str, float]

    def to_bytes(self) -> bytes:
        """The state as compact JSON (`from_bytes` reads it back). Exposures are a map of their own beside
        the participants, whose six fields every version reads: a pool written here and read by a member
        of the version before (a rolling upgrade) keeps its participants and reports."""
        participants = self.participants.items()
        return orjson.dumps(
            {
                "participants": {
                    client_id: [p.distinct_hits, p.hit_rate, p.queries, p.first_seen, p.last_seen, p.evidence]
                    for client_id, p in participants
                },
                "exposures": {
                    client_id: p.exposure for client_id, p in participants if p.exposure is not None
                },
                "reported": self.reported,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> PoolState:
        """The state `to_bytes` wrote (a participant without an exposure when written before exposures
        were); raises `ValueError` on anything else."""
        try:
            document: Any = orjson.loads(data)
            exposures = document.get("exposures", {})
            participants = {
                str(client_id): _Participant(
                    int(hits),
                    float(rate),
                    int(queries),
                    float(first),
                    float(last),
                    [str(event) for event in evidence],
                    _counts(exposures[client_id]) if client_id in exposures else None,
                )
                for client_id, (hits, rate, queries, first, last, evidence) in document[
                    "participants"
                ].items()
            }
            reported = {str(client_id): float(at) for client_id, at in document["reported"].items()}
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"not a stored pool: {error}") from error
        return cls(participants, reported)


class SharedPools(Protocol):
    """Where the members of a consumer group share their pools (the commit's database transaction)."""

    def read_pools(self, keys: Sequence[PoolKey]) -> dict[PoolKey, bytes]:
        """The stored state of each of `keys` that has one, each locked until the transaction ends."""
        ...

    def write_pools(self, pools: Mapping[PoolKey, bytes]) -> None:
        """Store the state of each pool, replacing what was stored."""
        ...


@dataclass
class _Report:
    network: str
    last_seen: float  # of the key's latest query seen since it was reported


def network_of(address: str | None) -> str | None:
    """The /24 (IPv4) or /48 (IPv6) network of `address`, or None when unknown or unparsable."""
    if not address:
        return None
    return _network_of(address)


@functools.lru_cache(maxsize=65_536)
def _network_of(address: str) -> str | None:
    # Cached: parsing costs tens of microseconds, and a client's address repeats at each of its judgements.
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return None
    prefix = 24 if parsed.version == 4 else 48
    return str(ipaddress.ip_network(f"{parsed}/{prefix}", strict=False))


class CoordinationTracker:
    """Pools training-set hits across the keys of each model (see the module docstring); the keys of
    `allowed` (the operators' known business) are never pooled."""

    def __init__(
        self, threshold: float, max_participants: int = 20_000, allowed: frozenset[str] = frozenset()
    ) -> None:
        self.threshold = threshold
        self.max_participants = max_participants
        self.allowed = allowed
        # (model, network, client id) -> what the key pooled, least recently observed first; and the same
        # participants by pool.
        self._participants: OrderedDict[tuple[str, str, str], _Participant] = OrderedDict()
        self._pools: dict[PoolKey, dict[str, _Participant]] = {}
        # (model, client id) -> the pool a key was reported from, and its latest query since; and the keys
        # reported, by pool.
        self._reported: dict[tuple[str, str], _Report] = {}
        self._reports: dict[PoolKey, set[str]] = {}
        # Since the last `persisted`: the pools changed.
        self._touched: set[PoolKey] = set()
        # Found by an exchange whose pools were not taken yet: returned by the next one.
        self._found: list[Detection] = []
        # (model, client id) -> the network of the one pool a key is in (its address may move).
        self._joined: dict[tuple[str, str], str] = {}
        self._horizon = float("-inf")  # event time before which pooled keys and reports are let go

    def __len__(self) -> int:
        """How many keys are pooled or remembered as reported: what the tracker holds in memory."""
        return len(self._participants) + len(self._reported)

    def observe(self, key: ClientKey, client: ClientFeatures, values: Snapshot, at: float) -> list[Detection]:
        """Take note of a client's training-set hits, from its snapshot `values` taken on its query at event
        time `at`; the coordinated-clients detection of its pool when the pool reaches the threshold with
        it (then the pool's keys are reported and leave it), else none.

        Judged as each key is observed, so the keys named and the detection time depend on the order of
        the queries alone, not on how they were batched.
        """
        hits = int(values.get("training.distinct_hits", 0))
        rate = values.get("training.exact_hit_rate", 0.0)
        model, client_id = key
        if hits < 1 or rate < MIN_HIT_RATE or hits >= self.threshold or client_id in self.allowed:
            return []  # nothing to pool, alerted on its own by the training-set rule, or known business
        horizon = at - WINDOW_SECONDS
        self._horizon = max(self._horizon, horizon)
        reported = self._reported.get(key)
        if reported is not None and reported.last_seen >= horizon:
            # Already named in an alert: not pooled again while it goes on (one alert per wave).
            if client.last_seen > reported.last_seen:
                reported.last_seen = client.last_seen
                self._touched.add((model, reported.network))
            return []
        if reported is not None:
            self._unreport(model, client_id)
        network = network_of(client.client_ip)
        if network is None:
            return []
        participant = _Participant(
            hits,
            rate,
            client.queries,
            client.first_seen,
            client.last_seen,
            client.evidence_for(("training",)),
            client.exposure.counts(),
        )
        self._pool(model, network, client_id, participant)
        pool = self._pools[(model, network)]
        for stale in [other for other, p in pool.items() if p.last_seen < horizon]:
            self._leave(model, network, stale)
        self._bound()
        return self._judge(model, network, at)

    def unknown(self, keys: set[PoolKey]) -> list[PoolKey]:
        """Those of the pools `keys` this tracker holds nothing of (to `load` from the stored pools)."""
        return sorted(key for key in keys if key not in self._pools and key not in self._reports)

    def load(self, stored: Mapping[PoolKey, bytes]) -> None:
        """Take the stored pools in before their keys' next queries are observed (after a restart, a
        rebalance, or for a key new to this member): a pool is then judged on the query that takes it over
        the threshold, as in one process that had seen every key."""
        for key, data in stored.items():
            self._merge(key, _read_pool(data), touch=False)
        self._bound()

    def exchange(self, shared: SharedPools) -> list[Detection]:
        """Share every pool changed since the last `persisted` through `shared` (see the module docstring).

        Returns the detections of pools that the stored keys took over the threshold (detected at the latest
        query of their keys), each once, when `shared` has taken the pools (what a failed exchange found is
        returned by the next one). Call again after a failed transaction: merging is idempotent.
        """
        keys = sorted(self._touched)
        if keys:
            stored = {key: _read_pool(data) for key, data in shared.read_pools(keys).items()}
            for key in keys:
                self._merge(key, stored.get(key, PoolState({}, {})))
                pool = self._pools.get(key, {})
                for stale in [client_id for client_id, p in pool.items() if p.last_seen < self._horizon]:
                    self._leave(*key, stale)
                if key in self._pools:
                    self._found += self._judge(*key, max(p.last_seen for p in pool.values()))
            # Written before this member's own bound lets keys go: they may be another member's.
            shared.write_pools({key: self._written(key, stored.get(key)).to_bytes() for key in keys})
            self._bound()
        found, self._found = self._found, []
        return found

    def persisted(self) -> None:
        """What the last `exchange` wrote is durable: start collecting the next changes."""
        self._touched.clear()

    def clear(self) -> None:
        """Forget every pool (the stored ones bring their keys back as their pools change again)."""
        self._participants.clear()
        self._pools.clear()
        self._joined.clear()
        self._reported.clear()
        self._reports.clear()
        self._touched.clear()
        self._found.clear()

    def forget(self, watermark: float) -> None:
        """Let go of keys whose last hit, or last query since they were reported, is a window older than
        `watermark` (event time): memory, not detection, since `observe` ignores them already."""
        horizon = watermark - WINDOW_SECONDS
        self._horizon = max(self._horizon, horizon)
        for model, network, client_id in [
            entry for entry, p in self._participants.items() if p.last_seen < horizon
        ]:
            self._leave(model, network, client_id)
        for model, client_id in [key for key, report in self._reported.items() if report.last_seen < horizon]:
            self._unreport(model, client_id)

    def _pool(
        self, model: str, network: str, client_id: str, participant: _Participant, touch: bool = True
    ) -> None:
        joined = self._joined.get((model, client_id))
        if joined is not None and joined != network:
            self._leave(model, joined, client_id)  # one pool a key: its address moved to another network
        entry = (model, network, client_id)
        self._participants[entry] = participant
        self._participants.move_to_end(entry)
        self._pools.setdefault((model, network), {})[client_id] = participant
        self._joined[(model, client_id)] = network
        if touch:
            self._touched.add((model, network))

    def _bound(self) -> None:
        while len(self._participants) > self.max_participants:
            old_model, old_network, old_client = next(iter(self._participants))
            self._leave(old_model, old_network, old_client)

    def _leave(self, model: str, network: str, client_id: str) -> None:
        del self._participants[(model, network, client_id)]
        del self._joined[(model, client_id)]
        pool = self._pools[(model, network)]
        del pool[client_id]
        if not pool:
            del self._pools[(model, network)]

    def _report(self, model: str, network: str, client_id: str, last_seen: float, touch: bool = True) -> None:
        if (model, client_id) in self._reported:
            self._unreport(model, client_id)  # reported again from another network: one report a key
        self._reported[(model, client_id)] = _Report(network, last_seen)
        self._reports.setdefault((model, network), set()).add(client_id)
        if touch:
            self._touched.add((model, network))

    def _unreport(self, model: str, client_id: str) -> None:
        report = self._reported.pop((model, client_id))
        keys = self._reports[(model, report.network)]
        keys.discard(client_id)
        if not keys:
            del self._reports[(model, report.network)]

    def _merge(self, key: PoolKey, state: PoolState, touch: bool = True) -> None:
        """Take the stored pool's reports and keys (the latest of each key's two versions) into this one;
        `touch`: the merged pool is to be written back at the next `exchange`."""
        model, network = key
        for client_id, last_seen in state.reported.items():
            if last_seen < self._horizon or client_id in self.allowed:
                continue
            report = self._reported.get((model, client_id))
            if report is None:
                if (model, network, client_id) in self._participants:
                    self._leave(model, network, client_id)
                self._report(model, network, client_id, last_seen, touch)
            elif last_seen > report.last_seen:
                report.last_seen = last_seen
        pool = self._pools.get(key, {})
        for client_id, participant in state.participants.items():
            if (
                participant.last_seen < self._horizon
                or (model, client_id) in self._reported
                or client_id in self.allowed
            ):
                continue
            mine = pool.get(client_id)
            if mine is None or participant.last_seen > mine.last_seen:
                self._pool(model, network, client_id, participant, touch)
        if touch:
            self._touched.add(key)

    def _written(self, key: PoolKey, stored: PoolState | None) -> PoolState:
        """What pool `key` is stored as: the stored pool and this tracker's merged, the latest version of
        each key, reported keys as reports, no key older than the window, at most `MAX_STORED_KEYS` (the
        latest). Stored keys this tracker let go for its own bound stay: they may be another member's."""
        model, _ = key
        reported = {
            client_id: self._reported[(model, client_id)].last_seen
            for client_id in self._reports.get(key, ())
        }
        participants = {
            client_id: p
            for client_id, p in (stored.participants.items() if stored else ())
            if p.last_seen >= self._horizon and client_id not in reported and client_id not in self.allowed
        }
        for client_id, p in self._pools.get(key, {}).items():
            if client_id not in participants or p.last_seen >= participants[client_id].last_seen:
                participants[client_id] = p
        if len(participants) > MAX_STORED_KEYS:
            latest = sorted(participants.items(), key=lambda item: item[1].last_seen)[-MAX_STORED_KEYS:]
            participants = dict(latest)
        return PoolState(participants, reported)

    def _judge(self, model: str, network: str, at: float) -> list[Detection]:
        pool = dict(self._pools.get((model, network), {}))
        hits = sum(p.distinct_hits for p in pool.values())
        if len(pool) < MIN_CLIENTS or hits < self.threshold:
            return []
        queries = sum(p.queries for p in pool.values())
        detection = Detection(
            model=model,
            client_ids=tuple(sorted(pool)),
            kind=AlertKind.COORDINATED_CLIENTS,
            severity=Severity.CRITICAL,
            rule_id="MIA-COORD",
            score=float(hits),
            threshold=float(self.threshold),
            reasons=[
                Reason(feature=f"coordination.clients_from_{network}", value=float(len(pool))),
                Reason(feature="coordination.distinct_training_hits", value=float(hits)),
                Reason(
                    feature="coordination.max_client_hits",
                    value=float(max(p.distinct_hits for p in pool.values())),
                ),
            ],
            evidence=[event for p in pool.values() for event in p.evidence],
            first_seen=min(p.first_seen for p in pool.values()),
            last_seen=max(p.last_seen for p in pool.values()),
            queries=queries,
            detected_at=at,
            detected_after_queries=queries,
            atlas_technique=ATLAS_EXFILTRATION_VIA_INFERENCE_API,
            triage=TRIAGE,
            group=network,
            exposure=_pooled_exposure(pool.values()),
        )
        for client_id, participant in pool.items():
            self._leave(model, network, client_id)
            self._report(model, network, client_id, participant.last_seen)
        return [detection]


def _counts(stored: Any) -> Counts:
    probability_records, training_records, label_only_answers, probes = (int(count) for count in stored)
    return probability_records, training_records, label_only_answers, probes


def _pooled_exposure(participants: Iterable[_Participant]) -> Exposure | None:
    """What the keys of a pool had been given together, or None when one of them was pooled without its
    exposure (an understatement would mislead more than a blank)."""
    total = Exposure()
    for participant in participants:
        if participant.exposure is None:
            return None
        total += exposure_of(participant.exposure)
    return total


def _read_pool(data: bytes | None) -> PoolState:
    """A stored pool's state; an empty one when there is none or it is unreadable (it is written anew)."""
    if data is None:
        return PoolState({}, {})
    try:
        return PoolState.from_bytes(data)
    except ValueError:
        return PoolState({}, {})
