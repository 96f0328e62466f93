"""Fitting the scoring model: baseline traffic through the features, snapshotted as each client grows."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from detector.domain import Query
from detector.features.client import ClientKey, FeatureTracker
from detector.scoring.model import ScoringModel
from detector.scoring.rules import Rule

SNAPSHOT_GROWTH = 1.25  # a new snapshot once a client's query count grew by a quarter: log-spaced in time


def collect_trajectories(
    batches: Iterable[list[Query]], tracker: FeatureTracker, excluded: Callable[[str], bool]
) -> list[list[dict[str, float]]]:
    """Run `batches` through `tracker`; return each client's snapshots, taken as its traffic grew.

    Snapshots are taken at log-spaced query counts (and at the end), because the detector scores clients
    incrementally: thresholds must hold at every stage of a client's traffic, not only at its end. Clients
    for which `excluded(client_id)` holds (the allow-list) are left out. The same batches give the same
    trajectories in the same order, in any process.
    """
    trajectories: dict[ClientKey, list[dict[str, float]]] = {}
    snapshot_at: dict[ClientKey, int] = {}
    for batch in batches:
        # In key order, not the set's: its order changes with the process's string hashing, and the forest
        # fitted on the trajectories depends on their order.
        for key in sorted(tracker.update(batch)):
            client = tracker.get(key)
            if client is None or excluded(key[1]):
                continue
            if client.queries >= snapshot_at.get(key, 1):
                trajectories.setdefault(key, []).append(client.snapshot())
                snapshot_at[key] = max(int(client.queries * SNAPSHOT_GROWTH), client.queries + 1)
    for key, trajectory in trajectories.items():
        client = tracker.get(key)
        if client is not None:
            trajectory.append(client.snapshot())
    return list(trajectories.values())


def fit_scoring_model(
    batches: Iterable[list[Query]],
    tracker: FeatureTracker,
    rules: list[Rule],
    target_fpr: float,
    excluded: Callable[[str], bool],
) -> ScoringModel:
    """A scoring model fitted on the baseline `batches` (see `ScoringModel.fit`)."""
    trajectories = collect_trajectories(batches, tracker, excluded)
    scales = {
        model: {"mean": scale.mean.round(6).tolist(), "std": scale.std.round(6).tolist()}
        for model, scale in tracker.embedder.scales.items()
    }
    return ScoringModel.fit(trajectories, rules, target_fpr, scales)
