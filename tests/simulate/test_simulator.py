"""The traffic simulator: files, determinism, validity against the decoder, and the signature of every
behaviour, measured with plain numpy on the generated logs (and the training rows the simulator wrote)."""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from sklearn.datasets import load_breast_cancer, load_digits

from detector.domain import Origin, Query, RawRecord
from detector.ingest import RecordDecoder
from detector.settings import IngestSettings
from detector.simulate import SCENARIOS, AttackKind, Evasion, simulate
from detector.simulate.attacks import Augment, Augmentation, BoundaryWalk, Candidates
from detector.simulate.benign import SteadyApp
from detector.simulate.models import MODEL_NAMES, ServedModel, load_models
from detector.simulate.scenarios import plan
from detector.simulate.simulator import _write_period
from detector.simulate.traffic import DAY, HOUR, Window

SEED = 11
START = datetime(2026, 11, 29, tzinfo=UTC).timestamp()
LOADERS: dict[str, Callable[..., Any]] = {"credit-risk": load_breast_cancer, "digits": load_digits}


@dataclass
class ClientTraffic:
    """One client's decoded traffic, in log order: one entry per query (row) unless named per record."""

    rows: list[np.ndarray] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    probabilities: list[bool] = field(default_factory=list)
    record_times: list[float] = field(default_factory=list)
    record_bodies: list[bytes] = field(default_factory=list)  # the request tensor's data, per record

    @property
    def matrix(self) -> np.ndarray:
        return np.array(self.rows)


@dataclass
class Run:
    out: Path
    summary: Any
    truth: dict[str, dict[str, Any]]
    clients: dict[str, ClientTraffic]
    timestamps: list[float]
    queries: int


def decode_file(path: Path) -> tuple[list[list[Query]], list[dict[str, Any]]]:
    """Every record of a JSON Lines file through the detector's decoder (raising on any rejection)."""
    decoder = RecordDecoder(IngestSettings().for_datasets())
    decoded, raw = [], []
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            value = line.rstrip(b"\n")
            decoded.append(decoder.decode(RawRecord(value, None, Origin("file", str(path), 0, number), 0.0)))
            raw.append(orjson.loads(value))
    return decoded, raw


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("smoke")
    summary = simulate("smoke", SEED, out)
    truth = {
        line["client_id"]: line for line in map(orjson.loads, (out / "truth.jsonl").read_bytes().splitlines())
    }
    decoded, raw = decode_file(out / "events.jsonl")
    clients: dict[str, ClientTraffic] = defaultdict(ClientTraffic)
    timestamps = []
    for queries, record in zip(decoded, raw, strict=True):
        traffic = clients[queries[0].client_id]
        timestamps.append(queries[0].timestamp)
        traffic.record_times.append(queries[0].timestamp)
        traffic.record_bodies.append(orjson.dumps(record["request"]["inputs"]))
        for query in queries:
            assert query.vector is not None
            traffic.rows.append(query.vector)
            traffic.labels.append(query.label)
            traffic.probabilities.append(query.probabilities is not None)
    return Run(out, summary, truth, dict(clients), timestamps, sum(map(len, decoded)))


def digest(directory: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir())}


def training(run: Run, model: str) -> set[bytes]:
    return {row.tobytes() for row in np.load(run.out / f"training-{model}.npy")}


def dataset_rows(model: str) -> set[bytes]:
    data = LOADERS[model](return_X_y=True)[0]
    return {row.tobytes() for row in np.asarray(data, dtype=np.float32)}


def clients_of(run: Run, population: str) -> list[str]:
    return sorted(client for client, line in run.truth.items() if line["population"] == population)


def scaled_steps(run: Run, client: str) -> np.ndarray:
    """Distances between consecutive queries of `client`, per feature scaled by the training set's range
    (at least 1), divided by sqrt(features): about 1 between unrelated records, near 0 for near-duplicates."""
    members = np.load(run.out / f"training-{run.truth[client]['model']}.npy")
    scale = np.maximum(members.max(axis=0) - members.min(axis=0), 1.0)
    rows = run.clients[client].matrix / scale
    return np.linalg.norm(np.diff(rows, axis=0), axis=1) / math.sqrt(rows.shape[1])  # type: ignore[no-any-return]


# -- the run as a whole ------------------------------------------------------------------------------------


