"""What the fault tests share: traffic that opens alerts, the daemon as a process the test can kill, a
producer that publishes like live traffic, the reference figures a fault-free replay gives, and what a
database holds after a run.

Every wait has a deadline and fails with what it waited for; every process and thread started here is
stopped by a finalizer, whatever the test's outcome.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from detector.domain import AlertStatus
from detector.kafka import KafkaPublisher
from detector.service import client_key, replay
from detector.settings import Settings
from detector.simulate.sample import START, oip_record, sample_records
from detector.storage import AlertStore, DeliveryStatus, OutboxStore, open_engine, open_store
from tests.support import make_settings
from tests.test_cli import cli_env

# The broker test topics are created by the first record produced, with tansu's default of 4 partitions.
PARTITIONS = 4
# The model the probers query: not the benign sample's, whose clients would otherwise be measured on the scale
# the probers' records teach the embedder.
PROBED_MODEL = "loan-approval"
# A SIGKILLed member stays in its group until its session times out: 6 s keeps restarts quick.
SESSION_TIMEOUT_MS = 6000


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    """Check `condition` every `interval` seconds; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# -- traffic -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Traffic:
    """A JSON Lines file of query logs: benign clients over a simulated hour with `attackers` interleaved in
    event-time order (one malformed record every `malformed_every`, dead letters)."""

    path: Path
    records: int
    attackers: list[str]


def prober_records(client: str, start: float, rounds: int, seed: int) -> Iterator[tuple[float, bytes]]:
    """An augmentation prober (the pattern that opens an `augmentation_probing` alert without a trained
    model): `rounds` records, each sent as is and then as 8 label-only variants with a little noise, 0.2 s
    apart, 5 s between records. Yields (timestamp, record)."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 50.0, 30).astype(np.float32)
    probabilities = np.array([[0.8, 0.2]], dtype=np.float32)
    at = start
    for record in range(rounds):
        base = rng.normal(size=30) * scale
        for variant in range(9):
            row = base if variant == 0 else base + rng.normal(size=30) * scale * 0.02
            event_id = f"{client}-{record}-{variant}"
            event = oip_record(
                event_id,
                at,
                client,
                row[None, :],
                probabilities,
                model=PROBED_MODEL,
                want_probabilities=False,
            )
            yield at, orjson.dumps(event)
            at += 0.2
        at += 5.0


def write_traffic(
    path: Path,
    *,
    benign_events: int,
    probers: int,
    seed: int = 1,
    clients: int = 40,
    prober_rounds: int = 30,
    malformed_every: int = 499,
) -> Traffic:
    """Write `benign_events` benign records (`sample_records`, a simulated hour from `START`) and `probers`
    augmentation probers starting at evenly spaced moments of that hour, merged in event-time order.

    Each prober sends `prober_rounds` probes (9 records each). 30 rounds open the alert about five times
    over, so that it still opens when a restart splits the prober's traffic (a restarted daemon does not
    carry a client's feature state over, see `docs/reliability.md`)."""
    span = 3600.0
    benign = (
        (START + span * index / benign_events, line)
        for index, line in enumerate(
            sample_records(clients=clients, events=benign_events, seed=seed, malformed_every=malformed_every)
        )
    )
    attackers = [f"prober-{seed}-{index}" for index in range(probers)]
    streams = [benign] + [
        prober_records(client, START + span * (index + 1) / (probers + 1), prober_rounds, seed * 100 + index)
        for index, client in enumerate(attackers)
    ]
    count = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        for _, line in heapq.merge(*streams, key=lambda item: item[0]):
            out.write(line + b"\n")
            count += 1
    return Traffic(path, count, attackers)


# -- what a database holds -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tally:
    """What one database holds after a run: events processed (seen-event ledger), queries counted into
    sessions, dead letters, alerts (their dedup keys, each alert's key with the client queries it was
    detected after, and the most alerts open at once for one key) and the stored checkpoints of a group."""

    seen_events: int
    queries: int
    dead_letters: int
    alerts: int
    alert_keys: frozenset[str]
    detections: Counter[tuple[str, int]]
    most_open_per_key: int
    checkpoints: dict[tuple[str, int], int] = field(default_factory=dict)

    def describe(self) -> str:
        return (
            f"{self.seen_events} events, {self.queries} queries, {self.dead_letters} dead letters, "
            f"{self.alerts} alerts under {len(self.alert_keys)} keys"
        )


def tally(settings: Settings, group_id: str | None = None) -> Tally:
    """Count what the database of `settings` holds (checkpoints of `group_id`, if given)."""
    with open_store(settings, migrate=False) as store:
        sessions = store.list_sessions(limit=1_000_000)
        alerts = AlertStore(store.engine).list_alerts(limit=None)
        open_keys = Counter(alert.dedup_key for alert in alerts if alert.status is AlertStatus.OPEN)
        return Tally(
            seen_events=store.count_seen_events(),
            queries=sum(session.queries for session in sessions),
            dead_letters=sum(store.dead_letter_counts().values()),
            alerts=len(alerts),
            alert_keys=frozenset(alert.dedup_key for alert in alerts),
            detections=Counter((alert.dedup_key, alert.detected_after_queries) for alert in alerts),
            most_open_per_key=max(open_keys.values(), default=0),
            checkpoints=store.checkpoints(group_id) if group_id is not None else {},
        )


