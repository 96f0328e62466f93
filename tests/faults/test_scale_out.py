"""Scale-out: several daemons in one consumer group on PostgreSQL share a 4-partition topic carrying a
simulated scenario (the smoke scenario: benign clients of six populations and one attacker of each kind, its
training-set attacker dealt over four sybil keys of one network). Two members start; once a third of the
stream is stored one is SIGKILLed and started again; once two thirds are, a third member joins. Every
rebalance moves partitions, with their clients' stored features and the shared sybil pools.

Expected, against a fault-free replay of the same file into a fresh database (with the same trained model,
so that no member learns its input scales from a different order of queries):
- every event stored once, and the queries counted per client as the replay counts them;
- the per-client alerts with the same keys and the same `detected_at` and `detected_after_queries`: a
  restarted or newly assigned member goes on from the stored features;
- the coordinated-clients alerts of the replay (one a pool), naming sybil keys only: the pool is shared,
  whichever members hold its keys, and members that each detect their own share update the pool's one alert;
- no key with two alerts open (alerts do not resolve within the scenario), no traceback.

    .venv/bin/pytest tests/faults/test_scale_out.py -s -p no:cacheprovider --basetemp=/tmp/faults-tests
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

from detector.broker import EmbeddedBroker
from detector.domain import Alert, AlertKind
from detector.kafka import ensure_topic
from detector.protocols import index_training_sets
from detector.service import replay, train
from detector.settings import Settings
from detector.simulate.simulator import simulate
from detector.storage import AlertStore, open_store
from tests.faults.harness import Daemon, LiveProducer, daemon_env, tally, tracebacks, wait_until
from tests.support import events_with_sybils, fresh_postgres_database, make_settings

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.postgres]

PARTITIONS = 4
SYBIL_KEYS = 4
STREAM_SECONDS = 45.0
DAY = 86_400.0


def queries_per_client(settings: Settings) -> Counter[tuple[str, str]]:
    with open_store(settings, migrate=False) as store:
        counted: Counter[tuple[str, str]] = Counter()
        for session in store.list_sessions(limit=1_000_000):
            counted[(session.model, session.client_id)] += session.queries
        return counted


def alerts_of(settings: Settings) -> list[Alert]:
    with open_store(settings, migrate=False) as store:
        return AlertStore(store.engine).list_alerts(limit=None)


def per_client(alerts: list[Alert]) -> set[tuple[str, datetime, int]]:
    return {
        (alert.dedup_key, alert.detected_at, alert.detected_after_queries)
        for alert in alerts
        if alert.kind is not AlertKind.COORDINATED_CLIENTS
    }


def test_members_killed_restarted_and_added_give_the_alerts_of_one_replay(
    broker: EmbeddedBroker, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    simulation = simulate("smoke", 3, tmp_path / "scenario")
    events = tmp_path / "events.jsonl"
    lines, sybils = events_with_sybils(simulation.out, SYBIL_KEYS)
    events.write_bytes(b"\n".join(lines) + b"\n")
    indexes = index_training_sets(simulation.out, tmp_path / "indexes")
    alerts_stay_open = {"resolve_after_seconds": DAY}
    reference_settings = make_settings(f"sqlite:///{tmp_path / 'reference.db'}", alerts=alerts_stay_open)
    reference_settings = reference_settings.model_copy(update={"training_index": indexes})
    train(reference_settings, [str(simulation.out / "baseline.jsonl")], 0.001, tmp_path / "model")
    reference_settings = reference_settings.model_copy(update={"model_path": tmp_path / "model"})
    stats = replay(reference_settings, [str(events)])
    expected_alerts = alerts_of(reference_settings)
    expected_coordinated = [a for a in expected_alerts if a.kind is AlertKind.COORDINATED_CLIENTS]
    assert len(per_client(expected_alerts)) >= 4 and expected_coordinated, [
        a.dedup_key for a in expected_alerts
    ]

    with fresh_postgres_database() as database_url:
        settings = make_settings(database_url, broker, alerts=alerts_stay_open)
        topic, group = settings.kafka.topics[0], settings.kafka.group_id
        ensure_topic(settings.kafka, topic, PARTITIONS)
        open_store(settings).close()  # migrated before anything counts what it holds
        env = daemon_env(
            database_url,
            broker.bootstrap_servers,
            MIA_MODEL_PATH=str(tmp_path / "model"),
            MIA_TRAINING_INDEX=str(indexes),
            MIA_ALERTS_RESOLVE_AFTER_SECONDS=str(DAY),
            MIA_KAFKA_MAX_POLL_RECORDS="200",
            MIA_COMMIT_MIN_RECORDS="500",
            MIA_COMMIT_MIN_INTERVAL_SECONDS="1",
        )
        args = ["--topic", topic, "--group-id", group]
        producer = LiveProducer(settings, [events], STREAM_SECONDS).start(request)

        def stored() -> int:
            return tally(settings).seen_events

        members = {name: Daemon(args, env, tmp_path / f"{name}.log", request) for name in ("a", "b")}
        wait_until(lambda: stored() >= stats.events // 3, 120, "a third of the stream stored")
        members["a"].kill()
        time.sleep(1.0)
        members["a2"] = Daemon(args, env, tmp_path / "a2.log", request)
        wait_until(lambda: stored() >= 2 * stats.events // 3, 120, "two thirds of the stream stored")
        members["c"] = Daemon(args, env, tmp_path / "c.log", request)
        producer.join(120)
        wait_until(lambda: stored() >= stats.events, 180, "the whole stream stored")
        time.sleep(2.0)
        for name in ("b", "a2", "c"):
            assert members[name].stop() == 0, members[name].tail()

        got = alerts_of(settings)
        coordinated = [a for a in got if a.kind is AlertKind.COORDINATED_CLIENTS]
        figures = (
            f"reference: {stats.events} events, {len(expected_alerts)} alerts "
            f"({len(expected_coordinated)} coordinated: {[a.client_ids for a in expected_coordinated]}); "
            f"members: {tally(settings).describe()}, coordinated {[a.client_ids for a in coordinated]}"
        )
        print(figures)
        assert tally(settings).seen_events == stats.events, figures
        assert queries_per_client(settings) == queries_per_client(reference_settings), figures
        assert per_client(got) == per_client(expected_alerts), figures
        assert sorted(a.dedup_key for a in coordinated) == sorted(a.dedup_key for a in expected_coordinated)
        named = [client for alert in coordinated for client in alert.client_ids]
        assert set(named) <= set(sybils) and len(named) == len(set(named)), figures
        assert tally(settings).most_open_per_key == 1, figures
        for name, member in members.items():
            assert tracebacks(member.text()) == [], f"{name}: {member.tail()}"
