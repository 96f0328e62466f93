"""What storing and restoring one client's features costs, beside the same state as JSON in the same run.

Every commit writes the state of every client that sent queries since the last one
(`ClientFeatures.to_bytes`), and a client not in memory is read back before its next query
(`ClientFeatures.from_bytes`): after a restart,
a rebalance, an eviction or an idle spell. Measured for one key of the sample load at 10, 50, 200 and 1,000
queries (its clusters bounded at 256): bytes, write and read times (best of three rounds), against the state
written as JSON by orjson (columns as lists of numbers) and read back from it.

Run: `python benchmarks/client_state.py [--json]`. With `--json` the last line is one JSON object:
`state_bytes_at_200_queries`, `state_write_us_at_200_queries`, `state_read_us_at_200_queries` and the JSON
baseline's `json_bytes_at_200_queries`, `json_write_us_at_200_queries`, `json_read_us_at_200_queries`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path

import orjson

from detector.features.client import ClientFeatures
from detector.features.embedding import Observation, QueryEmbedder
from detector.service import decoded_batches
from detector.settings import load_settings
from detector.simulate.sample import write_sample

HISTORIES = (10, 50, 200, 1_000)


def busiest_key_observations() -> list[Observation]:
    """The observations of the sample load's busiest (model, client) key, in order."""
    with tempfile.TemporaryDirectory() as directory:
        events = Path(directory) / "events.jsonl"
        write_sample(events, clients=5, events=6_000)
        settings = load_settings(None, database={"url": "sqlite://"}, metrics={"addr": ""})
        queries = [query for batch in decoded_batches(settings, [str(events)]) for query in batch]
    by_key: dict[tuple[str, str], list[Observation]] = {}
    for observation in QueryEmbedder().observe(queries):
        by_key.setdefault((observation.query.model, observation.query.client_id), []).append(observation)
    return max(by_key.values(), key=len)


def microseconds(work: Callable[[], object], number: int = 200) -> float:
    """The best of three rounds of `number` calls of `work`, µs a call."""
    return min(timeit.repeat(work, number=number, repeat=3)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()
    observations = busiest_key_observations()
    if len(observations) < HISTORIES[-1]:
        sys.exit(f"the sample's busiest key has {len(observations)} queries, fewer than {HISTORIES[-1]}")
    client, fed = ClientFeatures(), 0
    figures: dict[str, float] = {}
    print("one client's stored state: bytes (`state_bytes`) against JSON (orjson, columns as lists)")
    columns = f"{'write µs':>9} {'read µs':>8}"
    print(f"{'queries':>8} {'clusters':>8} | {'bytes':>7} {columns} | {'JSON':>7} {columns}")
    for queries in HISTORIES:
        for observation in observations[fed:queries]:
            client.update(observation)
        fed = queries
        stored = client.to_bytes()
        as_json = orjson.dumps(client.state(), option=orjson.OPT_SERIALIZE_NUMPY)
        write = microseconds(client.to_bytes)
        read = microseconds(lambda stored=stored: ClientFeatures.from_bytes(stored))
        json_write = microseconds(lambda: orjson.dumps(client.state(), option=orjson.OPT_SERIALIZE_NUMPY))
        json_read = microseconds(lambda as_json=as_json: ClientFeatures.from_bytes(as_json))
        print(
            f"{queries:>8} {len(client.clusters):>8} | {len(stored):>7,} {write:>9.0f} {read:>8.0f} "
            f"| {len(as_json):>7,} {json_write:>9.0f} {json_read:>8.0f}"
        )
        if queries == 200:
            figures = {
                "state_bytes_at_200_queries": len(stored),
                "state_write_us_at_200_queries": round(write, 1),
                "state_read_us_at_200_queries": round(read, 1),
                "json_bytes_at_200_queries": len(as_json),
                "json_write_us_at_200_queries": round(json_write, 1),
                "json_read_us_at_200_queries": round(json_read, 1),
            }
    ratios = {
        name: figures[f"json_{name}_at_200_queries"] / figures[f"state_{name}_at_200_queries"]
        for name in ("bytes", "write_us", "read_us")
    }
    print(
        f"ratio at 200 queries, JSON / bytes: size {ratios['bytes']:.2f}, write {ratios['write_us']:.2f}, "
        f"read {ratios['read_us']:.2f}"
    )
    if args.json:
        sys.stdout.write(orjson.dumps(figures).decode() + "\n")


if __name__ == "__main__":
    main()
