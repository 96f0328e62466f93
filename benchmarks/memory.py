"""Memory held per active client, beside a baseline measured in the same run.

What the daemon keeps in memory for a client (its session and its streaming features: record clusters,
fingerprints, counters) against what keeping the client's decoded queries would cost (the naive way to look
back at a client's history). The detector's state is bounded per client; the history grows with traffic.

Load: single-row OIP v2 records of 30 features with a probability response, spread over the clients.
Run: `python benchmarks/memory.py [--clients N] [--events N] [--json]`. With `--json` the last line is one
JSON object: `kib_per_active_client` (the detector's state), `kib_per_client_query_history` (the baseline)
and `queries_per_client` they were measured at (`--clients 500` gives 200 queries a client).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import orjson

from detector.domain import Query
from detector.ingest.jsonl import read_jsonl_batches
from detector.metrics import Metrics
from detector.service import build_pipeline, decoded_batches
from detector.settings import Settings, load_settings
from detector.simulate.sample import write_sample
from detector.storage import open_store


def held_bytes(build: Callable[[], object]) -> tuple[int, object]:
    """The bytes still allocated once `build` returned (what its result keeps alive), and the result."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = build()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return after - before, kept


def detector_state(settings: Settings, events: Path) -> Callable[[], object]:
    def build() -> object:
        store = open_store(settings)
        pipeline = build_pipeline(settings, store, Metrics())
        for batch in read_jsonl_batches([str(events)], settings.kafka.max_poll_records):
            pipeline.submit(batch)
        pipeline.commit()
        store.close()
        return pipeline  # its session tracker and feature tracker: the state kept per client

    return build


def query_history(settings: Settings, events: Path) -> Callable[[], object]:
    def build() -> object:
        history: list[Query] = []
        for batch in decoded_batches(settings, [str(events)]):
            history.extend(batch)
        return history

    return build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2_000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        events = Path(directory) / "events.jsonl"
        write_sample(events, clients=args.clients, events=args.events)
        settings = load_settings(
            None,
            database={"url": f"sqlite:///{Path(directory) / 'bench.db'}"},
            metrics={"addr": ""},
            commit={"min_records": 20_000},
        )
        each = args.events // args.clients
        print(f"load: {args.events} single-row records of 30 features, {args.clients} clients, {each} each")
        state, _ = held_bytes(detector_state(settings, events))
        history, _ = held_bytes(query_history(settings, events))
    print(f"  baseline: the clients' decoded queries   {history / args.clients / 1024:8.1f} KiB per client")
    print(f"  detector: sessions + streaming features  {state / args.clients / 1024:8.1f} KiB per client")
    print(f"  ratio detector / query history: {state / history:.2f}   (the state is bounded per client)")
    if args.json:
        figures = {
            "kib_per_active_client": round(state / args.clients / 1024, 1),
            "kib_per_client_query_history": round(history / args.clients / 1024, 1),
            "queries_per_client": each,
        }
        sys.stdout.write(orjson.dumps(figures).decode() + "\n")


if __name__ == "__main__":
    main()