@dataclass(frozen=True)
class Reference:
    """The figures of a fault-free replay of the same files into a fresh SQLite database."""

    records: int
    events: int
    queries: int
    dead_letters: int
    tally: Tally


def reference(files: list[Path], directory: Path) -> Reference:
    """Replay `files` into a fresh database under `directory`: what every faulted run must end up with."""
    settings = make_settings(f"sqlite:///{directory / 'reference.db'}")
    stats = replay(settings, [str(path) for path in files])
    return Reference(
        stats.records, stats.events, stats.queries, sum(stats.dead_letters.values()), tally(settings)
    )


def integrity(path: Path) -> str:
    """SQLite's `PRAGMA integrity_check` of the file at `path` ("ok" when sound)."""
    import sqlite3

    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return "; ".join(row[0] for row in connection.execute("PRAGMA integrity_check"))
    finally:
        connection.close()


def outbox_of(settings: Settings) -> OutboxStore:
    """The outbox of the database of `settings` (its engine is disposed of by the caller's finalizer)."""
    return OutboxStore(open_engine(settings, migrate=False))


def undelivered(outbox: OutboxStore) -> int:
    """Notifications of the outbox not delivered (pending or failed)."""
    return sum(1 for entry in outbox.list(limit=1_000_000) if entry.status is not DeliveryStatus.DELIVERED)


# -- the broker ----------------------------------------------------------------------------------------------


def committed_offsets(bootstrap_servers: str, group_id: str, topic: str) -> dict[tuple[str, int], int]:
    """The offsets the broker holds for `group_id` on `topic` (partitions without one are left out). The
    consumer used to ask never joins the group."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=group_id,
        enable_auto_commit=False,
        # kafka-python 2.x wants the request timeout above the session timeout (unused: it never joins).
        session_timeout_ms=6_000,
        request_timeout_ms=10_000,
    )
    try:
        offsets = {}
        for partition in range(PARTITIONS):
            offset = consumer.committed(TopicPartition(topic, partition))
            if offset is not None:
                offsets[(topic, partition)] = offset
        return offsets
    finally:
        consumer.close()


class LiveProducer:
    """Publishes the records of `files` spread over about `seconds`, in `slices` equal slices, from a
    background thread, as live traffic arrives; the first slice is published before `start` returns (a
    consumer subscribing to a topic that does not exist yet would not see it for minutes).

    `pause()` waits for the slice in flight and holds the rest until `resume()`. A slice the broker does not
    take is published again with a new producer (a restarted broker answers errors for a few seconds);
    records it did take before failing are then published twice, as any producer retry does: the
    detector de-duplicates them by event id. `produced` counts distinct records sent, `sends` every send."""

    def __init__(self, settings: Settings, files: list[Path], seconds: float, slices: int = 40) -> None:
        self._settings = settings
        self._topic = settings.kafka.topics[0]
        lines = [line for path in files for line in path.read_bytes().splitlines() if line.strip()]
        size = -(-len(lines) // slices)
        self._slices = [lines[start : start + size] for start in range(0, len(lines), size)]
        self._interval = seconds / len(self._slices)
        self._running = threading.Event()
        self._running.set()
        self._idle = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-producer", daemon=True)
        self.total = len(lines)
        self.produced = 0
        self.sends = 0
        self.failures: list[str] = []
        self._publisher: KafkaPublisher | None = None

    def start(self, request: pytest.FixtureRequest) -> LiveProducer:
        request.addfinalizer(self.close)
        self._publish(self._slices[0])
        self._thread.start()
        return self

    def pause(self) -> None:
        """Hold the next slices; return once no slice is in flight."""
        self._running.clear()
        self._idle.wait(30)

    def resume(self) -> None:
        self._running.set()

    def join(self, timeout: float) -> int:
        """Wait until every record is published; return how many. Fails the test after `timeout` s."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), (
            f"the producer published {self.produced} of {self.total} records in {timeout:.0f} s; "
            f"failures: {self.failures[-3:]}"
        )
        return self.produced

    def close(self) -> None:
        self._stop.set()
        self._running.set()
        if self._thread.is_alive():
            self._thread.join(30)
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None

    def _run(self) -> None:
        for lines in self._slices[1:]:
            self._idle.set()
            self._running.wait()
            self._idle.clear()
            if self._stop.is_set():
                return
            time.sleep(self._interval)
            while not self._stop.is_set():
                try:
                    self._publish(lines)
                    break
                except Exception as error:  # the broker is down or restarting: a new producer, later
                    self.failures.append(f"{type(error).__name__}: {error}")
                    if self._publisher is not None:
                        # Let go, closed aside: kafka-python's close waits for the batches in flight, which
                        # a producer that lost its broker only gives up when they expire (2 minutes), and
                        # raises when given a shorter timeout. The slice goes out again with a new producer.
                        threading.Thread(
                            target=self._publisher.close, name="producer-close", daemon=True
                        ).start()
                        self._publisher = None
                    time.sleep(1.0)
        self._idle.set()

    def _publish(self, lines: list[bytes]) -> None:
        if self._publisher is None:
            self._publisher = KafkaPublisher(self._settings.kafka)
        for line in lines:
            self._publisher.send(self._topic, line, client_key(line))
            self.sends += 1
        self._publisher.flush()
        self.produced += len(lines)


