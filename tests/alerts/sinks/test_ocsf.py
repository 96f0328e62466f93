"""The SIEM sinks: OCSF Detection Findings that validate against OCSF 1.6.0, a JSON Lines file that takes a
retry or a crash without a duplicate line, and a Kafka topic on the embedded broker.

Findings are validated with pydantic-ocsf's models of the OCSF 1.6.0 schema (required attributes, types,
enum values, captions matching their ids, `type_uid`), plus what those models let pass: attributes the
schema does not define, and its "at least one of" constraints.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from ocsf.v1_6_0.events import DetectionFinding
from pydantic import BaseModel

from detector.alerts.sinks import ocsf
from detector.alerts.sinks.base import DeliveryError
from detector.alerts.sinks.ocsf import OcsfFileSink, OcsfKafkaSink, detection_finding, finding_uid
from detector.broker import EmbeddedBroker, free_port
from detector.domain import Notification, NotificationEvent, Severity
from detector.settings import KafkaSettings
from tests.support import canary_miss_and_recovery, make_notification, unique

VERSION = "9.8.7"
EVENTS = list(NotificationEvent)
ALERTING = {
    NotificationEvent.OPENED,
    NotificationEvent.UPDATED,
    NotificationEvent.ESCALATED,
    NotificationEvent.CANARY_MISSED,
}
# Event -> (activity_id, status_id): 1 Create / 2 Update / 3 Close; 1 New / 2 In Progress / 4 Resolved.
LIFECYCLE = {
    NotificationEvent.OPENED: (1, 1),
    NotificationEvent.TEST: (1, 1),
    NotificationEvent.UPDATED: (2, 1),
    NotificationEvent.ESCALATED: (2, 1),
    NotificationEvent.ACKNOWLEDGED: (2, 2),
    NotificationEvent.RESOLVED: (3, 4),
    NotificationEvent.CANARY_MISSED: (1, 1),
    NotificationEvent.CANARY_RECOVERED: (3, 4),
}


def notification_of(event: NotificationEvent, **overrides: Any) -> Notification:
    """A realistic notification of `event` (an escalation from medium to high)."""
    if event is NotificationEvent.ESCALATED:
        overrides = {"severity": Severity.HIGH, "previous_severity": Severity.MEDIUM, **overrides}
    return make_notification(event, **overrides)


def with_alert(notification: Notification, **changes: Any) -> Notification:
    """`notification` with some fields of its alert snapshot changed."""
    return notification.model_copy(update={"alert": notification.alert.model_copy(update=changes)})


def finding_of(notification: Notification) -> dict[str, Any]:
    return detection_finding(notification, product_version=VERSION)


def epoch_ms(moment: datetime) -> int:
    return int(moment.timestamp()) * 1000 + moment.microsecond // 1000


# --- Validation against the OCSF 1.6.0 schema -----------------------------------------------------------


def _schema() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((resources.files("ocsf") / "schemas" / "v1_6_0.json").read_text())
    assert data["version"] == "1.6.0"
    return data


SCHEMA = _schema()


def unknown_attributes(value: Any, path: str = "$") -> list[str]:
    """Attributes the schema does not define (pydantic-ocsf keeps them as extras), `unmapped` aside."""
    found: list[str] = []
    if isinstance(value, BaseModel):
        found += [f"{path}.{name}" for name in value.model_extra or {} if not path.endswith(".unmapped")]
        for name in type(value).model_fields:
            found += unknown_attributes(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += unknown_attributes(item, f"{path}[{index}]")
    return found


def assert_valid_ocsf(finding: dict[str, Any]) -> None:
    """`finding` is an OCSF 1.6.0 Detection Finding."""
    model = DetectionFinding.model_validate(finding)
    assert unknown_attributes(model) == []
    assert finding["metadata"]["version"] == "1.6.0"
    objects = SCHEMA["objects"]
    for evidence in finding["evidences"]:
        assert evidence.keys() & set(objects["evidences"]["constraints"]["at_least_one"]), evidence
    for attack in finding["finding_info"]["attacks"]:
        assert attack.keys() & set(objects["attack"]["constraints"]["at_least_one"]), attack
    # The finding survives JSON Lines: plain JSON, no NaN.
    assert orjson.loads(orjson.dumps(finding)) == finding


def test_the_validator_rejects_a_broken_finding() -> None:
    finding = finding_of(notification_of(NotificationEvent.OPENED))
    for broken in (
        {**finding, "type_uid": 200403},  # not class_uid * 100 + activity_id
        {**finding, "severity": "Low"},  # not the caption of severity_id 4
        {**finding, "status_id": 7},
        {**finding, "finding_info": {"title": "no uid"}},
    ):
        with pytest.raises(ValueError):
            DetectionFinding.model_validate(broken)
    with pytest.raises(AssertionError):
        assert_valid_ocsf({**finding, "sevrity": "High"})  # an attribute OCSF does not define


# --- The finding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("event", EVENTS)
def test_every_event_is_a_valid_finding(event: NotificationEvent) -> None:
    assert_valid_ocsf(finding_of(notification_of(event)))


@pytest.mark.parametrize("event", EVENTS)
def test_every_event_maps_to_its_activity_and_status(event: NotificationEvent) -> None:
    finding = finding_of(notification_of(event))
    activity_id, status_id = LIFECYCLE[event]
    assert (finding["class_uid"], finding["category_uid"]) == (2004, 2)
    assert finding["activity_id"] == activity_id
    assert finding["activity_name"] == {1: "Create", 2: "Update", 3: "Close"}[activity_id]
    assert finding["type_uid"] == 2004 * 100 + activity_id
    assert finding["status_id"] == status_id
    assert finding["status"] == {1: "New", 2: "In Progress", 4: "Resolved"}[status_id]
    assert finding["is_alert"] is (event in ALERTING)
    assert finding["metadata"]["event_code"] == event.value


def test_an_acknowledged_alert_stays_in_progress_on_later_updates() -> None:
    for event in (NotificationEvent.UPDATED, NotificationEvent.ESCALATED):
        acknowledged = with_alert(notification_of(event), acknowledged_at=datetime.now(UTC))
        assert finding_of(acknowledged)["status_id"] == 2
    resolved = with_alert(notification_of(NotificationEvent.RESOLVED), acknowledged_at=datetime.now(UTC))
    assert finding_of(resolved)["status_id"] == 4


@pytest.mark.parametrize(
    ("severity", "severity_id", "caption", "risk_level_id"),
    [
        (Severity.LOW, 2, "Low", 1),
        (Severity.MEDIUM, 3, "Medium", 2),
        (Severity.HIGH, 4, "High", 3),
        (Severity.CRITICAL, 5, "Critical", 4),
    ],
)
def test_severities(severity: Severity, severity_id: int, caption: str, risk_level_id: int) -> None:
    finding = finding_of(notification_of(NotificationEvent.OPENED, severity=severity))
    assert (finding["severity_id"], finding["severity"]) == (severity_id, caption)
    assert (finding["risk_level_id"], finding["risk_level"]) == (risk_level_id, caption)
    assert_valid_ocsf(finding)


def test_the_atlas_technique_is_in_the_finding() -> None:
    finding = finding_of(notification_of(NotificationEvent.OPENED))
    [attack] = finding["finding_info"]["attacks"]
    assert attack["technique"]["uid"] == "AML.T0024"
    assert attack["technique"]["name"] == "Exfiltration via ML Inference API"
    assert attack["tactic"] == {"uid": "AML.TA0010", "name": "Exfiltration"}
    assert "sub_technique" not in attack


def test_a_sub_technique_comes_with_its_parent() -> None:
    notification = with_alert(notification_of(NotificationEvent.OPENED), atlas_technique="AML.T0024.000")
    finding = finding_of(notification)
    [attack] = finding["finding_info"]["attacks"]
    assert attack["technique"]["uid"] == "AML.T0024"
    assert attack["sub_technique"]["uid"] == "AML.T0024.000"
    assert attack["sub_technique"]["name"] == "Infer Training Data Membership"
    assert attack["tactic"]["uid"] == "AML.TA0010"
    assert_valid_ocsf(finding)


def test_an_unknown_technique_keeps_its_id() -> None:
    finding = finding_of(with_alert(notification_of(NotificationEvent.OPENED), atlas_technique="AML.T0040"))
    assert finding["finding_info"]["attacks"] == [{"technique": {"uid": "AML.T0040"}}]
    assert_valid_ocsf(finding)


def test_every_notification_of_an_alert_is_one_finding() -> None:
    alert_events = [event for event in EVENTS if event is not NotificationEvent.TEST]
    [uid] = {finding_uid(notification_of(event, sequence=i)) for i, event in enumerate(alert_events)}
    other_alert = notification_of(NotificationEvent.OPENED, alert_id=8, client_ids=("client-18",))
    reopened = notification_of(NotificationEvent.OPENED, alert_id=9)  # same behaviour, a new alert
    assert finding_of(other_alert)["finding_info"]["uid"] != uid
    assert finding_of(reopened)["finding_info"]["uid"] != uid
    # Each test notification is a finding of its own, never one of a real alert.
    first, second = (finding_uid(notification_of(NotificationEvent.TEST, sequence=i)) for i in (1, 2))
    assert len({first, second, uid}) == 3


def test_a_canary_recovery_closes_the_finding_of_the_miss() -> None:
    missed, recovered = (finding_of(notification) for notification in canary_miss_and_recovery())
    assert recovered["finding_info"]["uid"] == missed["finding_info"]["uid"]
    assert (missed["activity_name"], missed["status"], missed["is_alert"]) == ("Create", "New", True)
    assert (recovered["activity_name"], recovered["status"], recovered["is_alert"]) == (
        "Close",
        "Resolved",
        False,
    )
    assert recovered["metadata"]["event_code"] == "canary_recovered"
    assert recovered["finding_info"]["title"].startswith("[CANARY RECOVERED] ")
    assert_valid_ocsf(recovered)


def test_metadata_names_the_notification_and_the_product() -> None:
    notification = notification_of(NotificationEvent.UPDATED, sequence=4)
    metadata = finding_of(notification)["metadata"]
    assert metadata["uid"] == notification.idempotency_key == "mia-7-4"
    assert metadata["product"] == {"name": "mia-detector", "vendor_name": "mia-detector", "version": VERSION}


def test_times_are_epoch_milliseconds() -> None:
    notification = notification_of(NotificationEvent.UPDATED)
    alert = notification.alert
    finding = finding_of(notification)
    info = finding["finding_info"]
    assert finding["time"] == info["modified_time"] == epoch_ms(notification.created_at)
    assert info["created_time"] == epoch_ms(alert.raised_at)
    assert finding["start_time"] == info["first_seen_time"] == epoch_ms(alert.first_seen)
    assert finding["end_time"] == info["last_seen_time"] == epoch_ms(alert.last_seen)
    naive = with_alert(notification, raised_at=datetime(2026, 1, 2, 3, 4, 5, 678000))
    assert finding_of(naive)["finding_info"]["created_time"] == 1_767_323_045_678


def test_the_finding_carries_the_alert() -> None:
    notification = notification_of(NotificationEvent.ESCALATED, client_ids=("client-17", "client-21"))
    alert = notification.alert
    finding = finding_of(notification)
    info = finding["finding_info"]
    assert info["title"] == notification.title
    assert info["types"] == ["training_set_targeting"]
    assert info["analytic"] == {"name": "MIA-003", "uid": "MIA-003", "type_id": 1, "type": "Rule"}
    assert info["uid_alt"] == "7"
    assert info["src_url"] == notification.dashboard_url
    assert "distinct_training_hits = 57 (p99.9 of baseline)" in info["desc"]
    assert finding["message"] == notification.summary
    assert finding["remediation"] == {"desc": alert.triage}
    assert finding["count"] == 136
    assert finding["resources"] == [{"name": "credit-risk", "type": "ML Model"}]
    evidences = finding["evidences"]
    assert [e["actor"]["user"]["uid"] for e in evidences if "actor" in e] == ["client-17", "client-21"]
    assert [e["uid"] for e in evidences if "uid" in e] == alert.evidence
    unmapped = finding["unmapped"]
    assert (unmapped["score"], unmapped["threshold"]) == (0.42, 0.1)
    assert unmapped["reasons"][1] == {
        "feature": "distinct_training_hits",
        "value": 57.0,
        "baseline_percentile": 99.9,
        "text": "distinct_training_hits = 57 (p99.9 of baseline)",
    }
    assert unmapped["previous_severity"] == "medium"
    assert (unmapped["alert_id"], unmapped["dedup_key"], unmapped["client_count"]) == (7, alert.dedup_key, 2)
    assert_valid_ocsf(finding)


def test_what_is_missing_is_left_out() -> None:
    notification = with_alert(
        notification_of(NotificationEvent.OPENED, dashboard_url=None), triage="", evidence=[]
    )
    finding = finding_of(notification)
    assert "src_url" not in finding["finding_info"] and "remediation" not in finding
    assert "previous_severity" not in finding["unmapped"]
    assert [e["name"] for e in finding["evidences"]] == ["client"]
    assert_valid_ocsf(finding)


def test_a_test_notification_is_marked_and_alerts_nobody() -> None:
    finding = finding_of(notification_of(NotificationEvent.TEST))
    assert finding["finding_info"]["title"].startswith("[TEST] ")
    assert finding["metadata"]["labels"] == ["test"]
    assert finding["is_alert"] is False
    assert "uid_alt" not in finding["finding_info"]


def test_a_large_group_lists_its_first_clients() -> None:
    clients = tuple(f"client-{i:04d}" for i in range(250))
    finding = finding_of(notification_of(NotificationEvent.OPENED, client_ids=clients))
    listed = [e["actor"]["user"]["uid"] for e in finding["evidences"] if "actor" in e]
    assert listed == list(clients[: ocsf.MAX_CLIENTS])
    assert finding["unmapped"]["client_count"] == 250


def test_findings_are_deterministic() -> None:
    notification = notification_of(NotificationEvent.ESCALATED)
    assert orjson.dumps(finding_of(notification)) == orjson.dumps(finding_of(notification))


# --- OcsfFileSink --------------------------------------------------------------------------------------


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def line_of(notification: Notification) -> bytes:
    return orjson.dumps(finding_of(notification)) + b"\n"


def test_file_sink_appends_one_finding_a_line(tmp_path: Path) -> None:
    path = tmp_path / "siem" / "nested" / "findings.jsonl"  # directories created
    sink = OcsfFileSink(path, product_version=VERSION)
    sent = [notification_of(event, sequence=i) for i, event in enumerate(EVENTS)]
    for notification in sent:
        sink.deliver(notification)
    sink.close()
    written = lines(path)
    assert [f["metadata"]["uid"] for f in written] == [n.idempotency_key for n in sent]
    assert written == [finding_of(n) for n in sent]
    for finding in written:
        assert_valid_ocsf(finding)


def test_redelivery_writes_one_line(tmp_path: Path) -> None:
    path = tmp_path / "findings.jsonl"
    notification = notification_of(NotificationEvent.OPENED)
    sink = OcsfFileSink(path, product_version=VERSION)
    sink.deliver(notification)
    sink.deliver(notification)
    OcsfFileSink(path, product_version=VERSION).deliver(notification)  # after a restart
    assert path.read_bytes() == line_of(notification)


def test_a_file_whose_last_line_is_the_notification_is_not_appended_to(tmp_path: Path) -> None:
    # A crash after the write and before the outbox marked the notification delivered.
    path = tmp_path / "findings.jsonl"
    earlier = [
        notification_of(NotificationEvent.OPENED, sequence=1),
        notification_of(NotificationEvent.UPDATED, sequence=2),
    ]
    crashed = notification_of(NotificationEvent.ESCALATED, sequence=3)
    content = b"".join(line_of(n) for n in [*earlier, crashed])
    path.write_bytes(content)
    OcsfFileSink(path, product_version="another version").deliver(crashed)
    assert path.read_bytes() == content


def test_an_existing_file_is_appended_to(tmp_path: Path) -> None:
    path = tmp_path / "findings.jsonl"
    previous_run = line_of(notification_of(NotificationEvent.OPENED, sequence=1))
    path.write_bytes(previous_run)
    later = notification_of(NotificationEvent.RESOLVED, sequence=2)
    OcsfFileSink(path, product_version=VERSION).deliver(later)
    assert path.read_bytes() == previous_run + line_of(later)


def test_a_line_cut_short_by_a_crash_is_ended_before_the_retry(tmp_path: Path) -> None:
    path = tmp_path / "findings.jsonl"
    first = notification_of(NotificationEvent.OPENED, sequence=1)
    torn = notification_of(NotificationEvent.UPDATED, sequence=2)
    path.write_bytes(line_of(first) + line_of(torn)[:150])
    OcsfFileSink(path, product_version=VERSION).deliver(torn)
    head, cut, retried = path.read_bytes().splitlines()
    assert orjson.loads(head) == finding_of(first)
    assert cut == line_of(torn)[:150]
    assert orjson.loads(retried) == finding_of(torn)


def test_a_last_line_longer_than_the_tail_window_is_found(tmp_path: Path) -> None:
    path = tmp_path / "findings.jsonl"
    long = with_alert(notification_of(NotificationEvent.OPENED), triage="x" * (3 * ocsf.TAIL_BYTES))
    sink = OcsfFileSink(path, product_version=VERSION)
    sink.deliver(notification_of(NotificationEvent.OPENED, sequence=0))
    sink.deliver(long)
    sink.deliver(long)
    assert [f["metadata"]["uid"] for f in lines(path)] == ["mia-7-0", "mia-7-1"]


def test_deliver_returns_once_the_line_is_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "findings.jsonl"
    notification = notification_of(NotificationEvent.OPENED)
    synced: list[bytes] = []  # the file's content at each fsync
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(path.read_bytes())

    monkeypatch.setattr(os, "fsync", fsync)
    OcsfFileSink(path, product_version=VERSION).deliver(notification)
    assert line_of(notification) in synced


@pytest.mark.parametrize("obstacle", ["file-as-directory", "directory-as-file"])
def test_an_unwritable_path_is_a_transient_error(tmp_path: Path, obstacle: str) -> None:
    if obstacle == "file-as-directory":
        blocker = tmp_path / "siem"
        blocker.write_text("not a directory")
        path = blocker / "findings.jsonl"
    else:
        blocker = path = tmp_path / "findings.jsonl"
        path.mkdir()
    sink = OcsfFileSink(path, product_version=VERSION)
    notification = notification_of(NotificationEvent.OPENED)
    with pytest.raises(DeliveryError) as raised:
        sink.deliver(notification)
    assert not raised.value.permanent
    assert str(raised.value).startswith(f"ocsf-file: cannot append to {path}: ")
    # The operator clears the way; the retry succeeds.
    if blocker.is_dir():
        blocker.rmdir()
    else:
        blocker.unlink()
    sink.deliver(notification)
    assert path.read_bytes() == line_of(notification)


def test_file_sink_close_is_safe_twice(tmp_path: Path) -> None:
    sink = OcsfFileSink(tmp_path / "findings.jsonl")
    assert sink.name == "ocsf-file"
    sink.deliver(notification_of(NotificationEvent.TEST))
    sink.close()
    sink.close()
    [finding] = lines(tmp_path / "findings.jsonl")
    assert finding["metadata"]["product"]["version"]  # the installed package's version by default


# --- OcsfKafkaSink -------------------------------------------------------------------------------------


def create_topic(bootstrap_servers: str, topic: str, partitions: int) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()


def partitions_of(bootstrap_servers: str, topic: str) -> set[int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers)
    try:
        return set(consumer.partitions_for_topic(topic) or ())
    finally:
        consumer.close()


def consume(bootstrap_servers: str, topic: str, expected: int, timeout: float = 20.0) -> list[Any]:
    """The records of `topic` from its beginning, once `expected` have arrived, and any more that arrive
    within a second (so that a duplicate shows). Reads every partition, outside any consumer group."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False)
    records: list[Any] = []
    try:
        assigned = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(assigned)
        consumer.seek_to_beginning(*assigned)
        deadline = time.monotonic() + timeout
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        for batch in consumer.poll(timeout_ms=1000).values():
            records.extend(batch)
    finally:
        consumer.close()
    return records


