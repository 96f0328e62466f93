"""Throughput of the ingest path, each figure beside a baseline measured in the same run.

(a) replay from a JSON Lines file vs. JSON decoding alone (orjson over the same lines);
(b) the daemon consuming from the embedded broker vs. raw consumption with the same Kafka client and settings,
    for kafka-python and, when it is installed, confluent-kafka (`MIA_KAFKA_CLIENT=confluent`);
(c) what detection (streaming features + rules) costs per query, against the rest of the replay path.

Load: single-row OIP v2 records of 30 features with a probability response (~1 KB each).
Run: `python benchmarks/throughput.py [--events N] [--json]` (`make bench`). With `--json` the last line is
one JSON object of the figures (rates per second): `replay_queries_per_s`, `json_decode_records_per_s`,
`detection_queries_per_s`, `kafka_daemon_records_per_s`, `kafka_raw_records_per_s` and, with confluent-kafka,
`kafka_confluent_records_per_s` (the daemon on it) and `kafka_confluent_raw_records_per_s`.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson
from kafka import KafkaConsumer
from pydantic import SecretStr

from detector.broker import EmbeddedBroker
from detector.domain import Origin, RawRecord
from detector.kafka import client_options
from detector.pipeline import Batch
from detector.service import StopFlag, build_detection, decoded_batches, produce_file, replay, run_daemon
from detector.settings import Settings, load_settings
from detector.simulate.sample import write_sample


def timed(work: Callable[[], int]) -> tuple[int, float, float]:
    """Run `work` (returning a count); return the count, wall seconds and CPU seconds of this process."""
    wall, cpu = time.perf_counter(), time.process_time()
    count = work()
    return count, time.perf_counter() - wall, time.process_time() - cpu


def report(name: str, count: int, wall: float, cpu: float, unit: str = "records") -> float:
    rate = count / wall
    cpu_us = cpu / count * 1e6
    print(f"  {name:<38} {count:>8} {unit} {wall:7.2f} s  {rate:>10,.0f} {unit}/s  {cpu_us:6.1f} CPU-µs each")
    return rate


Figures = dict[str, float]


def bench_detection(events: Path, settings: Settings, replay_seconds_per_query: float) -> float:
    """Time the detection step alone on already decoded queries, in the replay's batches."""
    origin = RawRecord(b"", None, Origin("file", str(events), 0, 0), 0.0)  # what detection never reads
    batches = [[(origin, [query]) for query in batch] for batch in decoded_batches(settings, [str(events)])]
    detect = build_detection(settings)
    queries = sum(len(batch) for batch in batches)

    def detection() -> int:
        for fresh in batches:
            detect.process(Batch([], fresh=fresh))
        detect.judge(None)
        return queries

    print("(c) detection: streaming features + rules (+ coordination), no model loaded")
    count, wall, cpu = timed(detection)
    rate = report("detection step alone", count, wall, cpu, unit="queries")
    per_query = wall / count
    rest = replay_seconds_per_query - per_query
    ratio = per_query / rest
    print(f"  detection adds {ratio:.2f} of the rest of the replay path's cost per query   (aim: ≤ 0.5)")
    return rate


def bench_replay(events: Path, settings: Settings) -> tuple[float, float]:
    """(JSON decode records/s, replay queries/s)."""

    def decode_only() -> int:
        count = 0
        with events.open("rb") as lines:
            for line in lines:
                orjson.loads(line)
                count += 1
        return count

    def full_replay() -> int:
        return replay(settings, [str(events)]).queries

    print("(a) replay from a file")
    baseline = report("baseline: orjson.loads of each line", *timed(decode_only))
    replayed = report("replay: decode+sessions+detect+commit", *timed(full_replay), unit="queries")
    print(f"  ratio replay / JSON decode: {replayed / baseline:.2f}   (aim: ≥ 25,000 queries/s)")
    return baseline, replayed