# -- the daemon as a process ---------------------------------------------------------------------------------


def daemon_env(database_url: str, bootstrap_servers: str, **variables: str) -> dict[str, str]:
    """The environment of a daemon under test: the database, the broker, quick group joins, INFO logs, no
    metrics endpoint (unless `MIA_METRICS_ADDR` is given), and `variables`."""
    defaults = {
        "MIA_DATABASE_URL": database_url,
        "MIA_KAFKA_BOOTSTRAP_SERVERS": bootstrap_servers,
        "MIA_KAFKA_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
        "MIA_LOG_LEVEL": "INFO",
        "MIA_METRICS_ADDR": "",
    }
    return cli_env(**(defaults | variables))


def cpu_seconds(pid: int) -> float:
    """User and system CPU time the process `pid` has used so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Daemon:
    """`python -m detector run ...` as a child process, its stderr in `log`; killed by a finalizer if the
    test does not stop it. With `metrics_port`, its /metrics is scraped every half second from a
    background thread, so that the last figures of a process killed with SIGKILL are known (`last_scrape`).
    """

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        log: Path,
        request: pytest.FixtureRequest,
        metrics_port: int | None = None,
    ) -> None:
        self.log = log
        self.metrics_port = metrics_port
        with log.open("ab") as stderr:  # a file, not a pipe: a chatty daemon must never block on its logs
            self.process = subprocess.Popen(
                [sys.executable, "-m", "detector", "run", *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=env,
            )
        self.last_scrape: dict[str, float] = {}
        self._stop_scraping = threading.Event()
        self._scraper: threading.Thread | None = None
        request.addfinalizer(self.kill)
        if metrics_port is not None:
            self._scraper = threading.Thread(target=self._scrape_loop, name="scraper", daemon=True)
            self._scraper.start()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def scrape(self) -> dict[str, float]:
        """The daemon's /metrics now, as {sample name with its labels: value}; raises `httpx.HTTPError`."""
        assert self.metrics_port is not None
        response = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2.0)
        response.raise_for_status()
        samples = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def metric(self, name: str, default: float = float("nan")) -> float:
        """One sample of the last scrape (see `last_scrape`)."""
        return self.last_scrape.get(name, default)

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would end it."""
        if self.alive:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self._stop_scraping.set()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; the exit code. Fails the test when it does not exit within `timeout`."""
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit; its exit code. Kills it and fails the test after `timeout` s."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the daemon did not exit within {timeout:.0f} s:\n{self.tail()}") from None
        self._stop_scraping.set()
        if self._scraper is not None:
            self._scraper.join(5)
        return code

    def tail(self, lines: int = 30) -> str:
        """The end of the log, without kafka-python's connection errors (there are many while a broker is
        away)."""
        kept = [line for line in self.text().splitlines() if " kafka." not in line]
        return "\n".join(kept[-lines:])

    def _scrape_loop(self) -> None:
        while not self._stop_scraping.wait(0.5):
            with contextlib.suppress(httpx.HTTPError, OSError):  # not listening yet, or gone
                self.last_scrape = self.scrape()


def tracebacks(log: str) -> list[str]:
    """The tracebacks in `log` (their first line): uncaught ones, and those logged by the detector.
    kafka-python logs one with every connection it loses, and recovers: those are left out."""
    found, logger = [], ""
    for line in log.splitlines():
        fields = line.split()
        # `2026-12-04T23:56:47.092Z INFO    detector.ingest.kafka: ...`
        if len(fields) >= 3 and line[:2] == "20" and fields[1] in ("DEBUG", "INFO", "WARNING", "ERROR"):
            logger = fields[2]
        if line.startswith("Traceback"):  # uncaught: the process died of it
            found.append(line)
        elif "Traceback (most recent call last)" in line and not logger.startswith("kafka"):
            found.append(f"{logger}: {line.strip()}")
    return found


def summary_figures(log: str) -> list[str]:
    """The `stopped: ...` summary lines of the daemons that exited cleanly (records, events, duplicates)."""
    return [line.split("stopped: ", 1)[1] for line in log.splitlines() if "detector: stopped: " in line]
