"""Live detection latency: from the moment an attack query is produced to its alert at a webhook receiver.

The daemon runs as deployed (the embedded broker, SQLite, a webhook sink to an HTTP receiver on 127.0.0.1)
while benign clients send steady traffic and attackers start one after another, each probing records in
bursts of label-only variants (augmentation probing). For each alert opened, the latency is the receiver's
arrival time minus the produce time of the query it was detected on (its client's
`detected_after_queries`-th query). The baseline, measured in the same run, is the broker alone: produce to
a plain kafka-python consumer's poll, with the daemon's fetch settings.

Run: `python benchmarks/latency.py [--attackers N] [--json]`; the last line with `--json` is one JSON object.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from kafka import KafkaConsumer

from detector.broker import EmbeddedBroker
from detector.kafka import KafkaPublisher, client_options
from detector.service import StopFlag, run_daemon
from detector.settings import Settings, load_settings
from detector.simulate.sample import oip_record

WIDTH = 20
BENIGN_CLIENTS = 20
BENIGN_PER_SECOND = 100.0
ATTACK_PER_SECOND = 30.0  # per attacker: a record and its 8 variants take 0.3 s
ATTACKER_GAP_SECONDS = 1.0


class Receiver:
    """An HTTP webhook receiver on 127.0.0.1 keeping each body with its arrival time (epoch seconds)."""

    def __init__(self) -> None:
        received: list[tuple[float, dict[str, Any]]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((time.time(), orjson.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.received = received
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/alerts"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Traffic:
    """Produces benign and attack records keyed by client, each stamped with its produce time (also its
    event time: the traffic is live), and remembers every attack query's produce time."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self._publisher = KafkaPublisher(settings.kafka)
        self._topic = topic
        self._rng = np.random.default_rng(7)
        self._scale = self._rng.uniform(0.5, 50.0, WIDTH)
        self.attack_sent: dict[str, list[float]] = {}

    def send(self, client: str, row: np.ndarray, *, probabilities: bool) -> float:
        now = time.time()
        label = int(row[0] > 0)
        probs = np.array([[0.7, 0.3] if label == 0 else [0.3, 0.7]], dtype=np.float32)
        record = oip_record(
            f"{client}-{uuid.uuid4().hex[:12]}",
            now,
            client,
            row[None, :],
            probs,
            want_probabilities=probabilities,
        )
        self._publisher.send(self._topic, orjson.dumps(record), client.encode())
        return now

    def benign(self, stop: threading.Event) -> None:
        clients = [f"app-{index}" for index in range(BENIGN_CLIENTS)]
        while not stop.is_set():
            client = clients[int(self._rng.integers(len(clients)))]
            self.send(client, self._rng.normal(size=WIDTH) * self._scale, probabilities=True)
            self._publisher.flush()
            time.sleep(1.0 / BENIGN_PER_SECOND)

    def attack(self, client: str, records: int = 30, variants: int = 8) -> None:
        sent = self.attack_sent.setdefault(client, [])
        rng = np.random.default_rng(abs(hash(client)) % 2**32)
        for _ in range(records):
            base = rng.normal(size=WIDTH) * self._scale
            for variant in range(variants + 1):
                row = base if variant == 0 else base + rng.normal(size=WIDTH) * self._scale * 0.02
                sent.append(self.send(client, row, probabilities=False))
                self._publisher.flush()
                time.sleep(1.0 / ATTACK_PER_SECOND)

    def close(self) -> None:
        self._publisher.close()


def broker_latency(settings: Settings, topic: str, count: int = 300) -> list[float]:
    """Produce to a plain consumer's poll, `count` records one at a time, with the daemon's fetch settings."""
    consumer = KafkaConsumer(
        topic,
        **client_options(settings.kafka),
        group_id=f"baseline-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="latest",
        fetch_max_wait_ms=settings.kafka.fetch_max_wait_ms,
    )
    publisher = KafkaPublisher(settings.kafka)
    latencies = []
    try:
        while not consumer.assignment():
            consumer.poll(timeout_ms=100)
        for index in range(count):
            sent = time.time()
            publisher.send(topic, str(index).encode(), b"baseline")
            publisher.flush()
            while not consumer.poll(timeout_ms=settings.kafka.poll_timeout_ms):
                pass
            latencies.append(time.time() - sent)
    finally:
        publisher.close()
        consumer.close()
    return latencies


