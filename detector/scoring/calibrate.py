"""Fitting the scoring model: baseline traffic through the features, snapshotted as each client grows, and
the baseline clients that would fire a rule at its floor, reported rather than calibrated on."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from detector.domain import AlertKind, Query
from detector.features.client import ClientKey, FeatureTracker
from detector.features.volume import QUERIES_FEATURE
from detector.scoring.model import ScoringModel, fires_at_floor, floor_outliers, rule_maximum
from detector.scoring.profiles import WHOLE_DAY_SECONDS, ClientProfile, hour_bit
from detector.scoring.rules import Rule
from detector.scoring.scorer import ANOMALY_MIN_QUERIES, ANOMALY_RULE_ID

SNAPSHOT_GROWTH = 1.25  # a new snapshot once a client's query count grew by a quarter: log-spaced in time
EVIDENCE_EVENTS = 3  # event ids kept per snapshot: the client's latest by then


@dataclass
class BaselineClient:
    """One baseline client's snapshots, taken as its traffic grew, and beside each the ids of its latest
    events by then (evidence a reviewer can look up)."""

    key: ClientKey
    trajectory: list[dict[str, float]] = field(default_factory=list)
    evidence: list[tuple[str, ...]] = field(default_factory=list)
    allow_listed: bool = False  # kept for its history only, never calibrated on
    # The UTC hours it was active in (`ClientProfile.hours`); None when the baseline lasted less than a day.
    hours: int | None = None


@dataclass(frozen=True)
class FloorCrossing:
    """A baseline client that would fire `rule` at its floor, one of the few left out of that rule's
    calibration (`floor_outliers`) and suggested for the allow-list, with the value it reached and the events
    that took it there."""

    model: str
    client_id: str
    rule: str
    kind: AlertKind
    value: float
    floor: float
    evidence: tuple[str, ...]


@dataclass(frozen=True)
class Calibration:
    """What `train` learnt: the model, and the baseline clients that were not calibration material."""

    model: ScoringModel
    crossings: list[FloorCrossing]
    # Rules whose floor more than `MAX_OUTLIER_SHARE` of the baseline clients reach (how many): a common
    # behaviour in this traffic, calibrated on rather than suggested for the allow-list.
    common_at_floor: dict[str, int]
    floors: dict[str, float]  # rule id -> floor

    def at_floor(self) -> set[str]:
        """The rules whose threshold in force is their floor (the baseline asked for no more)."""
        return {
            rule for rule, value in self.model.rule_thresholds.items() if value <= self.floors.get(rule, 0.0)
        }

    def thin_baseline(self) -> bool:
        """True when the baseline has too few clients to measure the target rate: thresholds then come
        from its largest values, raised by a margin (`ScoringModel.fit`)."""
        return self.model.target_fpr * self.model.baseline_clients < 1.0


def collect_baseline(
    batches: Iterable[list[Query]], tracker: FeatureTracker, excluded: Callable[[str], bool]
) -> list[BaselineClient]:
    """Run `batches` through `tracker`; return each client's snapshots, taken as its traffic grew.

    Snapshots are taken at log-spaced query counts (and at the end), because the detector scores clients
    incrementally: thresholds must hold at every stage of a client's traffic, not only at its end. Clients
    for which `excluded(client_id)` holds (the allow-list) are marked `allow_listed`; each has the hours it
    was active in when the baseline covered a whole day. The same batches give the same clients in the same
    order, in any process.
    """
    clients: dict[ClientKey, BaselineClient] = {}
    snapshot_at: dict[ClientKey, int] = {}
    latest: dict[ClientKey, tuple[str, ...]] = {}
    hours: dict[ClientKey, int] = {}
    earliest, newest = math.inf, -math.inf
    for batch in batches:
        for query in batch:
            key = (query.model, query.client_id)
            hours[key] = hours.get(key, 0) | hour_bit(query.timestamp)
            earliest, newest = min(earliest, query.timestamp), max(newest, query.timestamp)
            held = latest.get(key, ())
            if query.event_id not in held:  # the rows of one batched request share their event id
                latest[key] = (*held[1 - EVIDENCE_EVENTS :], query.event_id)
        # In key order, not the set's: its order changes with the process's string hashing, and the forest
        # fitted on the trajectories depends on their order.
        for key in sorted(tracker.update(batch)):
            client = tracker.get(key)
            if client is None:
                continue
            if client.queries >= snapshot_at.get(key, 1):
                baseline = clients.setdefault(key, BaselineClient(key, allow_listed=excluded(key[1])))
                baseline.trajectory.append(client.snapshot())
                baseline.evidence.append(latest[key])
                snapshot_at[key] = max(int(client.queries * SNAPSHOT_GROWTH), client.queries + 1)
    whole_day = newest - earliest >= WHOLE_DAY_SECONDS
    for key, baseline in clients.items():
        client = tracker.get(key)
        if client is not None:
            baseline.trajectory.append(client.snapshot())
            baseline.evidence.append(latest[key])
        baseline.hours = hours[key] if whole_day else None
    return list(clients.values())


def floor_crossings(
    clients: list[BaselineClient], rules: list[Rule]
) -> tuple[list[FloorCrossing], dict[str, int]]:
    """The (client, rule) pairs left out of the rule's calibration (`floor_outliers`), with the events of
    the first snapshot that reached the floor, by rule, then by value, highest first; and, for each rule
    whose floor too many clients reach to be left out, how many do."""
    crossings, common = [], {}
    for rule in rules:
        maxima = [rule_maximum(rule, client.trajectory) for client in clients]
        outliers = floor_outliers(rule, maxima)
        reaching = sum(1 for maximum in maxima if fires_at_floor(rule, maximum))
        if reaching and not outliers:
            common[rule.id] = reaching
        for index in outliers:
            client = clients[index]
            first = next(
                position
                for position, snapshot in enumerate(client.trajectory)
                if fires_at_floor(rule, rule.score_one(snapshot))
            )
            model, client_id = client.key
            crossings.append(
                FloorCrossing(
                    model, client_id, rule.id, rule.kind, maxima[index], rule.floor, client.evidence[first]
                )
            )
    crossings.sort(key=lambda crossing: (crossing.rule, -crossing.value, crossing.model, crossing.client_id))
    return crossings, common


def fit_scoring_model(
    batches: Iterable[list[Query]],
    tracker: FeatureTracker,
    rules: list[Rule],
    target_fpr: float,
    excluded: Callable[[str], bool],
) -> Calibration:
    """A scoring model fitted on the baseline `batches` (see `ScoringModel.fit`) but for the `excluded`
    (allow-listed) clients, with every baseline client's profile (`client_profiles`), and the clients that
    would fire a rule at its floor (`floor_crossings`)."""
    everyone = collect_baseline(batches, tracker, excluded)
    clients = [client for client in everyone if not client.allow_listed]
    scales = {
        model: {"mean": scale.mean.round(6).tolist(), "std": scale.std.round(6).tolist()}
        for model, scale in tracker.embedder.scales.items()
    }
    model = ScoringModel.fit([client.trajectory for client in clients], rules, target_fpr, scales)
    model.profiles = client_profiles(everyone, rules, model)
    crossings, common = floor_crossings(clients, rules)
    return Calibration(model, crossings, common, {rule.id: rule.floor for rule in rules})


def client_profiles(
    clients: list[BaselineClient], rules: list[Rule], model: ScoringModel
) -> dict[ClientKey, ClientProfile]:
    """Each client's profile (`ClientProfile.of`): its highest baseline score for every rule it scored on at
    all, and for the anomaly model (`ANOMALY_RULE_ID`) once it had the queries to be judged; its peak rate,
    output choice and hours. A known client is judged live against it (`detector.scoring.profiles`)."""
    maxima = {
        client.key: {rule.id: rule_maximum(rule, client.trajectory) for rule in rules} for client in clients
    }
    judged = [
        (client.key, snapshot)
        for client in clients
        for snapshot in client.trajectory
        if snapshot.get(QUERIES_FEATURE, 0.0) >= ANOMALY_MIN_QUERIES
    ]
    # One micro-batch for every client: the forest costs as much for one row as for thousands.
    for (key, _), score in zip(
        judged, model.anomaly_scores([snapshot for _, snapshot in judged]), strict=True
    ):
        highest = maxima[key]
        highest[ANOMALY_RULE_ID] = max(highest.get(ANOMALY_RULE_ID, 0.0), round(float(score), 6))
    return {
        client.key: ClientProfile.of(maxima[client.key], client.trajectory, client.hours)
        for client in clients
    }
