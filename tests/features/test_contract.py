"""The contract every feature object meets, run against each of them: its state survives being stored (its
bytes, its plain values strict JSON), and the object restored from it goes on exactly as the original does
(same snapshot, same answers, same state)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from detector.domain import Query, Requested
from detector.features import state_bytes
from detector.features.base import CounterFeature
from detector.features.client import FEATURE_TYPES, ClientFeatures
from detector.features.clusters import ClusterMatch, MatchKind, RecordClusters
from detector.features.embedding import Observation, QueryEmbedder
from tests.streams import Stream, augmentation_probe, boundary_walk, harvest, record

IMAGE_SIDE = 8


def contract_stream() -> list[Query]:
    """One client doing a bit of everything: distinct records, harvesting, retries, what-if edits (sparse
    variants), augmentation bursts and rounds, a boundary walk, multi-row requests, late and label-less
    queries, prompts, shifted images."""
    rng = np.random.default_rng(29)
    stream = Stream("contract", ip="198.51.100.7")
    queries = [stream.query(record()) for _ in range(10)]
    queries += harvest(stream, records=20)
    for row in [record() for _ in range(4)]:
        queries += [stream.query(row, gap=0.1) for _ in range(3)]
    base = record()
    for step in range(16):
        row = base.copy()
        row[step % 2] *= 1.0 + 0.01 * step  # one or two fields edited: sparse variants
        queries.append(stream.query(row, label=str(step % 2)))
    queries += augmentation_probe(stream, records=4, variants=5)
    queries += augmentation_probe(stream, records=20, variants=3, in_rounds=True)
    queries += boundary_walk(stream, steps=60)
    for position in range(3):  # one request of three rows
        query = stream.query(record(), requested=Requested.TOP_K, gap=0.0)
        query.row, query.batch_size = position, 3
        queries.append(query)
    late = stream.query(record(), requested=Requested.LABEL)
    late.timestamp -= 3600.0  # arrives out of order
    late.label, late.client_ip = None, None
    queries.append(late)
    for index in range(6):
        prompt = stream.query(np.zeros(0, dtype=np.float32), requested=Requested.LOGPROBS)
        prompt.vector, prompt.text = None, f"Summarise the history of customer 44{index:02d} in three lines."
        queries.append(prompt)
    images = Stream("contract", model="digits")
    for _ in range(3):
        image = rng.uniform(0.0, 16.0, (IMAGE_SIDE, IMAGE_SIDE)).astype(np.float32)
        # The image, then mirrored, shifted (circularly), and both: variants in the invariant view.
        for shifted in (image, np.roll(image, 1, axis=1)):
            for copy in (shifted, shifted[:, ::-1]):
                queries.append(images.query(copy.ravel(), requested=Requested.LABEL))
    return queries


def contract_observations() -> list[Observation]:
    queries = contract_stream()
    embedder = QueryEmbedder()
    observations = [
        observation
        for start in range(0, len(queries), 50)  # micro-batches, as the tracker sends them
        for observation in embedder.observe(queries[start : start + 50])
    ]
    for index, observation in enumerate(observations):
        observation.training_hit = 2 if index % 7 == 3 else 1 if index % 11 == 5 else 0
    return observations


def contract_matches(observations: list[Observation]) -> list[ClusterMatch]:
    """How each observation matches the client's clusters: what the counter features are fed with."""
    clusters = RecordClusters()
    return [clusters.assign(observation) for observation in observations]


OBSERVATIONS = contract_observations()
MATCHES = contract_matches(OBSERVATIONS)


def _first(found: Callable[[Observation, ClusterMatch], bool]) -> int:
    return next(i for i, pair in enumerate(zip(OBSERVATIONS, MATCHES, strict=True)) if found(*pair))


# Where the state is taken: fresh, after one query, and just before the first sparse variant (its test
# compares with the row before the cut), the second query of a burst, the first round completed, a label
# flip, a prompt, a shifted image.
CUTS = sorted(
    {
        0,
        1,
        _first(lambda _, match: match.kind is MatchKind.VARIANT and not match.dense),
        _first(lambda _, match: match.in_burst) + 1,
        _first(lambda _, match: match.completes_round) + 1,
        _first(lambda _, match: match.label_flip),
        _first(lambda observation, _: observation.raw is None),
        _first(lambda observation, _: observation.invariant is not None) + 1,
    }
)


@dataclass(frozen=True)
class Subject:
    """A feature object under the contract: how to make one, restore one, and feed it the i-th observation
    (returning what must come out the same)."""

    name: str
    make: Callable[[], Any]
    restore: Callable[[dict[str, Any]], Any]
    feed: Callable[[Any, int], Any]


def _feed_feature(feature: CounterFeature, index: int) -> dict[str, float]:
    feature.update(OBSERVATIONS[index], MATCHES[index])
    return feature.snapshot()


def _feed_clusters(clusters: RecordClusters, index: int) -> ClusterMatch:
    return clusters.assign(OBSERVATIONS[index])


def _feed_client(client: ClientFeatures, index: int) -> tuple[Any, ...]:
    client.update(OBSERVATIONS[index])
    if index % 10 == 0:
        client.evaluated_at = client.queries  # as the pipeline does when it judges the client
    evidence = {kind: list(events) for kind, events in client.evidence.items()}
    seen = (client.first_seen, client.last_seen, client.queries)
    return client.snapshot(), evidence, seen, client.client_ip


SUBJECTS = [
    *(Subject(kind.name, kind, kind.from_state, _feed_feature) for kind in FEATURE_TYPES),
    Subject("clusters", RecordClusters, RecordClusters.from_state, _feed_clusters),
    Subject("client", ClientFeatures, ClientFeatures.from_state, _feed_client),
]


def stored(state: dict[str, Any]) -> bytes:
    """`state` as it is stored (`state_bytes.dumps`), its plain values checked to be JSON any parser reads:
    no NaN or infinity, which the stored header could not hold."""
    json.dumps(state, allow_nan=False, default=lambda value: np.asarray(value).dtype.str)
    return state_bytes.dumps(state)


def test_the_stream_exercises_every_path() -> None:
    kinds = {match.kind for match in MATCHES}
    assert kinds == {MatchKind.NEW, MatchKind.EXACT, MatchKind.VARIANT}
    assert any(match.in_burst and match.label_flip for match in MATCHES)
    assert any(match.kind is MatchKind.VARIANT and not match.dense for match in MATCHES)
    assert any(
        observation.invariant is not None and match.kind is MatchKind.VARIANT
        for observation, match in zip(OBSERVATIONS, MATCHES, strict=True)
    )
    assert any(observation.raw is None for observation in OBSERVATIONS)


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("subject", SUBJECTS, ids=lambda subject: subject.name)
def test_a_restored_feature_goes_on_exactly_as_the_original(subject: Subject, cut: int) -> None:
    original = subject.make()
    for index in range(cut):
        subject.feed(original, index)
    state = original.state()
    written = stored(state)
    given = state_bytes.loads(written)
    restored = subject.restore(given)

    assert stored(restored.state()) == written
    if hasattr(original, "snapshot"):
        assert restored.snapshot() == original.snapshot()
    for index in range(cut, len(OBSERVATIONS)):
        assert subject.feed(restored, index) == subject.feed(original, index), index
    assert stored(restored.state()) == stored(original.state())
    # A state is a value: neither the original's nor the restored object's updates reach into it.
    assert stored(state) == written and stored(given) == written


def test_every_feature_type_is_under_the_contract() -> None:
    names = {subject.name for subject in SUBJECTS}
    assert {kind.name for kind in FEATURE_TYPES} <= names and {"clusters", "client"} <= names