def test_smoke_generates_a_few_thousand_queries_in_seconds(smoke: Run) -> None:
    assert smoke.summary.seconds < 30
    assert 2_000 <= smoke.queries <= 20_000
    assert smoke.summary.queries == smoke.queries
    assert smoke.summary.records == len(smoke.timestamps)
    assert smoke.summary.attackers == len(AttackKind)


def test_output_is_deterministic_for_a_seed_and_differs_across_seeds(smoke: Run, tmp_path: Path) -> None:
    again = simulate("smoke", SEED, tmp_path / "again")
    other = simulate("smoke", SEED + 1, tmp_path / "other")
    assert digest(again.out) == digest(smoke.out)
    differing = {name for name, value in digest(other.out).items() if digest(smoke.out)[name] != value}
    assert {"events.jsonl", "baseline.jsonl", "truth.jsonl", "training-digits.npy"} <= differing


def test_every_record_decodes_and_timestamps_are_sorted_within_the_hour(smoke: Run) -> None:
    # decode_file raised on any dead letter; what remains is the order and the span.
    assert smoke.timestamps == sorted(smoke.timestamps)
    assert smoke.timestamps[0] >= START and smoke.timestamps[-1] < START + HOUR


def test_baseline_is_benign_traffic_of_the_hour_before(smoke: Run) -> None:
    decoded, _ = decode_file(smoke.out / "baseline.jsonl")
    times = [queries[0].timestamp for queries in decoded]
    assert times == sorted(times)
    assert times[0] >= START - HOUR and times[-1] < START
    attackers = {client for client, line in smoke.truth.items() if line["role"] == "attacker"}
    baseline_clients = {queries[0].client_id for queries in decoded}
    assert not baseline_clients & attackers
    assert baseline_clients & set(smoke.truth)  # the same benign keys, another day
    assert sum(map(len, decoded)) == smoke.summary.baseline_queries


def test_truth_covers_exactly_the_clients_in_events(smoke: Run) -> None:
    assert set(smoke.truth) == set(smoke.clients)
    for client, line in smoke.truth.items():
        if line["role"] == "attacker":
            assert line["kind"] in {kind.value for kind in AttackKind}
            assert line["campaign"]
            # Without cover traffic, every query of an attacking key is an attack query.
            assert line["attack_queries"] == len(smoke.clients[client].rows)
            started = datetime.fromisoformat(line["attack_start"]).timestamp()
            assert started == smoke.clients[client].record_times[0]
        else:
            assert line["role"] == "benign"
            assert (line["kind"], line["campaign"], line["attack_start"], line["attack_queries"]) == (
                None,
                None,
                None,
                0,
            )
        assert line["model"] in MODEL_NAMES


def test_training_files_and_metadata(smoke: Run) -> None:
    metadata = orjson.loads((smoke.out / "scenario.json").read_bytes())
    for model in MODEL_NAMES:
        members = np.load(smoke.out / f"training-{model}.npy")
        assert members.dtype == np.float32
        assert len(members) == metadata["models"][model]["members"]
        assert members.shape[1] == metadata["models"][model]["features"]
        # A membership attack has a real signal to find.
        assert metadata["models"][model]["membership_auc"] > 0.65
    assert (metadata["scenario"], metadata["seed"]) == ("smoke", SEED)
    assert (metadata["start"], metadata["end"]) == ("2026-11-29T00:00:00.000Z", "2026-11-29T01:00:00.000Z")
    populations = metadata["events"]["populations"]
    assert sum(counts["queries"] for counts in populations.values()) == smoke.queries
    assert set(populations) >= {"steady_app", "dashboard", "nightly_rescore", *map(str, AttackKind)}


def test_unknown_scenario_negative_seeds_and_an_empty_baseline_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown scenario 'huge'"):
        simulate("huge", SEED, tmp_path)
    with pytest.raises(ValueError, match="must be 0 or more"):
        simulate("smoke", -1, tmp_path)
    with pytest.raises(ValueError, match="must be 0 or more"):
        simulate("smoke", SEED, tmp_path, population=-1)
    with pytest.raises(ValueError, match="positive number of hours"):
        simulate("smoke", SEED, tmp_path, baseline_hours=0)


