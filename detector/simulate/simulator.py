"""`simulate`: generate a scenario's query logs, ground truth and metadata into a directory.

Each client's traffic is a time-ordered stream with its own random generator (seeded by the population,
which is the simulation seed unless another is asked for, the period and the client's position in the
plan); the streams are merged by timestamp with
`heapq.merge` and written line by line, so memory stays bounded by the number of clients, and the output
is the same, byte for byte, for the same scenario and seed.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from detector.simulate.attacks import AttackKind
from detector.simulate.models import ServedModel, load_models
from detector.simulate.scenarios import SCENARIOS, Client, Scenario, plan
from detector.simulate.traffic import Behaviour, Window, encode, rfc3339

START = datetime(2026, 11, 29, tzinfo=UTC).timestamp()
"""The simulated clock's start: the main period begins here, the baseline period ends here."""

EVENTS = "events.jsonl"
BASELINE = "baseline.jsonl"
TRUTH = "truth.jsonl"
METADATA = "scenario.json"


def training_file(model: str) -> str:
    """The name of the file holding `model`'s training rows (float32, [N, D])."""
    return f"training-{model}.npy"


@dataclass(frozen=True, slots=True)
class SimulationSummary:
    """What `simulate` wrote: counts of records (requests) and queries (rows), clients with traffic in the
    main period, and per attack kind the share of candidates that are training rows."""

    scenario: str
    seed: int
    out: Path
    records: int
    queries: int
    baseline_records: int
    baseline_queries: int
    clients: int
    attackers: int
    member_share: dict[str, float]
    seconds: float


@dataclass(slots=True)
class _Tally:
    """What one client sent in one period."""

    records: int = 0
    queries: int = 0
    attack_queries: int = 0
    attack_start_ms: int | None = None
    candidates: int = 0
    member_candidates: int = 0


