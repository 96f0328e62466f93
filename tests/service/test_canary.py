"""The daemon's detection canaries end to end, on the embedded broker with a real webhook receiver and the
risk endpoint: a canary passes, its latency measured, and reaches neither the sinks nor the risk feed; with
detection broken, `canary_missed` is delivered, and `canary_recovered` once a daemon with detection repaired
passes a canary."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from detector.broker import EmbeddedBroker, free_port
from detector.domain import CANARY_MODEL, NotificationEvent
from detector.kafka import KafkaPublisher
from detector.metrics import Metrics
from detector.service import StopFlag, run_daemon
from detector.settings import Settings
from detector.simulate.canary import canary_records
from detector.storage import open_store
from tests.alerts.test_risk import _answer
from tests.faults.harness import wait_until
from tests.receivers import RecordingReceiver
from tests.support import make_settings

KEY = "the canary key of these tests"
RULES = resources.files("detector.scoring").joinpath("rules.toml")


def canary_settings(
    tmp_path: Path, broker: EmbeddedBroker, webhook: str, deadline: float, **groups: dict[str, Any]
) -> Settings:
    """A canary every 2 s (its alert due within `deadline` s) and a webhook; quick deliveries."""
    return make_settings(
        f"sqlite:///{tmp_path / 'mia.db'}",
        broker,
        canary={"interval_seconds": 2.0, "deadline_seconds": deadline, "key": KEY},
        webhook={"url": webhook},
        alerts={"retry_initial_seconds": 0.2},
        **groups,
    )


@contextmanager
def running(settings: Settings, metrics: Metrics) -> Iterator[None]:
    """The daemon of `settings` for the block."""
    stop = StopFlag()
    with ThreadPoolExecutor(1) as pool:
        daemon = pool.submit(run_daemon, settings, stop, metrics=metrics)
        try:
            yield
        finally:
            stop.set()
            daemon.result(timeout=60)


def blind_rules(tmp_path: Path) -> Path:
    """The rules with the augmentation-probing rule out of reach: the canary's attack goes undetected."""
    rules = tmp_path / "rules.toml"
    blinded, found = re.subn(
        r'(id = "MIA-002"(?:.|\n)*?floor = )\d+', r"\g<1>1000000", RULES.read_text(), count=1
    )
    assert found == 1
    rules.write_text(blinded)
    return rules


def gauge(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(f"mia_detector_canary_{name}")
    assert value is not None
    return value


def events(webhook: RecordingReceiver) -> list[tuple[str, list[str]]]:
    """What the webhook took: each notification's event and its alert's clients."""
    return [
        (request.headers["x-mia-event"], request.json["alert"]["client_ids"])
        for request in webhook.requests
        if request.accepted
    ]


@pytest.mark.kafka
@pytest.mark.slow
def test_a_canary_passes_and_reaches_neither_the_sinks_nor_the_risk_feed(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    port, metrics = free_port(), Metrics()
    with RecordingReceiver() as webhook:
        settings = canary_settings(
            tmp_path, broker, webhook.url, 30.0, risk={"addr": f"127.0.0.1:{port}", "refresh_seconds": 0.2}
        )
        # A real client attacking the same way, for contrast: its attack is an incident.
        publisher = KafkaPublisher(settings.kafka)
        for value in canary_records("real-attacker", "credit-risk", time.time()):
            publisher.send(settings.kafka.topics[0], value, b"real-attacker")
        publisher.close()
        with running(settings, metrics):
            wait_until(lambda: gauge(metrics, "last_outcome") == 1.0, 45, "a canary to pass")
            latency = gauge(metrics, "last_latency_seconds")
            wait_until(
                lambda: ("opened", ["real-attacker"]) in events(webhook), 15, "the real attack's alert"
            )
            with open_store(settings) as store:
                [canary, *_] = [
                    alert.client_id for alert in store.alerts.list_alerts() if alert.model == CANARY_MODEL
                ]
            time.sleep(0.5)  # a refresh of the risk view after the last commit
            answers = {
                client: _answer(port, model, client)["action"]
                for model, client in ((CANARY_MODEL, canary), ("credit-risk", "real-attacker"))
            }

    print(f"canary detection latency (injection to alert raised): {latency:.2f} s")
    assert 0.0 < latency < 30.0
    clients = settings.canary.clients()
    assert clients is not None and clients.verifies(canary)
    assert all(
        not any(client.startswith("mia-canary-") for client in clients) for _, clients in events(webhook)
    )
    # The real attacker gets the policy's action for whichever of its alerts is the strongest.
    assert answers[canary] == "allow" and answers["real-attacker"] in ("coarsen", "throttle", "block")


@pytest.mark.kafka
@pytest.mark.slow
def test_a_canary_with_detection_broken_raises_canary_missed(broker: EmbeddedBroker, tmp_path: Path) -> None:
    metrics = Metrics()
    with RecordingReceiver() as webhook:
        settings = canary_settings(
            tmp_path, broker, webhook.url, 4.0, detection={"rules_path": blind_rules(tmp_path)}
        )
        with running(settings, metrics):
            wait_until(
                lambda: any(event == NotificationEvent.CANARY_MISSED for event, _ in events(webhook)),
                45,
                "canary_missed at the webhook",
            )

    assert gauge(metrics, "last_outcome") == 0.0
    missed = [clients for event, clients in events(webhook) if event == NotificationEvent.CANARY_MISSED]
    canaries = settings.canary.clients()
    assert canaries is not None and all(canaries.verifies(client) for [client] in missed)


@pytest.mark.kafka
@pytest.mark.slow
def test_a_daemon_restarted_with_detection_repaired_raises_canary_recovered(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    with RecordingReceiver() as webhook:
        blind = canary_settings(
            tmp_path, broker, webhook.url, 4.0, detection={"rules_path": blind_rules(tmp_path)}
        )
        with running(blind, Metrics()):
            wait_until(
                lambda: any(event == NotificationEvent.CANARY_MISSED for event, _ in events(webhook)),
                45,
                "canary_missed at the webhook",
            )
        # The same database, the rules as shipped: the first canary to pass recovers the miss of the last run.
        with running(canary_settings(tmp_path, broker, webhook.url, 30.0), Metrics()):
            wait_until(
                lambda: any(event == NotificationEvent.CANARY_RECOVERED for event, _ in events(webhook)),
                45,
                "canary_recovered at the webhook",
            )
            time.sleep(3)  # another canary, which passes too

    delivered = [(event, clients) for event, clients in events(webhook) if event.startswith("canary_")]
    last_miss = [clients for event, clients in delivered if event == NotificationEvent.CANARY_MISSED][-1]
    assert delivered[-1] == (NotificationEvent.CANARY_RECOVERED, last_miss)
    assert [event for event, _ in delivered].count(NotificationEvent.CANARY_RECOVERED) == 1