def test_the_baseline_lasts_the_hours_asked_for(smoke: Run, tmp_path: Path) -> None:
    longer = simulate("smoke", SEED, tmp_path / "longer", baseline_hours=3)
    decoded, _ = decode_file(longer.out / "baseline.jsonl")
    times = [queries[0].timestamp for queries in decoded]
    assert times[0] >= START - 3 * HOUR and times[0] < START - 2 * HOUR and times[-1] < START
    assert longer.baseline_queries > smoke.summary.baseline_queries
    # The main period is the same, byte for byte.
    assert digest(longer.out)["events.jsonl"] == digest(smoke.out)["events.jsonl"]
    metadata = orjson.loads((longer.out / "scenario.json").read_bytes())
    assert metadata["baseline"]["start"] == "2026-11-28T21:00:00.000Z"


def test_another_population_uses_the_same_models_with_other_clients(smoke: Run, tmp_path: Path) -> None:
    other = simulate("smoke", SEED, tmp_path / "other", population=SEED + 1)
    assert digest(other.out)["training-digits.npy"] == digest(smoke.out)["training-digits.npy"]
    truth = {
        line["client_id"] for line in map(orjson.loads, (other.out / "truth.jsonl").read_bytes().splitlines())
    }
    # Only the owner's jobs, named after their model, are in both.
    assert truth & set(smoke.truth) == {client for client in smoke.truth if client.startswith("svc-")}
    assert orjson.loads((other.out / "scenario.json").read_bytes())["population"] == SEED + 1


# -- signatures of the behaviours --------------------------------------------------------------------------


def test_boundary_probing_sends_near_duplicates_whose_labels_flip(smoke: Run) -> None:
    (prober,) = clients_of(smoke, "boundary_probing")
    traffic = smoke.clients[prober]
    assert len(traffic.rows) >= 300
    # Labels alone, or every answer with its probabilities (an API that always returns them).
    assert all(traffic.probabilities) or not any(traffic.probabilities)
    steps = scaled_steps(smoke, prober)
    benign_steps = np.concatenate([scaled_steps(smoke, client) for client in clients_of(smoke, "steady_app")])
    assert np.median(steps) < 0.05 < np.median(benign_steps)
    labels = np.array(traffic.labels)
    near = steps < 0.05
    flips = labels[1:] != labels[:-1]
    assert flips[near].mean() > 0.2


def test_confidence_harvesting_asks_probabilities_once_per_candidate_half_members(smoke: Run) -> None:
    (harvester,) = clients_of(smoke, "confidence_harvesting")
    traffic = smoke.clients[harvester]
    members = training(smoke, smoke.truth[harvester]["model"])
    rows = [row.tobytes() for row in traffic.rows]
    assert all(traffic.probabilities)
    assert len(set(rows)) == len(rows) >= 30
    assert set(rows) <= dataset_rows(smoke.truth[harvester]["model"])  # real candidate records
    assert 0.35 <= np.mean([row in members for row in rows]) <= 0.65


def test_training_set_targeting_candidates_are_mostly_members(smoke: Run) -> None:
    (targeter,) = clients_of(smoke, "training_set_targeting")
    members = training(smoke, smoke.truth[targeter]["model"])
    assert np.mean([row.tobytes() in members for row in smoke.clients[targeter].rows]) >= 0.8


def test_augmentation_probing_sends_variants_of_each_candidate_in_bursts_or_in_rounds(smoke: Run) -> None:
    (prober,) = clients_of(smoke, "augmentation_probing")
    traffic = smoke.clients[prober]
    originals = dataset_rows(smoke.truth[prober]["model"])
    starts = np.flatnonzero([row.tobytes() in originals for row in traffic.rows])
    assert len(starts) and starts[0] == 0  # it opens with a candidate itself
    if len(starts) > 1 and starts[1] == 1:  # in rounds: every candidate, then a copy of each, round by round
        np.testing.assert_array_equal(starts, np.arange(len(starts)))
        rounds, rest = divmod(len(traffic.rows), len(starts))
        assert rest == 0 and 2 <= rounds <= 50
    else:  # a burst per candidate, opening with it
        sizes = np.diff([*starts, len(traffic.rows)])
        assert sizes.min() >= 2 and sizes.max() <= 50
        assert len(set(sizes.tolist())) == 1  # one strategy, so one burst size