def simulate(
    scenario: str,
    seed: int,
    out: Path,
    *,
    baseline_hours: float | None = None,
    population: int | None = None,
) -> SimulationSummary:
    """Generate `scenario` (a key of `SCENARIOS`) with `seed` into the directory `out` (created if needed).

    Writes `events.jsonl` (the main period's query logs, by timestamp), `baseline.jsonl` (attack-free
    traffic of the same clients over the `baseline_hours` just before, by default as long as the main
    period), `truth.jsonl` (one line per client in events.jsonl), `training-<model>.npy` per model and
    `scenario.json` (metadata and counts). The served models come from `seed`; the clients and their traffic
    from `population` (default: `seed`), so that another population can use the same models. Raises
    `ValueError` for an unknown scenario, a negative seed or population, or a baseline that is not positive.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")
    population = seed if population is None else population
    if seed < 0 or population < 0:
        raise ValueError(f"the seed and population must be 0 or more, not {seed} and {population}")
    spec = SCENARIOS[scenario]
    baseline_seconds = spec.duration if baseline_hours is None else baseline_hours * 3600.0
    if not (baseline_seconds > 0 and math.isfinite(baseline_seconds)):
        raise ValueError(f"the baseline must last a positive number of hours, not {baseline_hours}")
    began = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    models = load_models(seed)
    clients = plan(spec, models, population)
    window = Window(START, START + spec.duration, spec.diurnal)
    baseline_window = Window(START - baseline_seconds, START, spec.diurnal)

    baseline = _write_period(out / BASELINE, clients, models, baseline_window, population, baseline=True)
    events = _write_period(out / EVENTS, clients, models, window, population, baseline=False)
    for name, model in models.items():
        np.save(out / training_file(name), model.members.astype(np.float32))
    active = [(client, tally) for client, tally in zip(clients, events, strict=True) if tally.records]
    _write_truth(out / TRUTH, active)
    metadata = _metadata(spec, seed, population, models, window, baseline_window, clients, events, baseline)
    (out / METADATA).write_bytes(
        orjson.dumps(metadata, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    )
    return SimulationSummary(
        scenario=scenario,
        seed=seed,
        out=out,
        records=metadata["events"]["records"],
        queries=metadata["events"]["queries"],
        baseline_records=metadata["baseline_traffic"]["records"],
        baseline_queries=metadata["baseline_traffic"]["queries"],
        clients=len(active),
        attackers=sum(client.kind is not None for client, _ in active),
        member_share={kind: summary["member_share"] for kind, summary in metadata["attacks"].items()},
        seconds=time.perf_counter() - began,
    )


def _write_period(
    path: Path,
    clients: Sequence[Client],
    models: Mapping[str, ServedModel],
    window: Window,
    seed: int,
    *,
    baseline: bool,
) -> list[_Tally]:
    """Write the merged traffic of `clients` in `window` to `path`; return one tally per client."""
    tallies = [_Tally() for _ in clients]
    streams = [
        _lines(
            client,
            client.behaviour_in(baseline),
            models[client.model],
            window,
            np.random.default_rng([seed, int(baseline), index]),
            tally,
        )
        for index, (client, tally) in enumerate(zip(clients, tallies, strict=True))
        if client.in_baseline or not baseline
    ]
    with path.open("wb") as sink:
        for _, line in heapq.merge(*streams, key=itemgetter(0)):
            sink.write(line)
    return tallies


def _lines(
    client: Client,
    behaviour: Behaviour,
    model: ServedModel,
    window: Window,
    rng: np.random.Generator,
    tally: _Tally,
) -> Iterator[tuple[int, bytes]]:
    """The records `behaviour` (the client's in `window`) sends as (epoch milliseconds, JSON line),
    counted into `tally`."""
    noise = random.Random(int(rng.integers(2**63)))
    end_ms = math.floor(window.end * 1000)
    last_ms = math.ceil(window.start * 1000)
    for request in behaviour.requests(model, rng, window):
        # Behaviours yield non-decreasing times; millisecond rounding must not reorder them.
        epoch_ms = max(last_ms, round(request.at * 1000))
        if epoch_ms >= end_ms:
            return
        last_ms = epoch_ms
        rows = len(request.rows)
        tally.records += 1
        tally.queries += rows
        if request.attack:
            tally.attack_queries += rows
            if tally.attack_start_ms is None:
                tally.attack_start_ms = epoch_ms
            tally.candidates += request.candidates
            tally.member_candidates += request.member_candidates
        yield epoch_ms, encode(request, epoch_ms, client.identity, model, noise) + b"\n"


def _write_truth(path: Path, active: Sequence[tuple[Client, _Tally]]) -> None:
    with path.open("wb") as sink:
        for client, tally in sorted(active, key=lambda pair: pair[0].identity.client_id):
            line = {
                "client_id": client.identity.client_id,
                "role": client.role,
                "population": client.population,
                "kind": None if client.kind is None else client.kind.value,
                "campaign": client.campaign,
                "model": client.model,
                "attack_start": None if tally.attack_start_ms is None else rfc3339(tally.attack_start_ms),
                "attack_queries": tally.attack_queries,
                "evasion": list(client.evasion),
            }
            sink.write(orjson.dumps(line) + b"\n")


def _metadata(
    spec: Scenario,
    seed: int,
    population: int,
    models: Mapping[str, ServedModel],
    window: Window,
    baseline_window: Window,
    clients: Sequence[Client],
    events: Sequence[_Tally],
    baseline: Sequence[_Tally],
) -> dict[str, Any]:
    attacks: dict[str, Any] = {}
    for kind in AttackKind:
        mine = [(client, tally) for client, tally in zip(clients, events, strict=True) if client.kind is kind]
        candidates = sum(tally.candidates for _, tally in mine)
        members = sum(tally.member_candidates for _, tally in mine)
        attacks[kind.value] = {
            "attackers": sum(bool(tally.records) for _, tally in mine),
            "campaigns": len({client.campaign for client, tally in mine if tally.records}),
            "attack_queries": sum(tally.attack_queries for _, tally in mine),
            "candidates": candidates,
            "member_candidates": members,
            "member_share": round(members / candidates, 4) if candidates else 0.0,
        }
    evasion = Counter(
        style
        for client, tally in zip(clients, events, strict=True)
        if tally.records
        for style in client.evasion
    )
    return {
        "scenario": spec.name,
        "description": spec.description,
        "seed": seed,
        "population": population,
        "start": rfc3339(round(window.start * 1000)),
        "end": rfc3339(round(window.end * 1000)),
        "baseline": {
            "start": rfc3339(round(baseline_window.start * 1000)),
            "end": rfc3339(round(baseline_window.end * 1000)),
        },
        "models": {name: model.describe() for name, model in models.items()},
        "events": _traffic(clients, events),
        "baseline_traffic": _traffic(clients, baseline),
        "attacks": attacks,
        "evasion": dict(sorted(evasion.items())),
        "files": {
            "events": EVENTS,
            "baseline": BASELINE,
            "truth": TRUTH,
            "training": {name: training_file(name) for name in models},
        },
    }


def _traffic(clients: Sequence[Client], tallies: Sequence[_Tally]) -> dict[str, Any]:
    """Records, queries and clients with traffic, in total and per population."""
    populations: dict[str, dict[str, int]] = {}
    for client, tally in zip(clients, tallies, strict=True):
        if not tally.records:
            continue
        counts = populations.setdefault(client.population, {"clients": 0, "records": 0, "queries": 0})
        counts["clients"] += 1
        counts["records"] += tally.records
        counts["queries"] += tally.queries
    return {
        "records": sum(counts["records"] for counts in populations.values()),
        "queries": sum(counts["queries"] for counts in populations.values()),
        "clients": sum(counts["clients"] for counts in populations.values()),
        "populations": populations,
    }
