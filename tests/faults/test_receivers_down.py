"""Fault: a receiver is down for 30 s while attacks open alerts, and another refuses its first five calls;
the alerts then go quiet and resolve. Every incident opened must be resolved at each receiver, every
notification delivered once, and consumption must not wait for delivery.

Sent: 7,350 records over about 40 s: 6,000 benign records (40 clients, 12 malformed) and five augmentation
probers of 270 records each, at 10, 20, 30, 40 and 50 minutes of a simulated hour. Processed: every event
once, as a fault-free replay counts them. De-duplicated: none expected (the daemon runs throughout).

Alerts: one per prober (5 keys, as the reference). With `MIA_ALERTS_RESOLVE_AFTER_SECONDS` at 300 and event
time moving on to the end of the hour, each goes quiet and resolves. Notifications: every outbox row
delivered; the webhook takes each idempotency key once and sees, for each alert, `opened` first and
`resolved` last; PagerDuty sees, for each incident (dedup key), a `trigger` first and a `resolve` last, and
one `resolve` per alert of that key.

    .venv/bin/pytest tests/faults/test_receivers_down.py --basetemp=/tmp/faults-tests -p no:cacheprovider
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from detector.broker import EmbeddedBroker
from detector.domain import AlertStatus
from detector.storage import AlertStore, DeliveryStatus, open_store
from tests.faults.harness import (
    Daemon,
    LiveProducer,
    daemon_env,
    outbox_of,
    reference,
    summary_figures,
    tally,
    tracebacks,
    wait_until,
    write_traffic,
)
from tests.receivers import RecordingReceiver
from tests.support import make_settings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

OUTAGE_SECONDS = 30.0
PAGERDUTY_REFUSALS = 5


def test_receivers_down_while_alerts_open_and_resolve_lose_and_duplicate_nothing(
    broker: EmbeddedBroker, sqlite_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    traffic = write_traffic(tmp_path / "events.jsonl", benign_events=6_000, probers=5)
    expected = reference([traffic.path], tmp_path)
    assert len(expected.tally.alert_keys) == 5, sorted(expected.tally.alert_keys)
    webhook = RecordingReceiver()
    request.addfinalizer(webhook.stop)
    pagerduty = RecordingReceiver(status=202, body={"status": "success"}, fail_first=PAGERDUTY_REFUSALS)
    request.addfinalizer(pagerduty.stop)
    settings = make_settings(sqlite_url, broker)
    topic, group = settings.kafka.topics[0], settings.kafka.group_id
    store = open_store(settings)
    request.addfinalizer(store.close)
    alerts = AlertStore(store.engine)
    outbox = outbox_of(settings)
    request.addfinalizer(outbox.engine.dispose)
    env = daemon_env(
        sqlite_url,
        broker.bootstrap_servers,
        MIA_WEBHOOK_URL=f"{webhook.url}/hook",
        MIA_PAGERDUTY_ROUTING_KEY="R" * 32,
        MIA_PAGERDUTY_URL=f"{pagerduty.url}/v2/enqueue",
        MIA_ALERTS_RESOLVE_AFTER_SECONDS="300",
        MIA_ALERTS_RENOTIFY_SECONDS="2",
        MIA_ALERTS_RETRY_INITIAL_SECONDS="0.5",
        MIA_ALERTS_RETRY_MAX_SECONDS="2",
    )
    producer = LiveProducer(settings, [traffic.path], 40.0).start(request)
    daemon = Daemon(["--topic", topic, "--group-id", group], env, tmp_path / "daemon.log", request)
    wait_until(lambda: store.count_seen_events() > 0, 60, "the first events stored")

    webhook.stop()
    down_since, stored_at_outage = time.time(), store.count_seen_events()
    time.sleep(OUTAGE_SECONDS)
    stored_during_outage = store.count_seen_events() - stored_at_outage
    webhook.start()
    back_at = time.time()

    produced = producer.join(120)
    wait_until(lambda: store.count_seen_events() >= expected.events, 120, "the whole stream")
    wait_until(
        lambda: alerts.open_alert_count() == 0 and outbox.backlog() == {},
        90,
        "every alert resolved and every notification delivered",
    )
    assert daemon.stop() == 0, daemon.tail()

    got = tally(settings, group)
    stored_alerts = alerts.list_alerts(limit=None)
    queued = outbox.list(limit=100_000)
    by_sink = {sink: [e for e in queued if e.sink == sink] for sink in ("webhook", "pagerduty")}
    keys = [e.notification.idempotency_key for e in by_sink["webhook"]]
    taken = Counter(call.headers["idempotency-key"] for call in webhook.accepted)
    events_of: dict[int, list[str]] = defaultdict(list)
    for call in webhook.accepted:
        events_of[call.json["alert"]["id"]].append(call.json["event"])
    actions_of: dict[str, list[str]] = defaultdict(list)
    for call in pagerduty.accepted:
        actions_of[call.json["dedup_key"]].append(call.json["event_action"])
    alerts_of_key = Counter(f"mia-detector:{alert.dedup_key}" for alert in stored_alerts)
    held = [e for e in by_sink["webhook"] if down_since < e.created_at.timestamp() < back_at]
    figures = (
        f"sent {produced} records; reference: {expected.events} events, {expected.queries} queries, "
        f"{expected.dead_letters} dead letters, {expected.tally.alerts} alerts; stored: {got.describe()}; "
        f"{stored_during_outage} events stored during the {OUTAGE_SECONDS:.0f} s webhook outage; "
        f"notifications queued per sink {len(keys)}, {len(held)} of them while the webhook was down; "
        f"webhook took {sum(taken.values())} requests for {len(taken)} keys; webhook events per alert "
        f"{dict(events_of)}; pagerduty requests {len(pagerduty.requests)} ({PAGERDUTY_REFUSALS} refused), "
        f"actions per incident {dict(actions_of)}; daemon: {summary_figures(daemon.text())}"
    )
    print(figures)
    assert got.seen_events == expected.events, f"events lost or counted twice: {figures}"
    assert got.queries == expected.queries, f"queries lost or counted twice: {figures}"
    assert got.alert_keys == expected.tally.alert_keys, f"alerts lost or invented: {figures}"
    assert all(alert.status is AlertStatus.RESOLVED for alert in stored_alerts), figures
    assert stored_during_outage > 0, f"consumption waited for the receiver: {figures}"
    assert held, f"no notification fell into the outage; nothing was tested: {figures}"
    assert all(e.status is DeliveryStatus.DELIVERED for e in queued), f"undelivered: {figures}"
    assert len(by_sink["pagerduty"]) == len(keys), figures
    assert sorted(taken) == sorted(keys) and set(taken.values()) == {1}, f"lost or twice: {figures}"
    assert set(events_of) == {alert.id for alert in stored_alerts}, figures
    for alert_id, seen in events_of.items():
        assert seen[0] == "opened" and seen[-1] == "resolved", f"alert {alert_id}: {seen}; {figures}"
        assert seen.count("opened") == seen.count("resolved") == 1, f"alert {alert_id}: {seen}"
    assert set(actions_of) == set(alerts_of_key), figures
    for incident, actions in actions_of.items():
        assert actions[0] == "trigger" and actions[-1] == "resolve", f"{incident}: {actions}; {figures}"
        assert actions.count("resolve") == alerts_of_key[incident], f"{incident}: {actions}"
    assert len(pagerduty.requests) == len(keys) + PAGERDUTY_REFUSALS, figures
    assert tracebacks(daemon.text()) == [], daemon.tail()