def test_retry_storms_repeat_requests_exactly_within_seconds(smoke: Run) -> None:
    longest = 0
    for client in clients_of(smoke, "retry_storm"):
        traffic = smoke.clients[client]
        run = 1
        for index in range(1, len(traffic.record_bodies)):
            if traffic.record_bodies[index] == traffic.record_bodies[index - 1]:
                assert traffic.record_times[index] - traffic.record_times[index - 1] <= 1.0
                run += 1
                longest = max(longest, run)
            else:
                run = 1
    assert longest >= 4  # the request and at least 3 retries


def test_benign_clients_send_no_training_rows_except_the_nightly_job(smoke: Run) -> None:
    for client, line in smoke.truth.items():
        if line["role"] != "benign":
            continue
        members = training(smoke, line["model"])
        sent = [row.tobytes() in members for row in smoke.clients[client].rows]
        if line["population"] == "nightly_rescore":
            assert all(sent) and len(sent) == len(members)
        else:
            assert not any(sent), line["population"]


def test_evaluation_scores_the_whole_held_out_set_once(smoke: Run) -> None:
    for client in clients_of(smoke, "evaluation"):
        model = smoke.truth[client]["model"]
        held_out = dataset_rows(model) - training(smoke, model)
        sent = [row.tobytes() for row in smoke.clients[client].rows]
        assert sorted(sent) == sorted(held_out)
        assert all(smoke.clients[client].probabilities)


def test_dashboards_poll_the_same_rows_every_minute(smoke: Run) -> None:
    for client in clients_of(smoke, "dashboard"):
        traffic = smoke.clients[client]
        assert len(set(traffic.record_bodies)) == 1
        gaps = np.diff(traffic.record_times)
        assert np.all(np.abs(gaps - 60) < 1)


# -- parts ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models() -> dict[str, ServedModel]:
    return load_models(SEED)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_served_model_answers_exactly_like_the_estimator(
    models: dict[str, ServedModel], model_name: str
) -> None:
    model = models[model_name]
    rng = np.random.default_rng(0)
    for size in (1, 7, 31, 32, 300):
        rows = model.non_members[rng.choice(len(model.non_members), size)] + rng.normal(size=(size, 1))
        np.testing.assert_array_equal(model.predict_proba(rows), model.estimator.predict_proba(rows))


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_synthesised_records_are_new_and_in_range(models: dict[str, ServedModel], model_name: str) -> None:
    model = models[model_name]
    rows = model.synthesize(np.random.default_rng(1), 2_000)
    assert rows.shape == (2_000, model.n_features)
    assert not any(model.is_member_row(row) for row in rows)
    known = {row.astype(np.float32).tobytes() for row in model.non_members}
    assert not any(row.astype(np.float32).tobytes() in known for row in rows)
    assert np.all(rows >= model.lower) and np.all(rows <= model.upper)
    # Spread like the data, not a few hundred clusters (pixels almost always blank aside).
    assert len({row.tobytes() for row in rows}) == len(rows)
    varying = model.std > 0.1 * model.std.max()
    assert np.all(rows.std(axis=0)[varying] >= 0.5 * model.std[varying])


@pytest.mark.parametrize(
    ("augmentation", "count"),
    [
        (Augmentation("rotation", 3, 6.0), 7),  # 2r+1
        (Augmentation("translation", 2, 1.0), 9),  # 4d+1
        (Augmentation("mirror_shift", 1, 1.0), 18),
        (Augmentation("noise", 9, 0.05), 10),
    ],
)
def test_augmentations_of_an_image(
    models: dict[str, ServedModel], augmentation: Augmentation, count: int
) -> None:
    model = models["digits"]
    image = model.members[0]
    variants = augmentation.variants(image, model, np.random.default_rng(2))
    assert variants.shape == (count, 64)
    assert augmentation.count == count
    np.testing.assert_array_equal(variants[0], image)
    assert len({row.tobytes() for row in variants}) == count
    assert np.all((variants >= 0) & (variants <= 16))
    if augmentation.name == "translation":
        ink = image.reshape(8, 8)
        shifted = variants[1:].reshape(-1, 8, 8)
        # Moving by two pixels keeps the ink that stays on the canvas: total ink never grows.
        assert np.all(shifted.sum(axis=(1, 2)) <= ink.sum())