@pytest.fixture
def kafka_sink(broker: EmbeddedBroker) -> Iterator[OcsfKafkaSink]:
    sink = OcsfKafkaSink(
        KafkaSettings(bootstrap_servers=broker.bootstrap_servers), unique("ocsf"), product_version=VERSION
    )
    yield sink
    sink.close()


@pytest.mark.kafka
def test_kafka_sink_sends_each_finding_keyed_by_its_alerts_finding_in_order(
    broker: EmbeddedBroker, kafka_sink: OcsfKafkaSink
) -> None:
    # The test notification, keyed apart and so maybe in another partition, last: as it is read back.
    events = sorted(EVENTS, key=lambda event: event is NotificationEvent.TEST)
    sent = [notification_of(event, sequence=i) for i, event in enumerate(events)]
    for notification in sent:
        kafka_sink.deliver(notification)
    records = consume(broker.bootstrap_servers, kafka_sink.topic, len(sent))
    assert len(records) == len(sent)
    # One alert, one key (the test notification has its own): its findings share a partition, in order.
    assert [record.key.decode() for record in records] == [finding_uid(n) for n in sent]
    assert len({finding_uid(n) for n in sent if n.event is not NotificationEvent.TEST}) == 1
    received = [orjson.loads(record.value) for record in records]
    assert received == [finding_of(n) for n in sent]
    for notification, finding in zip(sent, received, strict=True):
        assert finding["metadata"]["uid"] == notification.idempotency_key
        assert_valid_ocsf(finding)


