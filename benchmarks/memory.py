"""Memory held per active client, beside a baseline measured in the same run.

What the daemon keeps in memory for a client (its session and its streaming features: record clusters,
fingerprints, counters) against what keeping the client's decoded queries would cost (the naive way to look
back at a client's history). The detector's state is bounded per client; the history grows with traffic.

Then the resident memory of a process holding `--rss-clients` active clients (100,000 by default): the
clients of the load, each copied (sessions and features) under new client ids until there are that many,
held by the daemon's own trackers; beside it, the same process before any client.

Load: single-row OIP v2 records of 30 features with a probability response, spread over the clients.
Run: `python benchmarks/memory.py [--clients N] [--events N] [--rss-clients N] [--json]`. With `--json` the
last line is one JSON object: `kib_per_active_client` (the detector's state), `kib_per_idle_client` (the
same clients once idle: their features stored, out of memory), `kib_per_client_query_history`
(the baseline), `queries_per_client` they were measured at (200 by default: 100,000 events over 500 clients),
`rss_mib_100k_clients` (the RSS at `--rss-clients`, scaled to 100,000 when another count was asked) and
`rss_mib_no_clients`.
"""

from __future__ import annotations

import argparse
import copy
import gc
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from detector.domain import Origin, Query, RawRecord
from detector.ingest.jsonl import read_jsonl_batches
from detector.metrics import Metrics
from detector.service import build_pipeline, decoded_batches
from detector.settings import Settings, load_settings
from detector.simulate.sample import START, oip_record, write_sample
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


def detector_state(settings: Settings, events: Path, *, idle: bool = False) -> Callable[[], object]:
    """What the daemon keeps once it read `events`; with `idle`, once the stream's event time moved on
    three hours past the load (one more record, of another client) and the load's clients went idle."""

    def build() -> object:
        store = open_store(settings)
        pipeline = build_pipeline(settings, store, Metrics())
        for batch in read_jsonl_batches([str(events)], settings.kafka.max_poll_records):
            pipeline.submit(batch)
        pipeline.commit()
        if idle:
            later = oip_record("later", START + 3 * 3600.0, "later", np.ones((1, 30)), np.ones((1, 2)) / 2)
            origin = Origin("file", "later", 0, 0)
            pipeline.submit([RawRecord(orjson.dumps(later), None, origin, time.time())])
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


def rss_mib() -> float:
    """This process's resident set size, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def hold_clients(count: int, clients: int, events: int) -> None:
    """Print (as JSON) this process's RSS before and once its trackers hold `count` active clients: those of
    a load of `events` records over `clients` clients, copied under new client ids."""
    with tempfile.TemporaryDirectory() as directory:
        load = Path(directory) / "events.jsonl"
        write_sample(load, clients=clients, events=events)
        settings = load_settings(
            None,
            database={"url": f"sqlite:///{Path(directory) / 'bench.db'}"},
            metrics={"addr": ""},
            commit={"min_records": 20_000},
            detection={"max_clients": 4 * count},
            sessions={"max_active": 4 * count},
        )
        store = open_store(settings)
        pipeline = build_pipeline(settings, store, Metrics())
        gc.collect()
        empty = rss_mib()
        for batch in read_jsonl_batches([str(load)], settings.kafka.max_poll_records):
            pipeline.submit(batch)
        pipeline.commit()
        store.close()
    tracker, sessions = pipeline.detect.tracker, pipeline.sessions
    templates: dict[str, list[tuple[tuple[str, str], Any, Any]]] = {}
    for key, features in list(tracker._clients.items()):
        templates.setdefault(key[1], []).append((key, features, sessions._active.get(key)))
    names = sorted(templates)
    for index in range(count - len(names)):
        for (model, client), features, session in templates[names[index % len(names)]]:
            key = (model, f"{client}~{index}")
            tracker._clients[key] = copy.deepcopy(features)
            if session is not None:  # its last session may have closed within the load
                copied = copy.deepcopy(session)
                copied.client_id = key[1]
                sessions._active[key] = copied
    gc.collect()
    held = {len({client for _, client in tracker._clients}), len(tracker._clients)}
    sys.stdout.write(orjson.dumps({"empty": empty, "held": rss_mib(), "clients": min(held)}).decode() + "\n")


def measure_rss(count: int) -> tuple[float, float]:
    """(RSS MiB without clients, RSS MiB holding `count` clients of 200 queries), in a fresh process."""
    measured = subprocess.run(  # noqa: S603 - this very script, with a number
        [sys.executable, __file__, "--hold-clients", str(count)],
        capture_output=True,
        text=True,
        check=True,
    )
    figures = orjson.loads(measured.stdout.strip().splitlines()[-1])
    return figures["empty"], figures["held"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rss-clients", type=int, default=100_000, help="0 skips the RSS measure")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    parser.add_argument("--hold-clients", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hold_clients:
        hold_clients(args.hold_clients, clients=500, events=100_000)
        return
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
        idle, _ = held_bytes(detector_state(settings, events, idle=True))
        history, _ = held_bytes(query_history(settings, events))
    print(f"  baseline: the clients' decoded queries   {history / args.clients / 1024:8.1f} KiB per client")
    print(f"  detector: sessions + streaming features  {state / args.clients / 1024:8.1f} KiB per client")
    print(f"  ratio detector / query history: {state / history:.2f}   (the state is bounded per client)")
    print(f"  the same clients once idle (stored)      {idle / args.clients / 1024:8.1f} KiB per client")
    figures: dict[str, float] = {
        "kib_per_active_client": round(state / args.clients / 1024, 1),
        "kib_per_idle_client": round(idle / args.clients / 1024, 2),
        "kib_per_client_query_history": round(history / args.clients / 1024, 1),
        "queries_per_client": each,
    }
    if args.rss_clients:
        print(f"resident memory of a process holding {args.rss_clients:,} active clients of 200 queries")
        empty, held = measure_rss(args.rss_clients)
        scaled = empty + (held - empty) * 100_000 / args.rss_clients
        print(f"  baseline: the daemon's process, no client   {empty:8.0f} MiB")
        print(f"  detector: {args.rss_clients:>7,} active clients          {held:8.0f} MiB   (aim: ≤ 2,048)")
        figures |= {"rss_mib_100k_clients": round(scaled, 1), "rss_mib_no_clients": round(empty, 1)}
    if args.json:
        sys.stdout.write(orjson.dumps(figures).decode() + "\n")


if __name__ == "__main__":
    main()
