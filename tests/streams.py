"""Synthetic query streams of one client for feature and scoring tests: benign habits, attack behaviours."""

from __future__ import annotations

import numpy as np

from detector.domain import Query, Requested
from detector.features.client import FeatureTracker
from detector.features.embedding import QueryEmbedder

WIDTH = 30
rng = np.random.default_rng(11)
SCALE = rng.uniform(0.5, 50.0, WIDTH).astype(np.float32)  # features on very different scales, as in real data


def record() -> np.ndarray:
    return (rng.normal(size=WIDTH) * SCALE).astype(np.float32)


class Stream:
    """Builds the queries of one client with a simulated clock."""

    def __init__(self, client: str = "c", model: str = "m", ip: str | None = None) -> None:
        self.client, self.model, self.clock, self.count, self.ip = client, model, 1_764_000_000.0, 0, ip

    def query(
        self,
        row: np.ndarray,
        *,
        label: str = "0",
        requested: Requested = Requested.PROBABILITIES,
        probabilities: np.ndarray | None = None,
        gap: float = 1.0,
    ) -> Query:
        self.clock += gap
        self.count += 1
        return Query(
            event_id=f"{self.client}-{self.count}",
            row=0,
            batch_size=1,
            timestamp=self.clock,
            model=self.model,
            model_version=None,
            client_id=self.client,
            client_ip=self.ip,
            user_agent=None,
            vector=row.astype(np.float32),
            text=None,
            requested=requested,
            label=label,
            probabilities=probabilities,
        )


def warmed_tracker() -> FeatureTracker:
    """A tracker whose per-model scale has been learned from benign traffic of other clients."""
    tracker = FeatureTracker(QueryEmbedder())
    warmup = Stream("warmup")
    tracker.update([warmup.query(record()) for _ in range(300)])
    return tracker


def snapshot_after(queries: list[Query], tracker: FeatureTracker | None = None) -> dict[str, float]:
    tracker = tracker or warmed_tracker()
    for start in range(0, len(queries), 50):  # micro-batches, as the pipeline sends them
        tracker.update(queries[start : start + 50])
    client = tracker.get((queries[0].model, queries[0].client_id))
    assert client is not None
    return client.snapshot()


class SetIndex:
    """A stand-in training index over rows (the real index has its own tests): each is an exact hit, or a
    near one with `near` (as noisy copies of training records are)."""

    width = WIDTH

    def __init__(self, rows: list[np.ndarray], *, near: bool = False) -> None:
        self._rows = {row.tobytes() for row in rows}
        self._hit = 1 if near else 2

    def lookup(self, rows: np.ndarray) -> np.ndarray:
        return np.array([self._hit if row.tobytes() in self._rows else 0 for row in rows], dtype=np.int8)


def augmentation_probe(
    stream: Stream, records: int = 12, variants: int = 8, *, in_rounds: bool = False
) -> list[Query]:
    """Label-only augmentation probing: each record, then a burst of small noisy variants of it; or, in
    rounds, every record, then a variant of each, and so on (a whole augmented set at a time)."""
    bases = [record() for _ in range(records)]
    copies = [
        [base] + [base + rng.normal(size=WIDTH).astype(np.float32) * SCALE * 0.02 for _ in range(variants)]
        for base in bases
    ]
    order = zip(*copies, strict=True) if in_rounds else copies
    return [stream.query(row, requested=Requested.LABEL, gap=0.2) for rows in order for row in rows]


def boundary_walk(stream: Stream, steps: int = 400, requested: Requested = Requested.LABEL) -> list[Query]:
    """A walk of small dense steps hovering on the decision boundary (labels keep flipping), label-only unless
    `requested` says otherwise (an API answering every query with its probabilities)."""
    point = record()
    direction = rng.normal(size=WIDTH).astype(np.float32) * SCALE
    queries = []
    for step in range(steps):
        point = point + direction * 0.002 + rng.normal(size=WIDTH).astype(np.float32) * SCALE * 0.004
        label = "1" if (step // 3) % 2 else "0"
        # Answered with probabilities, the label is their argmax, as a decoded answer's is.
        leaning = [0.51, 0.49] if label == "0" else [0.49, 0.51]
        probabilities = None if requested is Requested.LABEL else np.array(leaning, dtype=np.float32)
        queries.append(
            stream.query(point, label=label, requested=requested, probabilities=probabilities, gap=0.05)
        )
    return queries


def rare_flips(stream: Stream, flips: int, apart: int = 600) -> list[Query]:
    """A busy benign client's rare near-neighbours of another label: `flips` times a record and a near copy
    of it labelled otherwise (one label flip each), then `apart` distinct records; label-only."""
    queries = []
    for _ in range(flips):
        base = record()
        queries.append(stream.query(base, label="0", requested=Requested.LABEL))
        near = base + rng.normal(size=WIDTH).astype(np.float32) * SCALE * 0.004
        queries.append(stream.query(near, label="1", requested=Requested.LABEL))
        queries += [stream.query(record(), requested=Requested.LABEL) for _ in range(apart)]
    return queries


def harvest(stream: Stream, records: int = 300) -> list[Query]:
    """Confidence harvesting: one query per distinct record, asking for the probability vector."""
    probabilities = np.array([0.7, 0.2, 0.1], dtype=np.float32)
    return [stream.query(record(), probabilities=probabilities) for _ in range(records)]


def confidence_climb(stream: Stream, steps: int = 60) -> list[Query]:
    """Shadow-data synthesis: one record changed a feature or two at a time, each change kept when the top
    class's probability rose; every other proposal is a step back (its probability lower)."""
    row, top, queries = record(), 0.55, []
    for step in range(steps):
        proposal = row.copy()
        proposal[step % WIDTH] += SCALE[step % WIDTH] * 0.03
        rises = step % 3 != 2
        shown = min(0.99, top + 0.012) if rises else max(0.05, top - 0.1)
        queries.append(stream.query(proposal, probabilities=np.array([shown, 1.0 - shown], dtype=np.float32)))
        if rises:
            row, top = proposal, shown
    return queries
