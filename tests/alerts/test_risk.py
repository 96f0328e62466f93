"""The risk feed: the policy's decisions follow the alerts (opened, escalated, resolved), audited; an
operator's decision overrides them; the endpoint answers gateways from memory, on SQLite and PostgreSQL."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition

from detector.alerts.risk import RiskPolicy
from detector.alerts.risk_endpoint import RiskEndpoint
from detector.alerts.risk_feed import InForce, RiskFeed, RiskView
from detector.alerts.risk_topic import TOPIC_CONFIGS, RiskTopic, risk_key
from detector.broker import EmbeddedBroker, free_port
from detector.domain import (
    AlertKind,
    Coarsening,
    RiskAction,
    RiskDecision,
    RiskParameters,
    Severity,
    in_force,
    utc,
)
from detector.kafka import KafkaPublisher, ensure_topic, latest_values
from detector.metrics import RISK_ACTIONS, Metrics
from detector.protocols import index_training_sets, train_as_operator
from detector.service import StopFlag, produce_file, run_daemon
from detector.settings import Settings
from detector.simulate.simulator import simulate
from detector.storage import RiskStore, Store, open_store
from tests.faults.harness import wait_until
from tests.storage.conftest import START, Alerts, FakeClock
from tests.storage.test_alerts import MODEL, detection
from tests.support import make_settings, unique
from tests.test_cli import cli_env, mia


@pytest.fixture
def alerts(store: Store, clock: FakeClock) -> Alerts:
    """The lifecycle with the packaged risk policy."""
    return Alerts(store, clock=clock, risk=RiskPolicy.load())


def decision(action: RiskAction = RiskAction.BLOCK, **values: Any) -> RiskDecision:
    fields: dict[str, Any] = {
        "model": MODEL,
        "client_id": "client-a",
        "action": action,
        "source": "operator",
        "actor": "alice",
        "reason": "seen in the gateway logs",
        "decided_at": utc(START),
    }
    return RiskDecision(**(fields | values))


# -- the policy ----------------------------------------------------------------------------------------------


def test_the_packaged_policy_coarsens_harvesting_more_as_its_severity_rises() -> None:
    policy = RiskPolicy.load()
    medium = policy.entry_for(AlertKind.CONFIDENCE_HARVESTING, Severity.MEDIUM)
    high = policy.entry_for(AlertKind.CONFIDENCE_HARVESTING, Severity.CRITICAL)
    assert medium is not None and medium.parameters.coarsening is Coarsening.ROUND
    assert high is not None and high.parameters.coarsening is Coarsening.LABELS
    critical_probe = policy.entry_for(AlertKind.BOUNDARY_PROBING, Severity.CRITICAL)
    assert critical_probe is not None and critical_probe.action is RiskAction.BLOCK


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('kind = "boundary_probing"\naction = "coarsen"', "coarsen takes a coarsening"),
        ('kind = "boundary_probing"\naction = "throttle"', "throttle takes requests_per_minute"),
        ('kind = "boundary_probing"\naction = "block"\ndecimals = 2', "block takes no parameters"),
        ('kind = "probing"\naction = "block"', "policy entry 1"),
        ('kind = "boundary_probing"\naction = "allow"', "allow is what no entry means"),
        ('kind = "boundary_probing"\naction = "block"\nttl = 5', "unknown keys ['ttl']"),
        ('action = "block"', "lacks 'kind'"),
    ],
)
def test_a_malformed_policy_is_refused_saying_which_entry(tmp_path: Path, entry: str, message: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(f"[[policy]]\n{entry}\n")
    with pytest.raises(ValueError, match=r"policy entry|policy\.toml") as raised:
        RiskPolicy.load(path)
    assert message in str(raised.value)


def test_an_operator_decision_overrides_the_policy_and_expired_ones_are_not_in_force() -> None:
    coarsen = RiskParameters(coarsening=Coarsening.LABELS)
    policy = [
        decision(RiskAction.COARSEN, parameters=coarsen, source="policy", alert_id=1, actor="policy"),
        decision(RiskAction.THROTTLE, parameters=RiskParameters(requests_per_minute=5), source="policy",
                 alert_id=2, actor="policy"),
    ]  # fmt: skip
    strictest, alert_ids = in_force(policy, utc(START + 60))
    assert strictest is not None and strictest.action is RiskAction.THROTTLE and alert_ids == [1, 2]

    exempt = decision(RiskAction.ALLOW, decided_at=utc(START + 10), expires_at=utc(START + 3600))
    forced, _ = in_force([*policy, exempt], utc(START + 60))
    assert forced == exempt  # an operator's allow exempts the client from the policy
    after, _ = in_force([*policy, exempt], utc(START + 3600))
    assert after is not None and after.action is RiskAction.THROTTLE  # the override expired


# -- the decisions follow the alerts -------------------------------------------------------------------------


def risk_store(store: Store) -> RiskStore:
    return RiskStore(store.engine)


def test_decisions_follow_an_alert_from_opening_through_escalation_to_resolution(
    alerts: Alerts, store: Store, clock: FakeClock
) -> None:
    medium = detection(severity=Severity.MEDIUM)
    [opened] = alerts.upsert([medium])
    [stored] = risk_store(store).decisions()
    assert (stored.action, stored.parameters.coarsening, stored.alert_id) == (
        RiskAction.COARSEN,
        Coarsening.ROUND,
        opened.alert.id,
    )
    assert stored.expires_at == utc(START + 86_400)

    clock.now += 60
    alerts.upsert([replace(medium, last_seen=START + 90, evidence=["e3"])])  # updated, same action
    [kept] = risk_store(store).decisions()
    assert kept.decided_at == stored.decided_at and kept.expires_at == utc(START + 60 + 86_400)

    clock.now += 60
    alerts.upsert([replace(medium, severity=Severity.HIGH, last_seen=START + 120)])  # escalated
    [escalated] = risk_store(store).decisions()
    assert escalated.parameters.coarsening is Coarsening.LABELS

    alerts.resolve(opened.alert.id)
    assert risk_store(store).decisions() == []
    audit = risk_store(store).audit_log()
    assert [(entry["change"], entry["actor"]) for entry in reversed(audit)] == [
        ("decided", "policy"),
        ("changed", "policy"),
        ("withdrawn", "policy"),
    ]
    assert audit[0]["reason"] == f"alert {opened.alert.id} resolved"


def test_a_coordinated_alert_decides_on_every_client_it_names(alerts: Alerts, store: Store) -> None:
    campaign = replace(
        detection("s1", "s2", kind=AlertKind.COORDINATED_CLIENTS, severity=Severity.CRITICAL),
        group="198.51.100.0/24",
    )
    alerts.upsert([campaign])
    alerts.upsert([replace(campaign, client_ids=("s3",), last_seen=START + 90)])  # a later wave

    decided = {d.client_id: d.action for d in risk_store(store).decisions()}
    assert decided == dict.fromkeys(("s1", "s2", "s3"), RiskAction.THROTTLE)


def test_an_operator_override_is_audited_and_cleared(store: Store) -> None:
    risk = risk_store(store)
    assert risk.override(decision()) is None
    previous = risk.override(decision(RiskAction.ALLOW, reason="a known partner", decided_at=utc(START + 5)))
    assert previous is not None and previous.action is RiskAction.BLOCK
    [stored] = risk.decisions()
    assert stored.action is RiskAction.ALLOW

    cleared = risk.clear(MODEL, "client-a", "bob", "partner contract ended")
    assert cleared == stored and risk.decisions() == [] and risk.clear(MODEL, "client-a", "bob", "x") is None
    assert [(e["change"], e["actor"], e["reason"]) for e in risk.audit_log()] == [
        ("cleared", "bob", "partner contract ended"),
        ("overridden", "alice", "a known partner"),
        ("overridden", "alice", "seen in the gateway logs"),
    ]


# -- the endpoint --------------------------------------------------------------------------------------------


def ask(endpoint: RiskEndpoint, path: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{endpoint.port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 (a URL made here)
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, orjson.loads(error.read())


@pytest.fixture
def endpoint(store: Store, clock: FakeClock) -> Iterator[RiskEndpoint]:
    served = RiskEndpoint(RiskView(risk_store(store).decisions, clock), "127.0.0.1", 0).start()
    yield served
    served.close()


def test_the_endpoint_answers_the_policy_the_override_and_allow_for_anyone_else(
    alerts: Alerts, store: Store, endpoint: RiskEndpoint
) -> None:
    [opened] = alerts.upsert([detection(severity=Severity.HIGH)])
    endpoint.view.refresh()

    status, answer = ask(endpoint, f"/v1/risk/{MODEL}/client-a")
    assert status == 200
    assert answer["action"] == "coarsen" and answer["parameters"] == {"coarsening": "labels"}
    assert answer["alert_ids"] == [opened.alert.id] and answer["source"] == "policy"
    assert answer["expires_at"] == "2023-11-15T22:13:20.000Z"
    assert ask(endpoint, f"/v1/risk/{MODEL}/someone-else") == (
        200,
        {"model": MODEL, "client_id": "someone-else", "action": "allow", "alert_ids": []},
    )

    risk_store(store).override(decision(RiskAction.BLOCK, decided_at=utc(START + 1)))
    endpoint.view.refresh()
    _, overridden = ask(endpoint, f"/v1/risk/{MODEL}/client-a")
    assert (overridden["action"], overridden["actor"]) == ("block", "alice")
    assert overridden["alert_ids"] == [opened.alert.id]  # the incident behind it is still named

    assert ask(endpoint, "/v1/risk/only-a-model")[0] == 404
    assert ask(endpoint, "/metrics")[0] == 404


def test_percent_encoded_ids_and_the_bearer_token(store: Store, clock: FakeClock) -> None:
    risk_store(store).override(decision(client_id="team/job 7"))
    view = RiskView(risk_store(store).decisions, clock)
    view.refresh()
    guarded = RiskEndpoint(view, "127.0.0.1", 0, token="s3cret").start()
    try:
        assert ask(guarded, f"/v1/risk/{MODEL}/team%2Fjob%207")[0] == 401
        assert ask(guarded, f"/v1/risk/{MODEL}/team%2Fjob%207", token="wrong")[0] == 401
        status, answer = ask(guarded, f"/v1/risk/{MODEL}/team%2Fjob%207", token="s3cret")
        assert (status, answer["client_id"], answer["action"]) == (200, "team/job 7", "block")
    finally:
        guarded.close()


def test_a_failed_refresh_keeps_serving_the_last_decisions(clock: FakeClock) -> None:
    reads: list[list[RiskDecision] | Exception] = [[decision()], ConnectionError("database gone")]

    def read() -> list[RiskDecision]:
        outcome = reads.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    view = RiskView(read, clock)
    assert view.refresh() is True
    assert view.refresh() is False
    assert view.document(MODEL, "client-a")["action"] == "block"


def test_the_feed_tells_its_metrics_when_it_refreshed_what_is_in_force_and_what_failed(
    store: Store, alerts: Alerts, clock: FakeClock
) -> None:
    alerts.upsert([detection(severity=Severity.HIGH), detection("client-b", severity=Severity.CRITICAL)])
    reads = iter([risk_store(store).decisions()])

    def read() -> list[RiskDecision]:
        return next(reads)  # then StopIteration: the database gone

    def publish(in_force: InForce) -> None:
        raise ConnectionError("broker gone")

    metrics = Metrics()
    sample = metrics.registry.get_sample_value
    before = time.time()
    feed = RiskFeed(RiskView(read, clock), 0.02, [publish], metrics).start()
    try:
        wait_until(
            lambda: (sample("mia_detector_risk_refresh_failures_total") or 0) >= 2, 10, "failed refreshes"
        )
    finally:
        feed.close()
    assert (sample("mia_detector_risk_refreshed_timestamp_seconds") or 0) >= before
    in_force = {
        action: sample("mia_detector_risk_decisions_in_force", {"action": action}) for action in RISK_ACTIONS
    }
    assert sum(in_force.values()) == 2 and in_force["throttle"] == 0  # type: ignore[arg-type]
    assert sample("mia_detector_risk_publish_failures_total") == 1  # the one refresh that succeeded


@pytest.mark.kafka
def test_the_topic_gets_each_change_once_and_a_tombstone_when_a_client_goes_back_to_allow(
    broker: EmbeddedBroker, alerts: Alerts, store: Store, clock: FakeClock, tmp_path: Path
) -> None:
    settings = make_settings(f"sqlite:///{tmp_path / 'unused.db'}", broker)
    topic = unique("risk")
    ensure_topic(settings.kafka, topic, 1, configs=TOPIC_CONFIGS)
    view = RiskView(risk_store(store).decisions, clock)
    publisher = KafkaPublisher(settings.kafka)
    metrics = Metrics()
    try:
        [opened] = alerts.upsert([detection(severity=Severity.HIGH)])
        alerts.upsert([detection("client-b", severity=Severity.HIGH)])
        view.refresh()
        RiskTopic(publisher, topic, {})(view.in_force())
        held = latest_values(settings.kafka, topic)
        assert {orjson.loads(key)[1]: orjson.loads(value)["action"] for key, value in held.items()} == {
            "client-a": "coarsen",
            "client-b": "coarsen",
        }

        # A later process: it starts from what the topic holds, and publishes only what changed since.
        alerts.resolve(opened.alert.id)
        view.refresh()
        RiskTopic(publisher, topic, held, metrics)(view.in_force())
        assert set(latest_values(settings.kafka, topic)) == {risk_key(MODEL, "client-b")}
        sent_before = _records(settings, topic)
        RiskTopic(publisher, topic, latest_values(settings.kafka, topic))(view.in_force())  # nothing changed
        assert _records(settings, topic) == sent_before == 3  # two decisions, one tombstone
        published = metrics.registry.get_sample_value
        assert published("mia_detector_risk_records_published_total", {"record": "tombstone"}) == 1
        assert published("mia_detector_risk_records_published_total", {"record": "decision"}) == 0
    finally:
        publisher.close()


def _records(settings: Settings, topic: str) -> int:
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers)
    try:
        partition = TopicPartition(topic, 0)
        return int(consumer.end_offsets([partition])[partition])
    finally:
        consumer.close()


# -- end to end: the daemon on the broker --------------------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.slow
def test_the_daemon_serves_the_policys_action_for_attackers_and_allow_for_the_others(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    simulate("smoke", 3, tmp_path / "scenario")
    truth = [orjson.loads(line) for line in (tmp_path / "scenario" / "truth.jsonl").read_bytes().splitlines()]
    port = free_port()
    settings = make_settings(
        f"sqlite:///{tmp_path / 'mia.db'}",
        broker,
        alerts={"resolve_after_seconds": 86_400},
        risk={"addr": f"127.0.0.1:{port}", "refresh_seconds": 0.2, "topic": unique("risk")},
    ).model_copy(update={"training_index": index_training_sets(tmp_path / "scenario", tmp_path / "indexes")})
    # Trained on the baseline and its suggested allow-list accepted, as an operator does: the owner's
    # re-scoring jobs are known business.
    settings, _ = train_as_operator(settings, tmp_path / "scenario" / "baseline.jsonl", tmp_path / "model")
    events = tmp_path / "scenario" / "events.jsonl"
    records = len(events.read_bytes().splitlines())
    produce_file(settings, events, settings.kafka.topics[0])
    stop = StopFlag()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(run_daemon, settings, stop)
        try:
            wait_until(lambda: _all_read(settings, records), 120, "the stream to be stored")
            time.sleep(0.5)  # a refresh of the view after the last commit
            with open_store(settings) as store:
                stored = RiskStore(store.engine).decisions()
            answers = {
                entry["client_id"]: _answer(port, entry["model"], entry["client_id"]) for entry in truth
            }
        finally:
            stop.set()
        running.result(timeout=60)

    attackers = {entry["client_id"] for entry in truth if entry["role"] == "attacker"}
    decided = {d.client_id for d in stored}
    published = latest_values(settings.kafka, settings.risk.topic)
    assert {tuple(orjson.loads(key)) for key in published} == {(d.model, d.client_id) for d in stored}
    assert decided and decided <= attackers, (decided, attackers)  # no benign client loses anything
    for client_id, answer in answers.items():
        expected = in_force([d for d in stored if d.client_id == client_id], utc(time.time()))[0]
        assert answer["action"] == (expected.action.value if expected else "allow"), (client_id, answer)
    assert {answers[client]["action"] for client in decided} <= {"coarsen", "throttle", "block"}


def _answer(port: int, model: str, client_id: str) -> dict[str, Any]:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}/v1/risk/{model}/{client_id}", timeout=5
    ) as response:
        answer: dict[str, Any] = orjson.loads(response.read())
        return answer


def _all_read(settings: Settings, records: int) -> bool:
    with open_store(settings) as store:
        return store.count_seen_events() >= records


# -- the commands --------------------------------------------------------------------------------------------


def test_risk_set_list_clear_and_audit_as_an_operator_runs_them(tmp_path: Path) -> None:
    env = cli_env(MIA_DATABASE_URL=f"sqlite:///{tmp_path / 'mia.db'}", USER="alice")
    made = mia("risk", "set", MODEL, "c-1", "--action", "throttle", "--rpm", "6", "--for", "2h",
               "--reason", "probing the boundary", env=env)  # fmt: skip
    assert made.returncode == 0, made.stderr
    [row] = [
        orjson.loads(line) for line in mia("risk", "list", "--format", "jsonl", env=env).stdout.splitlines()
    ]
    assert (row["client_id"], row["action"], row["parameters"], row["actor"]) == (
        "c-1",
        "throttle",
        {"requests_per_minute": 6},
        "alice",
    )

    cleared = mia("risk", "clear", MODEL, "c-1", "--reason", "false alarm", "--by", "bob", env=env)
    assert cleared.returncode == 0, cleared.stderr
    assert mia("risk", "list", "--format", "jsonl", env=env).stdout == ""
    audit = [
        orjson.loads(line) for line in mia("risk", "audit", "--format", "jsonl", env=env).stdout.splitlines()
    ]
    assert [(entry["change"], entry["actor"], entry["reason"]) for entry in audit] == [
        ("cleared", "bob", "false alarm"),
        ("overridden", "alice", "probing the boundary"),
    ]
    again = mia("risk", "clear", MODEL, "c-1", "--reason", "again", env=env)
    assert again.returncode == 1 and "nothing cleared" in again.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--action", "coarsen"], "coarsen takes a coarsening"),
        (["--action", "block", "--rpm", "5"], "block takes no parameters"),
        (["--action", "block", "--for", "soon"], "is not a duration"),
        (["--action", "block"], "Missing option '--reason'"),
    ],
)
def test_a_bad_risk_decision_is_refused_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    env = cli_env(MIA_DATABASE_URL=f"sqlite:///{tmp_path / 'mia.db'}")
    reason = [] if "--reason" in message else ["--reason", "r"]
    refused = mia("risk", "set", MODEL, "c-1", *args, *reason, env=env)
    assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) <= 2 and "Traceback" not in refused.stderr