@contextmanager
def daemon(settings: Settings) -> Iterator[StopFlag]:
    stop = StopFlag()
    thread = threading.Thread(target=run_daemon, args=(settings, stop), daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(timeout=60)


def percentiles(values: list[float]) -> dict[str, float]:
    array = np.asarray(values)
    return {
        "p50": float(np.percentile(array, 50)),
        "p99": float(np.percentile(array, 99)),
        "max": float(array.max()),
    }


def spread(figures: dict[str, float]) -> str:
    return f"p50 {figures['p50']:.3f} s  p99 {figures['p99']:.3f} s  max {figures['max']:.3f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attackers", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="end with one JSON object of the figures")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as work, EmbeddedBroker() as broker:
        receiver = Receiver()
        topic = f"latency-{uuid.uuid4().hex[:8]}"
        settings = load_settings(
            None,
            kafka={"bootstrap_servers": broker.bootstrap_servers, "topics": [topic], "group_id": "latency"},
            database={"url": f"sqlite:///{Path(work) / 'latency.db'}"},
            webhook={"url": receiver.url},
            metrics={"addr": ""},
        )
        traffic = Traffic(settings, topic)
        traffic.send("app-0", np.zeros(WIDTH), probabilities=True)  # creates the topic
        stop_benign = threading.Event()
        with daemon(settings):
            benign = threading.Thread(target=traffic.benign, args=(stop_benign,), daemon=True)
            benign.start()
            time.sleep(8.0)  # the daemon joins its group and reads the first records
            attackers = []
            for index in range(args.attackers):
                attacker = threading.Thread(target=traffic.attack, args=(f"attacker-{index}",), daemon=True)
                attacker.start()
                attackers.append(attacker)
                time.sleep(ATTACKER_GAP_SECONDS)
            for attacker in attackers:
                attacker.join()
            time.sleep(3.0)  # the last alerts reach the receiver
            stop_benign.set()
            benign.join()
        baseline = broker_latency(settings, f"{topic}-baseline")
        traffic.close()
        receiver.close()

    latencies = []
    for arrived, body in receiver.received:
        alert = body["alert"]
        sent = traffic.attack_sent.get(alert["client_id"])
        if body["event"] == "opened" and sent is not None:
            latencies.append(arrived - sent[alert["detected_after_queries"] - 1])
    benign_alerts = sum(
        body["event"] == "opened" and body["alert"]["client_id"].startswith("app-")
        for _, body in receiver.received
    )
    detected = {
        body["alert"]["client_id"]
        for _, body in receiver.received
        if body["alert"]["client_id"] in traffic.attack_sent
    }
    ours, broker_only = percentiles(latencies), percentiles(baseline)
    print(f"live detection latency, {args.attackers} attackers among {BENIGN_CLIENTS} benign clients")
    print(f"  attackers alerted          {len(detected)}/{args.attackers}; benign alerted {benign_alerts}")
    print(f"  attack query -> receiver   {spread(ours)}  ({len(latencies)} alerts)")
    print(f"  broker alone (baseline)    {spread(broker_only)}")
    print(f"  ratio p99 detector / p99 broker alone: {ours['p99'] / broker_only['p99']:.1f}")
    if args.json:
        print(
            orjson.dumps(
                {
                    "alert_latency_p50_s": ours["p50"],
                    "alert_latency_p99_s": ours["p99"],
                    "broker_latency_p50_s": broker_only["p50"],
                    "broker_latency_p99_s": broker_only["p99"],
                    "alerts": len(latencies),
                    "attackers_alerted": len(detected),
                    "attackers": args.attackers,
                    "benign_alerts": benign_alerts,
                }
            ).decode()
        )


if __name__ == "__main__":
    main()