@pytest.mark.parametrize("round_rows", [1, 16])
def test_augmentation_in_rounds_sends_each_copy_of_every_candidate_before_the_next(
    models: dict[str, ServedModel], round_rows: int
) -> None:
    model = models["credit-risk"]
    candidates = Candidates.draw(model, np.random.default_rng(4), 40, 0.5)
    augmentation = Augmentation("noise", 3, 0.05)
    probes = Augment(candidates, augmentation, False, batched=False, round_rows=round_rows)
    requests = list(probes.requests(model, np.random.default_rng(5)))
    assert len(requests) == probes.planned_requests(model) == 4 * math.ceil(40 / round_rows)
    assert max(len(request.rows) for request in requests) == round_rows
    rows = np.concatenate([request.rows for request in requests]).reshape(4, 40, -1)  # [copy, candidate]
    np.testing.assert_array_equal(rows[0], candidates.rows)  # the first round: the candidates themselves
    for copy in rows[1:]:  # each later round: a copy of every candidate, in the candidates' order
        nearest = np.linalg.norm((copy[:, None] - candidates.rows[None]) / model.std, axis=2).argmin(axis=1)
        np.testing.assert_array_equal(nearest, np.arange(40))
    assert sum(request.candidates for request in requests) == 40
    assert sum(request.member_candidates for request in requests) == int(candidates.members.sum())


def test_boundary_walk_converges_and_measures_a_larger_distance_for_members(
    models: dict[str, ServedModel],
) -> None:
    model = models["digits"]
    rng = np.random.default_rng(3)
    candidates = Candidates.draw(model, rng, 8, 0.5)
    span = np.maximum(model.upper - model.lower, 1.0)
    final_distance: dict[bool, list[float]] = {True: [], False: []}
    for row, member in zip(candidates.rows, candidates.members, strict=True):
        walk = BoundaryWalk(Candidates(row[None], np.array([member])), 10, 30, 200, batched=False)
        requests = list(walk.requests(model, rng))
        assert 300 <= len(requests) <= 3_000
        distance = np.array([np.linalg.norm((request.rows[0] - row) / span) for request in requests])
        labels = np.array([request.probabilities.argmax() for request in requests])
        early, late = distance[1:60], distance[-60:]
        assert np.median(late) < np.median(early)
        # The walk ends on the boundary: the last probes straddle it.
        assert np.any(labels[-60:] != labels[0]) and np.any(labels[-60:] == labels[0])
        final_distance[bool(member)].append(float(np.median(late)))
    # Li & Zhang's label-only signal: training rows sit farther from the decision boundary.
    assert np.mean(final_distance[True]) > np.mean(final_distance[False])


@pytest.mark.parametrize("batched", [False, True])
def test_planned_requests_of_a_walk_match_what_it_sends(
    models: dict[str, ServedModel], batched: bool
) -> None:
    # Slow attackers spread their planned requests over hours: the plan must be close to what is sent.
    model = models["credit-risk"]
    rng = np.random.default_rng(6)
    walk = BoundaryWalk(Candidates.draw(model, rng, 4, 0.5), 8, 20, 200, batched=batched)
    sent = sum(1 for _ in walk.requests(model, rng))
    assert abs(walk.planned_requests(model) - sent) <= 0.15 * sent


@pytest.mark.parametrize("want_probabilities", [False, True])
def test_a_walk_asks_what_its_api_answers_and_walks_alike(
    models: dict[str, ServedModel], want_probabilities: bool
) -> None:
    model = models["credit-risk"]
    candidates = Candidates.draw(model, np.random.default_rng(8), 2, 0.5)
    walk = BoundaryWalk(candidates, 6, 20, 200, batched=False, want_probabilities=want_probabilities)
    requests = list(walk.requests(model, np.random.default_rng(9)))
    assert {request.want_probabilities for request in requests} == {want_probabilities}
    label_only = BoundaryWalk(candidates, 6, 20, 200, batched=False)
    same_rows = [request.rows for request in label_only.requests(model, np.random.default_rng(9))]
    assert len(same_rows) == len(requests)
    assert all(np.array_equal(a, b.rows) for a, b in zip(same_rows, requests, strict=True))