@pytest.mark.kafka
def test_kafka_redelivery_repeats_the_key_and_the_finding(
    broker: EmbeddedBroker, kafka_sink: OcsfKafkaSink
) -> None:
    notification = notification_of(NotificationEvent.OPENED)
    kafka_sink.deliver(notification)
    kafka_sink.deliver(notification)
    records = consume(broker.bootstrap_servers, kafka_sink.topic, 2)
    key = finding_uid(notification).encode()
    assert [(r.key, r.value) for r in records] == [(key, orjson.dumps(finding_of(notification)))] * 2


@pytest.fixture
def refused_connections(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """For tests where brokers refuse connections: kafka-python 3.0.12 leaves the socket of a refused
    connection open (`sock_connect` raises without closing it). Its log records, which carry the
    exception, are kept out of the captured logs (which would keep the sockets alive to the end of the
    session), and the sockets are collected quietly after the test: with `filterwarnings = error` their
    ResourceWarning would fail whichever later test the garbage collector happened to run in."""
    caplog.set_level(logging.CRITICAL, logger="kafka")
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.mark.kafka
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.usefixtures("refused_connections")
def test_an_unreachable_broker_is_a_transient_error_within_the_timeout() -> None:
    address = f"127.0.0.1:{free_port()}"
    sink = OcsfKafkaSink(KafkaSettings(bootstrap_servers=address), "findings", timeout=1.0)
    try:
        for _ in range(2):  # the first attempt, and a retry
            started = time.monotonic()
            with pytest.raises(DeliveryError) as raised:
                sink.deliver(notification_of(NotificationEvent.OPENED))
            assert time.monotonic() - started < 5.0
            assert not raised.value.permanent
            message = str(raised.value)
            assert message.startswith("ocsf-kafka: topic findings: ") and address not in message
    finally:
        sink.close()
        sink.close()


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.usefixtures("refused_connections")
def test_a_broker_that_comes_back_gets_the_retry(tmp_path: Path) -> None:
    with EmbeddedBroker(log_file=tmp_path / "tansu.log") as own_broker:
        servers = own_broker.bootstrap_servers
        sink = OcsfKafkaSink(KafkaSettings(bootstrap_servers=servers), "findings", timeout=2.0)
        try:
            sink.deliver(notification_of(NotificationEvent.OPENED, sequence=1))
            count = len(partitions_of(servers, "findings"))
            own_broker.stop()
            held = notification_of(NotificationEvent.UPDATED, sequence=2)
            started = time.monotonic()
            with pytest.raises(DeliveryError) as raised:
                sink.deliver(held)
            assert not raised.value.permanent and time.monotonic() - started < 10.0
            own_broker.start()  # on the same port
            # The embedded broker keeps topics in memory: make the topic again, as a real broker would
            # still have it (the producer knows its partitions from before the outage).
            create_topic(servers, "findings", count)
            deadline = time.monotonic() + 30.0
            while True:  # as the dispatcher retries
                try:
                    sink.deliver(held)
                    break
                except DeliveryError:
                    assert time.monotonic() < deadline, "the sink did not recover"
                    time.sleep(0.5)
        finally:
            sink.close()
        [record] = consume(servers, "findings", 1)
        assert orjson.loads(record.value)["metadata"]["uid"] == held.idempotency_key


def test_kafka_sink_connects_on_first_delivery() -> None:
    # Building the sinks (say, to list alerts) must not need a broker, nor wait for one.
    started = time.monotonic()
    sink = OcsfKafkaSink(KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}"), "findings")
    assert sink.name == "ocsf-kafka"
    sink.close()
    assert time.monotonic() - started < 0.5