def bench_kafka(events: Path, total: int, workdir: Path) -> Figures:
    """Raw and daemon records/s for kafka-python and, when installed, confluent-kafka."""

    with EmbeddedBroker() as broker:
        settings = load_settings(
            None,
            kafka={
                "bootstrap_servers": broker.bootstrap_servers,
                "topics": ["bench"],
                "session_timeout_ms": 6000,
            },
        )
        produce_file(settings, events, "bench")
        kafka = settings.kafka

        def raw_kafka_python() -> int:
            consumer = KafkaConsumer(
                "bench",
                **client_options(kafka),
                group_id="bench-raw",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                session_timeout_ms=kafka.session_timeout_ms,
                max_poll_records=kafka.max_poll_records,
                fetch_max_bytes=kafka.fetch_max_bytes,
                max_partition_fetch_bytes=kafka.max_partition_fetch_bytes,
                fetch_min_bytes=kafka.fetch_min_bytes,
                fetch_max_wait_ms=kafka.fetch_max_wait_ms,
            )
            count = 0
            while count < total:
                for messages in consumer.poll(
                    timeout_ms=kafka.poll_timeout_ms, max_records=kafka.max_poll_records
                ).values():
                    count += len(messages)
            consumer.close()
            return count

        def raw_confluent() -> int:
            from confluent_kafka import Consumer

            from detector.kafka.confluent import consumer_config

            consumer = Consumer(consumer_config(kafka, "bench-raw-confluent"))
            consumer.subscribe(["bench"])
            count = 0
            while count < total:
                messages = consumer.consume(kafka.max_poll_records, kafka.poll_timeout_ms / 1000)
                count += sum(1 for message in messages if message.error() is None)
            consumer.close()
            return count

        def daemon(client: str) -> Callable[[], int]:
            # A database each: the second daemon would otherwise find every event already processed.
            daemon_settings = settings.model_copy(
                update={
                    "kafka": kafka.model_copy(update={"client": client}),
                    "database": settings.database.model_copy(
                        update={"url": SecretStr(f"sqlite:///{workdir / f'{client}.db'}")}
                    ),
                }
            )

            def run() -> int:
                stop = StopFlag()
                seen = 0

                def progress(records: list[RawRecord]) -> None:
                    nonlocal seen
                    seen += len(records)
                    if seen >= total:
                        stop.set()

                return run_daemon(
                    daemon_settings, stop, group_id=f"bench-daemon-{client}", progress=progress
                ).records

            return run

        print("(b) consuming from the embedded broker (group join included in each)")
        figures: Figures = {}
        raw = figures["kafka_raw_records_per_s"] = report(
            "baseline: kafka-python poll only", *timed(raw_kafka_python)
        )
        consumed = figures["kafka_daemon_records_per_s"] = report(
            "daemon on kafka-python: poll+…+commit", *timed(daemon("kafka-python"))
        )
        print(f"  ratio daemon / raw consumption: {consumed / raw:.2f}   (aim: ≥ 0.6)")
        if importlib.util.find_spec("confluent_kafka") is None:
            print("  confluent-kafka is not installed: pip install 'mia-detector[confluent]' to compare")
            return figures
        raw_fast = figures["kafka_confluent_raw_records_per_s"] = report(
            "baseline: confluent-kafka consume only", *timed(raw_confluent)
        )
        fast = figures["kafka_confluent_records_per_s"] = report(
            "daemon on confluent-kafka: poll+…+commit", *timed(daemon("confluent"))
        )
        print(f"  ratio daemon on confluent-kafka / raw confluent-kafka: {fast / raw_fast:.2f}")
        print(f"  ratio daemon on confluent-kafka / on kafka-python: {fast / consumed:.2f}   (aim: ≥ 3)")
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="records in the load (default 100k)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mia-bench-") as tmp:
        workdir = Path(tmp)
        events = workdir / "events.jsonl"
        write_sample(events, clients=2_000, events=args.events, mixed_formats=False)
        size = events.stat().st_size / args.events
        print(f"load: {args.events} single-row records, 30 features, {size:.0f} bytes each, 2,000 clients")
        settings = load_settings(None, database={"url": f"sqlite:///{workdir / 'replay.db'}"})
        decoded, replayed = bench_replay(events, settings)
        detected = bench_detection(events, settings, 1.0 / replayed)
        kafka = bench_kafka(events, args.events, workdir)
    figures: Figures = {
        "replay_queries_per_s": replayed,
        "json_decode_records_per_s": decoded,
        "detection_queries_per_s": detected,
    } | kafka
    if args.json:
        sys.stdout.write(
            orjson.dumps({name: round(value, 1) for name, value in figures.items()}).decode() + "\n"
        )


if __name__ == "__main__":
    main()
