"""Cross-client coordination: one attack split over several API keys (sybils), each below every threshold.

Sybil keys deal the attack's candidate records between them, so each key alone shows too little. What they
share is the target — exact records of the model's training set — and, usually, the network they come from.
Over a sliding window of event time, the keys of one model and one network (IPv4 /24, IPv6 /48) that sent
exact training records are pooled; when together they reach the training-set rule's threshold, one alert
names all of them. Keys already pooled into an alert are not pooled again, so a campaign that grows raises
one alert per wave, never one per key. Keys without a known address are not pooled.

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
    """Pools training-set hits across the keys of each model (see the module docstring)."""

    def __init__(self, threshold: float, max_participants: int = 20_000) -> None:
        self.threshold = threshold
        self.max_participants = max_participants
        # (model, network, client id) -> what the key pooled, least recently observed first.
        self._participants: OrderedDict[tuple[str, str, str], _Participant] = OrderedDict()
        # (model, client id) -> event time of the key's latest query seen since it was reported.
        self._reported: dict[tuple[str, str], float] = {}

    def __len__(self) -> int:
        """How many keys are pooled or remembered as reported: what the tracker holds in memory."""
        return len(self._participants) + len(self._reported)

    def observe(self, key: ClientKey, client: ClientFeatures, values: dict[str, float]) -> None:
        """Take note of a client's training-set hits, from its snapshot `values` (if they count)."""
        hits = int(values.get("training.distinct_hits", 0))
        rate = values.get("training.exact_hit_rate", 0.0)
        model, client_id = key
        if hits < 1 or rate < MIN_HIT_RATE or hits >= self.threshold:
            return  # nothing to pool, or alerted on its own by the training-set rule
        if (model, client_id) in self._reported:
            # Already named in an alert: not pooled again while it goes on (one alert per wave).
            self._reported[(model, client_id)] = max(self._reported[(model, client_id)], client.last_seen)
            return
        network = network_of(client.client_ip)
        if network is None:
            return
        entry = (model, network, client_id)
        self._participants[entry] = _Participant(
            hits,
            rate,
            client.queries,
            client.first_seen,
            client.last_seen,
            client.evidence_for(("training",)),
        )
        self._participants.move_to_end(entry)
        while len(self._participants) > self.max_participants:
            self._participants.popitem(last=False)

    def detections(self, watermark: float, allowed: set[str]) -> list[Detection]:
        """Coordinated-clients detections whose pooled hits reached the threshold (pool windows pruned)."""
        horizon = watermark - WINDOW_SECONDS
        for entry in [entry for entry, p in self._participants.items() if p.last_seen < horizon]:
            del self._participants[entry]
        for key in [key for key, last_seen in self._reported.items() if last_seen < horizon]:
            del self._reported[key]
        pools: dict[tuple[str, str], dict[str, _Participant]] = {}
        for (model, network, client_id), participant in self._participants.items():
            pools.setdefault((model, network), {})[client_id] = participant
        detections = []
        for (model, network), participants in pools.items():
            pool = {c: p for c, p in participants.items() if c not in allowed}
            hits = sum(p.distinct_hits for p in pool.values())
            if len(pool) < MIN_CLIENTS or hits < self.threshold:
                continue
            detections.append(
                Detection(
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
                    queries=sum(p.queries for p in pool.values()),
                    atlas_technique=ATLAS_EXFILTRATION_VIA_INFERENCE_API,
                    triage=TRIAGE,
                )
            )
            for client_id, participant in pool.items():
                self._reported[(model, client_id)] = participant.last_seen
                del self._participants[(model, network, client_id)]
        return detections