def test_retry_storms_are_exact_repeats_seconds_apart(models: dict[str, ServedModel]) -> None:
    app = SteadyApp(peak_per_hour=100, want_probabilities=True, storm_share=1.0)
    window = Window(START, START + HOUR, diurnal=False)
    requests = list(app.requests(models["credit-risk"], np.random.default_rng(4), window))
    assert [request.at for request in requests] == sorted(request.at for request in requests)
    runs, current = [], 1
    for before, after in itertools.pairwise(requests):
        if after.rows is before.rows:
            assert after.at - before.at <= 1.0
            current += 1
        else:
            runs.append(current)
            current = 1
    assert min(runs) >= 4 and max(runs) <= 21


def test_activity_follows_the_time_of_day(models: dict[str, ServedModel]) -> None:
    day = Window(START, START + 24 * HOUR, diurnal=True)
    hours = np.array([(moment - START) // HOUR for moment in day.arrivals(np.random.default_rng(5), 1_000)])
    assert (hours == 14).sum() > 5 * (hours == 2).sum()


# -- scenario plans (no traffic generated) -----------------------------------------------------------------


def test_standard_plan_has_hundreds_of_benign_clients_and_5_to_10_attackers_per_kind(
    models: dict[str, ServedModel],
) -> None:
    clients = plan(SCENARIOS["standard"], models, SEED)
    assert 200 <= sum(client.role == "benign" for client in clients) <= 500
    for kind in AttackKind:
        assert 5 <= sum(client.kind is kind for client in clients) <= 10
    assert len({client.identity.client_id for client in clients}) == len(clients)


def test_evasive_plan_has_at_least_10_attackers_of_each_evasion_style(models: dict[str, ServedModel]) -> None:
    clients = plan(SCENARIOS["evasive"], models, SEED)
    for style in set(Evasion) - {Evasion.COMPROMISED}:
        assert sum(style.value in client.evasion for client in clients) >= 10, style
    compromised = [client for client in clients if Evasion.COMPROMISED.value in client.evasion]
    assert sorted(str(client.kind) for client in compromised) == sorted(
        str(kind)
        for kind in AttackKind
        for _ in range(2)  # two campaigns of one key each
    )
    assert all(client.in_baseline and client.ordinary is not None for client in compromised)
    campaigns: dict[str, list[str]] = defaultdict(list)
    for client in clients:
        if Evasion.SYBIL.value in client.evasion and client.campaign:
            campaigns[client.campaign].append(client.identity.client_id)
    assert campaigns and all(3 <= len(keys) <= 10 for keys in campaigns.values())


def test_a_compromised_key_sends_its_owners_traffic_all_along_and_attacks_late(
    models: dict[str, ServedModel], tmp_path: Path
) -> None:
    clients = plan(SCENARIOS["evasive"], models, SEED)
    client = next(
        client
        for client in clients
        if Evasion.COMPROMISED.value in client.evasion and client.kind is AttackKind.AUGMENTATION_PROBING
    )
    # As the simulator writes its periods: the baseline day, then the main one.
    [baseline] = _write_period(
        tmp_path / "baseline.jsonl",
        [client],
        models,
        Window(START - DAY, START, diurnal=True),
        6,
        baseline=True,
    )
    assert baseline.queries >= 1_000 and baseline.attack_queries == 0
    [day] = _write_period(
        tmp_path / "events.jsonl",
        [client],
        models,
        Window(START, START + DAY, diurnal=True),
        6,
        baseline=False,
    )
    assert day.attack_queries > 0 and day.attack_start_ms is not None
    assert day.attack_start_ms >= (START + DAY / 2) * 1000
    decoded, _ = decode_file(tmp_path / "events.jsonl")
    ordinary = sum(len(queries) for queries in decoded if queries[0].timestamp * 1000 < day.attack_start_ms)
    assert ordinary >= 1_000  # the owner's own queries before the attack


@pytest.mark.slow
def test_standard_day_volume_and_generation_time(tmp_path: Path) -> None:
    began = time.process_time()
    summary = simulate("standard", SEED, tmp_path)
    # About 30 CPU-seconds on the reference machine; CPU time, as wall time depends on the machine's load.
    assert time.process_time() - began < 90
    assert 300_000 <= summary.queries <= 600_000
    metadata = orjson.loads((tmp_path / "scenario.json").read_bytes())
    for kind in AttackKind:
        assert 5 <= metadata["attacks"][kind.value]["attackers"] <= 10
    assert 0.4 <= summary.member_share[AttackKind.CONFIDENCE_HARVESTING] <= 0.6
    assert summary.member_share[AttackKind.TRAINING_SET_TARGETING] >= 0.8
