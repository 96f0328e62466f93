"""Cross-client coordination: one attack split over several API keys (sybils), each below every threshold.

Sybil keys deal the attack's candidate records between them, so each key alone shows too little. What they
share is the target — exact records of the model's training set — and, usually, the network they come from.
Over a sliding window of event time, the keys of one model and one network (IPv4 /24, IPv6 /48) that sent
exact training records are pooled; when together they reach the training-set rule's threshold, one alert
names all of them, raised on the query that took the pool over it. Keys already pooled into an alert are not
pooled again, so a campaign that grows raises one alert per wave, never one per key. Keys without a known
address are not pooled.

Memory is bounded whatever the keys do: a key leaves the pool once its last hit is older than the window,
the keys already reported are forgotten after the window too, and at most `max_participants` keys are
pooled at once (least recently seen let go first), like the feature tracker's `max_clients`.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field

from detector.domain import AlertKind, Detection, Reason, Severity
from detector.features.client import ClientFeatures, ClientKey
from detector.scoring.rules import ATLAS_EXFILTRATION_VIA_INFERENCE_API
from detector.scoring.scorer import Snapshot

WINDOW_SECONDS = 6 * 3600.0
MIN_HIT_RATE = 0.02  # of exact hits: a key sending training records now and then among its own data
MIN_CLIENTS = 2
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


def network_of(address: str | None) -> str | None:
    """The /24 (IPv4) or /48 (IPv6) network of `address`, or None when unknown or unparsable."""
    if not address:
        return None
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
        self._pools: dict[tuple[str, str], dict[str, _Participant]] = {}
        # (model, client id) -> event time of the key's latest query seen since it was reported.
        self._reported: dict[tuple[str, str], float] = {}

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
        reported = self._reported.get(key)
        if reported is not None and reported >= horizon:
            # Already named in an alert: not pooled again while it goes on (one alert per wave).
            self._reported[key] = max(reported, client.last_seen)
            return []
        self._reported.pop(key, None)
        network = network_of(client.client_ip)
        if network is None:
            return []
        entry = (model, network, client_id)
        participant = _Participant(
            hits,
            rate,
            client.queries,
            client.first_seen,
            client.last_seen,
            client.evidence_for(("training",)),
        )
        self._participants[entry] = participant
        self._participants.move_to_end(entry)
        pool = self._pools.setdefault((model, network), {})
        pool[client_id] = participant
        while len(self._participants) > self.max_participants:
            (old_model, old_network, old_client), _ = self._participants.popitem(last=False)
            self._leave(old_model, old_network, old_client)
        for stale in [other for other, p in pool.items() if p.last_seen < horizon]:
            del self._participants[(model, network, stale)]
            self._leave(model, network, stale)
        return self._judge(model, network, at)

    def forget(self, watermark: float) -> None:
        """Let go of keys whose last hit, or last query since they were reported, is a window older than
        `watermark` (event time): memory, not detection, since `observe` ignores them already."""
        horizon = watermark - WINDOW_SECONDS
        for model, network, client_id in [
            entry for entry, p in self._participants.items() if p.last_seen < horizon
        ]:
            del self._participants[(model, network, client_id)]
            self._leave(model, network, client_id)
        for key in [key for key, last_seen in self._reported.items() if last_seen < horizon]:
            del self._reported[key]

    def _leave(self, model: str, network: str, client_id: str) -> None:
        pool = self._pools[(model, network)]
        del pool[client_id]
        if not pool:
            del self._pools[(model, network)]

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
        )
        for client_id, participant in pool.items():
            self._reported[(model, client_id)] = participant.last_seen
            del self._participants[(model, network, client_id)]
            self._leave(model, network, client_id)
        return [detection]
