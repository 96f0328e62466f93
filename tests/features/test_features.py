"""The streaming features against the behaviours they target and the benign traffic that resembles them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from detector.domain import Requested
from detector.features.client import FeatureTracker, TrainingIndexes
from detector.features.clusters import BURST_GAP, ClusterMatch, MatchKind
from detector.features.embedding import PROJECTION_DIM, Observation, QueryEmbedder
from detector.features.probing import (
    BURST_HALF_WINDOW,
    RECENT_FLIPS_KEPT,
    ROUND_HALF_WINDOW,
    NearDuplicateProbing,
)
from detector.features.proximity import HIT_HALF_WINDOW
from detector.simulate.photos import LAYOUTS, moved, photo_patches
from tests.streams import (
    SCALE,
    WIDTH,
    SetIndex,
    Stream,
    augmentation_probe,
    boundary_walk,
    confidence_climb,
    harvest,
    rare_flips,
    record,
    rng,
    snapshot_after,
    warmed_tracker,
)


def test_retry_storms_are_exact_repeats_not_probing() -> None:
    stream = Stream()
    queries = [stream.query(row, gap=0.1) for row in (record() for _ in range(20)) for _ in range(8)]
    values = snapshot_after(queries)
    assert values["similarity.exact_share"] == pytest.approx(140 / 160)
    assert values["probing.dense_variants"] == 0 and values["probing.burst_clusters"] == 0


def test_what_if_analysts_make_sparse_variants_only() -> None:
    stream, base = Stream(), record()
    queries = []
    for step in range(60):
        row = base.copy()
        row[step % 2] += SCALE[step % 2] * 0.02 * (step + 1)  # one field edited at a time
        queries.append(stream.query(row, label=str(step % 2)))
    values = snapshot_after(queries)
    assert values["probing.sparse_variants"] >= 50
    assert values["probing.burst_clusters"] == 0 and values["probing.flips"] == 0


def test_augmentation_bursts_are_counted_per_record() -> None:
    values = snapshot_after(augmentation_probe(Stream(), records=12, variants=8))
    assert values["probing.burst_clusters"] == 12
    assert values["probing.dense_variants"] == 12 * 8
    assert values["probing.label_only_share"] == 1.0


def copy_of(base: np.ndarray) -> np.ndarray:
    """A small noisy copy of `base`: a dense variant of it."""
    copied: np.ndarray = base + rng.normal(size=WIDTH).astype(np.float32) * SCALE * 0.02
    return copied


@pytest.mark.parametrize(
    ("again", "bursts"),
    [
        ("copy copy", 0),  # an old record met again, then a near-neighbour: chance, as busy apps meet
        ("copy copy copy", 1),  # the record probed in a burst long after its first query
        ("exact copy copy", 1),  # the record itself again, then two copies of it: a burst
        ("copy copy other copy", 0),  # a copy, then another, but the run stops at the second
    ],
)
def test_a_burst_is_a_run_of_copies_back_to_back_not_a_cluster_grown_over_its_lifetime(
    again: str, bursts: int
) -> None:
    stream, base = Stream(), record()
    queries = [stream.query(base, requested=Requested.LABEL)]
    queries += [stream.query(record(), requested=Requested.LABEL) for _ in range(BURST_GAP * 4)]
    rows = {"copy": lambda: copy_of(base), "exact": lambda: base, "other": record}
    for word in again.split():
        if word == "other":  # far enough to leave the run behind
            queries += [stream.query(record(), requested=Requested.LABEL) for _ in range(BURST_GAP + 1)]
        else:
            queries.append(stream.query(rows[word](), requested=Requested.LABEL))
    values = snapshot_after(queries)
    assert values["probing.burst_clusters"] == bursts


def test_a_record_probed_in_two_bursts_far_apart_counts_once() -> None:
    """Monitoring that re-scores an entity in short runs now and then is not probing many records."""
    stream, base = Stream(), record()
    burst = [
        stream.query(row, requested=Requested.LABEL) for row in [base] + [copy_of(base) for _ in range(4)]
    ]
    cover = [stream.query(record(), requested=Requested.LABEL) for _ in range(BURST_GAP * 4)]
    again = [stream.query(copy_of(base), requested=Requested.LABEL) for _ in range(4)]
    values = snapshot_after(burst + cover + again)
    assert values["probing.burst_clusters"] == 1
    assert values["probing.max_cluster_size"] == 9


def test_the_record_itself_again_long_after_starts_a_new_run() -> None:
    stream, base = Stream(), record()
    queries = [stream.query(row, requested=Requested.LABEL) for row in (base, copy_of(base))]
    queries += [stream.query(record(), requested=Requested.LABEL) for _ in range(BURST_GAP * 4)]
    queries += [stream.query(row, requested=Requested.LABEL) for row in (base, copy_of(base))]
    assert snapshot_after(queries)["probing.burst_clusters"] == 0  # two runs of two, not one of three
    queries.append(stream.query(copy_of(base), requested=Requested.LABEL))
    assert snapshot_after(queries)["probing.burst_clusters"] == 1


def test_augmentation_in_rounds_counts_each_record_once_as_a_round_not_as_bursts() -> None:
    values = snapshot_after(augmentation_probe(Stream(), records=40, variants=4, in_rounds=True))
    assert values["probing.round_clusters"] == 40
    assert values["probing.peak_recent_rounds"] == 40
    assert values["probing.revisits"] == 40 * 4
    assert values["probing.burst_clusters"] == 0 and values["probing.dense_variants"] == 0


Image = Callable[[np.ndarray], np.ndarray]


def test_grey_image_copies_in_rounds_come_back_to_their_records_in_the_invariant_view() -> None:
    generator = np.random.default_rng(8)
    images = [generator.uniform(0.0, 16.0, (8, 8)).astype(np.float32) for _ in range(40)]
    stream = Stream("rounds", model="digits")
    queries = [
        stream.query(np.roll(image, shift, axis=1).ravel(), requested=Requested.LABEL, gap=0.2)
        for shift in range(4)  # a round of every image shifted by one more column
        for image in images
    ]
    values = snapshot_after(queries)
    assert values["probing.round_clusters"] == 40 and values["probing.peak_recent_rounds"] == 40
    assert values["probing.revisits"] == 40 * 3


@pytest.mark.parametrize("layout", ["planar", "interleaved"])
def test_colour_image_copies_in_rounds_come_back_to_their_records_in_the_invariant_view(layout: str) -> None:
    generator = np.random.default_rng(8)
    images = photo_patches(40, 32, generator)
    copies: list[Image] = [
        lambda image: image,
        lambda image: image[:, ::-1],  # mirrored
        lambda image: moved(image, 1, 0),  # one pixel down
        lambda image: moved(image[:, ::-1], 1, 0),  # mirrored, one pixel down
    ]
    model = f"photos-{layout}"
    tracker, others = warmed_tracker(), Stream("others", model=model)
    tracker.update([others.query(LAYOUTS[layout](image)) for image in photo_patches(300, 32, generator)])
    stream = Stream("rounds", model=model)
    queries = [
        stream.query(LAYOUTS[layout](copy(image)), requested=Requested.LABEL, gap=0.2)
        for copy in copies  # a round of every image, then of every image's next copy
        for image in images
    ]
    values = snapshot_after(queries, tracker)
    assert values["probing.round_clusters"] == 40 and values["probing.peak_recent_rounds"] == 40
    assert values["probing.revisits"] == 40 * 3


def test_a_colour_images_invariant_view_is_the_same_in_either_layout() -> None:
    images = photo_patches(8, 32, np.random.default_rng(9))
    stream, embedder = Stream("layouts"), QueryEmbedder()
    views = {
        layout: np.stack(
            [
                observation.invariant if observation.invariant is not None else np.zeros(0)
                for observation in embedder.observe(
                    [stream.query(LAYOUTS[layout](image)) for image in images]
                )
            ]
        )
        for layout in ("planar", "interleaved")
    }
    assert views["planar"].shape == (8, PROJECTION_DIM)
    np.testing.assert_allclose(views["interleaved"], views["planar"], atol=1e-5)


def test_rounds_in_bursts_are_not_rounds() -> None:
    values = snapshot_after(augmentation_probe(Stream(), records=40, variants=4))
    assert values["probing.burst_clusters"] == 40
    assert values["probing.round_clusters"] == 0 and values["probing.revisits"] == 0


# A revisit completing a round, and a variant completing a burst.
ROUND = ClusterMatch(MatchKind.VARIANT, 0, 0.01, dense=True, cluster_size=3, gap=BURST_GAP + 1)
BURST = ClusterMatch(MatchKind.VARIANT, 0, 0.01, dense=True, cluster_size=3, gap=1, completes_burst=True)


@pytest.mark.parametrize(
    ("counted", "at", "peak"),
    [
        ("rounds", range(200, 264), 64),  # across a half-window's end: counted whole
        ("rounds", (100, 500), 2),  # in two consecutive half-windows
        ("rounds", (100, 600), 1),  # more than a half-window between their half-windows
        ("rounds", (10, 700, 701, 702), 3),
        ("bursts", range(1000, 1030), 30),
        ("bursts", (100, 1000), 2),
        ("bursts", (100, 1100), 1),
    ],
)
def test_rounds_and_bursts_count_together_within_consecutive_half_windows(
    counted: str, at: range | tuple[int, ...], peak: int
) -> None:
    assert (ROUND_HALF_WINDOW, BURST_HALF_WINDOW) == (256, 512)  # the positions above are chosen for them
    match, total = {"rounds": (ROUND, "round_clusters"), "bursts": (BURST, "burst_clusters")}[counted]
    stream, feature = Stream(), NearDuplicateProbing()
    query = stream.query(record(), requested=Requested.LABEL)
    observation = Observation(query, np.zeros(PROJECTION_DIM, dtype=np.float32), None, 0, None)
    other = ClusterMatch(MatchKind.NEW, 1, 1.0)
    for number in range(1, max(at) + 1):
        feature.update(observation, match if number in at else other)
    assert feature.values()[f"peak_recent_{counted}"] == peak
    assert feature.values()[total] == len(at)


def test_a_boundary_walk_stays_one_cluster_and_counts_label_flips() -> None:
    values = snapshot_after(boundary_walk(Stream(), steps=400))
    assert values["probing.walk_clusters"] >= 1
    assert values["probing.flips"] > 100
    assert values["similarity.distinct_share"] < 0.05


def test_a_busy_clients_rare_flips_are_not_a_walks_pace_and_a_walks_stays_counted() -> None:
    stream, tracker = Stream(), warmed_tracker()
    values = snapshot_after(rare_flips(stream, flips=4), tracker)
    assert values["probing.flips"] == 4 and values["probing.peak_recent_flips"] == 1

    walked = snapshot_after(boundary_walk(stream, steps=60), tracker)
    assert walked["probing.peak_recent_flips"] == RECENT_FLIPS_KEPT  # as many as are kept
    quiet = snapshot_after([stream.query(record(), requested=Requested.LABEL) for _ in range(600)], tracker)
    assert quiet["probing.peak_recent_flips"] == RECENT_FLIPS_KEPT  # however long ago


@pytest.mark.parametrize(("fourth_flip_at", "peak"), [(512, 4), (513, 3)])
def test_flips_count_together_within_512_consecutive_queries(fourth_flip_at: int, peak: int) -> None:
    stream, feature = Stream(), NearDuplicateProbing()
    query = stream.query(record(), requested=Requested.LABEL)
    observation = Observation(query, np.zeros(PROJECTION_DIM, dtype=np.float32), None, 0, None)
    flip = ClusterMatch(MatchKind.VARIANT, 0, 0.01, dense=True, label_flip=True, cluster_size=2, gap=1)
    other = ClusterMatch(MatchKind.NEW, 1, 1.0)
    for number in range(1, fourth_flip_at + 1):
        feature.update(observation, flip if number in {1, 2, 3, fourth_flip_at} else other)
    assert feature.values()["peak_recent_flips"] == peak


def test_harvesting_counts_distinct_records_asked_for_confidence() -> None:
    stream = Stream()
    queries = harvest(stream, records=300) + [
        stream.query(record(), requested=Requested.LABEL) for _ in range(30)
    ]
    values = snapshot_after(queries)
    assert values["confidence.distinct_asked"] == 300
    assert values["confidence.asked_share"] == pytest.approx(300 / 330)
    assert values["confidence.mean_max"] == pytest.approx(0.7, abs=1e-5)
    assert values["confidence.mean_margin"] == pytest.approx(0.5, abs=1e-5)


def test_a_confidence_climb_counts_its_steps_up_and_a_what_if_user_few() -> None:
    climber = snapshot_after(confidence_climb(Stream(), steps=90))
    assert climber["confidence.climbs"] >= 30  # 36 steps up to 0.99, each CLIMB_STEP or more above the last

    stream, base, rng = Stream(), record(), np.random.default_rng(3)
    queries = []
    for step in range(90):  # the same small edits, the model's confidence going up and down
        row = base.copy()
        row[step % 2] += SCALE[step % 2] * 0.02 * (step % 7)
        top = float(rng.uniform(0.5, 0.99))
        queries.append(stream.query(row, probabilities=np.array([top, 1.0 - top], dtype=np.float32)))
    what_if = snapshot_after(queries)
    assert what_if["confidence.climbs"] <= 10
    assert snapshot_after(harvest(Stream(), records=300))["confidence.climbs"] == 0


def test_training_set_hits_are_counted_when_an_index_is_loaded() -> None:
    members = [record() for _ in range(40)]
    tracker = warmed_tracker()
    tracker.training_indexes = TrainingIndexes(default=SetIndex(members))
    stream = Stream()
    tracker.update([stream.query(row) for row in members[:20]] + [stream.query(record()) for _ in range(20)])
    client = tracker.get(("m", "c"))
    assert client is not None
    values = client.snapshot()
    assert values["training.hits"] == 20 and values["training.hit_rate"] == 0.5
    assert len(client.evidence["training"]) == 5


def test_the_recent_share_of_training_records_counts_each_new_record_once() -> None:
    members = [record() for _ in range(5)]
    tracker = warmed_tracker()
    tracker.training_indexes = TrainingIndexes(default=SetIndex(members, near=True))
    stream = Stream()
    # Four training records among the first records: below the hits a share is measured on.
    tracker.update([stream.query(row) for row in members[:4]] + [stream.query(record()) for _ in range(4)])
    client = tracker.get(("m", "c"))
    assert client is not None
    assert client.snapshot()["training.peak_recent_hit_share"] == 0.0
    # Copies and retries of a training record count once: the fifth record makes the share 5 of 10 records.
    retries = [stream.query(members[3]) for _ in range(6)]
    tracker.update([*retries, stream.query(record()), stream.query(members[4])])
    assert client.snapshot()["training.peak_recent_hit_share"] == 0.5


def test_the_recent_share_of_training_records_is_the_attacks_after_a_long_history() -> None:
    members = [record() for _ in range(2 * HIT_HALF_WINDOW)]
    tracker = warmed_tracker()
    tracker.training_indexes = TrainingIndexes(default=SetIndex(members, near=True))
    stream = Stream()
    # A key's long ordinary history, to the end of a half-window; then training records back to back.
    tracker.update([stream.query(record()) for _ in range(32 * HIT_HALF_WINDOW - 1)])
    tracker.update([stream.query(row) for row in members[:5]])
    client = tracker.get(("m", "c"))
    assert client is not None
    # The last half-window's ordinary records still dilute the first hits ...
    assert client.snapshot()["training.peak_recent_hit_share"] == 5 / (HIT_HALF_WINDOW + 5)
    # ... and no more once two half-windows of them passed: the share is the attack's alone.
    tracker.update([stream.query(row) for row in members[5:]])
    values = client.snapshot()
    assert values["training.peak_recent_hit_share"] == 1.0
    assert values["training.hit_rate"] < 0.06  # over the whole history: diluted below MIA-003's guard


def test_text_prompts_that_share_most_trigrams_are_variants() -> None:
    tracker = FeatureTracker()
    stream = Stream(model="llm")
    base = "Summarise the account history of customer 4411 and list the three largest transactions."
    queries = []
    for index in range(10):
        query = stream.query(np.zeros(0, dtype=np.float32), requested=Requested.LOGPROBS)
        query.vector, query.text = None, base.replace("4411", f"44{index:02d}")
        queries.append(query)
    tracker.update(queries)
    client = tracker.get(("llm", "c"))
    assert client is not None
    values = client.snapshot()
    assert values["similarity.variant_share"] >= 0.8
    assert values["confidence.rich_share"] == 1.0


def test_memory_is_bounded_per_client_and_in_clients() -> None:
    tracker = FeatureTracker(max_clients=5)
    for number in range(8):
        stream = Stream(client=f"c{number}")
        tracker.update([stream.query(record()) for _ in range(10)])
    assert len(tracker) == 5
    busy = Stream("busy")
    tracker.update([busy.query(record()) for _ in range(2000)])
    client = tracker.get(("m", "busy"))
    assert client is not None and len(client.clusters) <= 256
