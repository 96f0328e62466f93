"""SIEM sinks: every notification as an OCSF *Detection Finding* (class 2004), in a JSON Lines file or on a
Kafka topic.

One alert is one finding: `finding_info.uid` is the same on every notification of the alert. Each
notification is one event in that finding's life: `activity_id` 1 Create (opened, canary_missed), 2 Update
(updated, escalated, acknowledged) or 3 Close (resolved, canary_recovered), with `status_id` New, In Progress
once acknowledged, and Resolved. The canaries' misses of one kind are one finding, which `canary_recovered`
closes. `metadata.uid` is the notification's idempotency key, the same on every delivery attempt, so a SIEM
can drop a duplicate; `metadata.event_code` names the notification event (`escalated`, ...).

The MITRE ATLAS technique of the alert (AML.T0024, Exfiltration via ML Inference API, tactic AML.TA0010
Exfiltration) is in `finding_info.attacks`: OCSF's attack object holds ATT&CK and ATLAS ids alike. The client
ids are `evidences[].actor.user.uid`, the event ids of the newest queries behind the alert are
`evidences[].uid`, the model is in `resources`. What OCSF has no attribute for (score, threshold, the reasons)
is in `unmapped`.

The findings follow OCSF 1.6.0 (https://schema.ocsf.io/1.6.0/classes/detection_finding). The title, message
and description show names as `display_name` shows them (one line, control characters as escapes); the
ids in evidences and resources are kept as they are. No string of a finding is longer than
`MAX_STRING_CHARS` characters, and the JSON written has every character printable (`detector.text.json_line`).
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

import orjson
from kafka import KafkaProducer
from kafka.errors import KafkaError

from detector import __version__
from detector.alerts.sinks.base import DeliveryError, bounded, epoch_ms
from detector.domain import PRODUCT, Notification, NotificationEvent, Severity
from detector.kafka import client_options
from detector.kafka.connect import KafkaUnreachable, check_connection
from detector.settings import KafkaSettings
from detector.text import json_line

log = logging.getLogger(__name__)

OCSF_VERSION = "1.6.0"
VENDOR = "mia-detector"
CATEGORY_UID = 2  # Findings
CLASS_UID = 2004  # Detection Finding

# Client ids listed as evidence; a large coordinated group is cut (`unmapped.client_count` has its size).
MAX_CLIENTS = 100
# How much of the end of the file is searched for a notification already written (grown when the last line
# is longer).
TAIL_BYTES = 64 * 1024

# finding_info.uid is a UUID derived from the alert, so that it is the same on every notification of it.
_FINDING_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:mia-detector:ocsf:finding")

# activity_id: 1 Create, 2 Update, 3 Close.
_ACTIVITIES: dict[NotificationEvent, tuple[int, str]] = {
    NotificationEvent.OPENED: (1, "Create"),
    NotificationEvent.TEST: (1, "Create"),
    NotificationEvent.UPDATED: (2, "Update"),
    NotificationEvent.ESCALATED: (2, "Update"),
    NotificationEvent.ACKNOWLEDGED: (2, "Update"),
    NotificationEvent.RESOLVED: (3, "Close"),
    NotificationEvent.CANARY_MISSED: (1, "Create"),
    NotificationEvent.CANARY_RECOVERED: (3, "Close"),
}
# Events that report an attack going on, or detection gone blind (a missed canary); acknowledgements,
# resolutions (canary_recovered among them) and tests are no alertable signal.
_ALERTING = frozenset(
    {
        NotificationEvent.OPENED,
        NotificationEvent.UPDATED,
        NotificationEvent.ESCALATED,
        NotificationEvent.CANARY_MISSED,
    }
)
_SEVERITIES: dict[Severity, tuple[int, str]] = {
    Severity.LOW: (2, "Low"),
    Severity.MEDIUM: (3, "Medium"),
    Severity.HIGH: (4, "High"),
    Severity.CRITICAL: (5, "Critical"),
}
# risk_level_id runs one below severity_id: 1 Low, 2 Medium, 3 High, 4 Critical.
_RISK_LEVELS: dict[Severity, tuple[int, str]] = {
    Severity.LOW: (1, "Low"),
    Severity.MEDIUM: (2, "Medium"),
    Severity.HIGH: (3, "High"),
    Severity.CRITICAL: (4, "Critical"),
}
_STATUS_NEW = (1, "New")
_STATUS_IN_PROGRESS = (2, "In Progress")
_STATUS_RESOLVED = (4, "Resolved")

# MITRE ATLAS techniques the detector reports, with their tactic. An id not listed here is reported with
# its uid alone.
_EXFILTRATION = {"uid": "AML.TA0010", "name": "Exfiltration"}
_ATLAS_TECHNIQUES: dict[str, str] = {
    "AML.T0024": "Exfiltration via ML Inference API",
    "AML.T0024.000": "Infer Training Data Membership",
}
_ATLAS_URL = "https://atlas.mitre.org/techniques/"


def detection_finding(notification: Notification, *, product_version: str) -> dict[str, Any]:
    """`notification` as an OCSF 1.6.0 Detection Finding, a JSON-ready dict whose strings have at most
    `MAX_STRING_CHARS` characters.

    Equal notifications give equal findings. `finding_info.uid` is derived from the alert's id and dedup
    key (from the idempotency key for a test notification, which never touches a real finding);
    `metadata.uid` is the idempotency key; `time` (epoch milliseconds, as every time here) is when the
    notification was written.
    """
    alert = notification.alert
    event = notification.event
    activity_id, activity_name = _ACTIVITIES[event]
    severity_id, severity = _SEVERITIES[alert.severity]
    risk_level_id, risk_level = _RISK_LEVELS[alert.severity]
    status_id, status = _status(notification)
    model = {"name": alert.model, "type": "ML Model"}
    finding_info: dict[str, Any] = {
        "uid": finding_uid(notification),
        "title": notification.title,
        "desc": "; ".join([notification.summary, *(reason.text for reason in notification.top_reasons())]),
        "types": [alert.kind.value],
        "created_time": epoch_ms(alert.raised_at),
        "modified_time": epoch_ms(notification.created_at),
        "first_seen_time": epoch_ms(alert.first_seen),
        "last_seen_time": epoch_ms(alert.last_seen),
        "analytic": {"name": alert.rule_id, "uid": alert.rule_id, "type_id": 1, "type": "Rule"},
        "attacks": [_attack(alert.atlas_technique)],
    }
    if event is not NotificationEvent.TEST:
        finding_info["uid_alt"] = str(alert.id)  # what `mia-detector alerts acknowledge ID` takes
    if notification.dashboard_url:
        finding_info["src_url"] = notification.dashboard_url
    metadata: dict[str, Any] = {
        "version": OCSF_VERSION,
        "product": {"name": PRODUCT, "vendor_name": VENDOR, "version": product_version},
        "uid": notification.idempotency_key,
        "event_code": event.value,
    }
    if event is NotificationEvent.TEST:
        metadata["labels"] = ["test"]
    unmapped: dict[str, Any] = {
        "alert_id": alert.id,
        "dedup_key": alert.dedup_key,
        "score": alert.score,
        "threshold": alert.threshold,
        "reasons": [reason.model_dump(mode="json") for reason in alert.reasons],
        "client_count": len(alert.client_ids),
        "detected_at": epoch_ms(alert.detected_at),
        "detected_after_queries": alert.detected_after_queries,
    }
    if alert.exposure is not None:
        unmapped["exposure"] = alert.exposure.model_dump()
    if notification.previous_severity is not None:
        unmapped["previous_severity"] = notification.previous_severity.value
    finding: dict[str, Any] = {
        "category_uid": CATEGORY_UID,
        "category_name": "Findings",
        "class_uid": CLASS_UID,
        "class_name": "Detection Finding",
        "activity_id": activity_id,
        "activity_name": activity_name,
        "type_uid": CLASS_UID * 100 + activity_id,
        "type_name": f"Detection Finding: {activity_name}",
        "time": epoch_ms(notification.created_at),
        "severity_id": severity_id,
        "severity": severity,
        "status_id": status_id,
        "status": status,
        "message": notification.summary,
        "is_alert": event in _ALERTING,
        "risk_level_id": risk_level_id,
        "risk_level": risk_level,
        "count": alert.queries,  # queries by the client(s) between start_time and end_time
        "start_time": epoch_ms(alert.first_seen),
        "end_time": epoch_ms(alert.last_seen),
        "finding_info": finding_info,
        "metadata": metadata,
        "resources": [model],
        "evidences": _evidences(alert.client_ids[:MAX_CLIENTS], alert.evidence, model),
        "unmapped": unmapped,
    }
    if alert.triage:
        finding["remediation"] = {"desc": alert.triage}
    result: dict[str, Any] = bounded(finding)
    return result


def finding_uid(notification: Notification) -> str:
    """The finding's `finding_info.uid`: a UUID that is the same on every notification of one alert."""
    alert = notification.alert
    if notification.event is NotificationEvent.TEST:
        name = f"test|{notification.idempotency_key}"
    else:
        name = f"{alert.id}|{alert.dedup_key}"
    return str(uuid.uuid5(_FINDING_NAMESPACE, name))


def _evidences(clients: list[str], event_ids: list[str], model: dict[str, str]) -> list[dict[str, Any]]:
    """One evidence per client (who queried) and one per event id (which queries: the newest ones)."""
    who = [{"name": "client", "actor": {"user": {"uid": client}}} for client in clients]
    what = [{"name": "inference request", "uid": event_id, "resources": [model]} for event_id in event_ids]
    return who + what


def _status(notification: Notification) -> tuple[int, str]:
    if notification.event.ends_alert:
        return _STATUS_RESOLVED
    if notification.event is NotificationEvent.ACKNOWLEDGED or notification.alert.acknowledged_at is not None:
        return _STATUS_IN_PROGRESS
    return _STATUS_NEW


def _attack(technique_id: str) -> dict[str, Any]:
    """The OCSF attack object of an ATLAS technique (or sub-technique: `AML.T0024.000`)."""
    parent = technique_id if technique_id.count(".") < 2 else technique_id.rsplit(".", 1)[0]
    attack: dict[str, Any] = {"technique": _entity(parent)}
    if parent != technique_id:
        attack["sub_technique"] = _entity(technique_id)
    if parent == "AML.T0024":
        attack["tactic"] = dict(_EXFILTRATION)
    return attack


def _entity(technique_id: str) -> dict[str, str]:
    entity = {"uid": technique_id}
    if technique_id in _ATLAS_TECHNIQUES:
        entity["name"] = _ATLAS_TECHNIQUES[technique_id]
        entity["src_url"] = _ATLAS_URL + technique_id
    return entity


class OcsfFileSink:
    """Appends one finding a line (JSON Lines) to `path`, for a SIEM's file shipper.

    `deliver` returns once the line is on disk (written and fsync'd). A redelivered notification is not
    written twice: notifications reach a sink in order, so one already written is near the end of the file,
    which is searched for its `metadata.uid` first. The file (and its directories) is created when missing
    and opened anew for every notification, so an existing file is appended to and a rotated one replaced.
    """

    name = "ocsf-file"

    def __init__(self, path: Path, *, product_version: str = __version__) -> None:
        self.path = Path(path)
        self._product_version = product_version

    def deliver(self, notification: Notification) -> None:
        """Append `notification`'s finding unless it is already there; `DeliveryError` (transient) when the
        file cannot be written (permissions, a full disk, a directory in the way...)."""
        finding = detection_finding(notification, product_version=self._product_version)
        line = json_line(finding).encode() + b"\n"
        try:
            self._append(notification.idempotency_key, line)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise DeliveryError(f"{self.name}: cannot append to {self.path}: {reason}") from None

    def _append(self, key: str, line: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            tail = _tail(fd, size)
            if _holds(tail, key):
                log.info("%s: %s is already in %s", self.name, key, self.path)
                return
            if tail and not tail.endswith(b"\n"):
                # An earlier write was cut short (a crash): end that line, so that this one stays whole.
                line = b"\n" + line
            _write_all(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_directory(self.path.parent)

    def close(self) -> None:
        """Nothing to release: the file is closed after every notification."""


def _tail(fd: int, size: int) -> bytes:
    """Whole lines from the end of the file: at least the last `TAIL_BYTES`, and at least the last line.

    Every piece but the last of `_tail(...).split(b"\\n")` is a complete line; the last is empty, or the
    start of a line whose write was cut short.
    """
    length = min(size, TAIL_BYTES)
    while True:
        data = os.pread(fd, length, size - length)
        if length == size:
            return data
        if b"\n" in data[:-1]:
            return data[data.index(b"\n") + 1 :]  # drop the end of a line that starts before the window
        length = min(size, length * 2)


def _holds(tail: bytes, key: str) -> bool:
    """True if a complete line of `tail` is a finding whose `metadata.uid` is `key`."""
    needle = key.encode()
    for raw in reversed(tail.split(b"\n")[:-1]):
        if needle not in raw:
            continue
        try:
            finding = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        metadata = finding.get("metadata") if isinstance(finding, dict) else None
        if isinstance(metadata, dict) and metadata.get("uid") == key:
            return True
    return False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_directory(directory: Path) -> None:
    """Make a new file's directory entry durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class OcsfKafkaSink:
    """Sends each finding to `topic` through the brokers of `kafka` (its security settings included), keyed
    by the finding's uid (one per alert), and returns once the brokers acknowledged it (acks=all).

    Delivery is at least once: a retry after a lost acknowledgement sends the finding again, so consumers
    de-duplicate on the finding's `metadata.uid` (the notification's idempotency key), the same on every
    attempt.
    Every Kafka failure (no broker, a timeout, a refused record) is a transient `DeliveryError`; each step
    waits at most `timeout` seconds. The producer connects on the first delivery, not on construction.
    """

    name = "ocsf-kafka"

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str,
        *,
        timeout: float = 10.0,
        product_version: str = __version__,
    ) -> None:
        self.topic = topic
        self._settings = kafka
        self._timeout = timeout
        self._product_version = product_version
        self._producer: Any = None

    def deliver(self, notification: Notification) -> None:
        """Send `notification`'s finding and wait for the brokers' acknowledgement."""
        value = json_line(detection_finding(notification, product_version=self._product_version)).encode()
        try:
            producer = self._connect()
            # Keyed by the finding, not the notification: one alert's findings share a partition and so
            # keep their order (opened before resolved) for every consumer.
            key = finding_uid(notification).encode()
            future = producer.send(self.topic, value=value, key=key)
            producer.flush(timeout=self._timeout)
            future.get(timeout=self._timeout)
        except (KafkaError, KafkaUnreachable) as exc:
            raise DeliveryError(self._describe(exc)) from None

    def _connect(self) -> Any:
        if self._producer is None:
            # kafka-python 3.0 waits for a TLS handshake without a time limit: a wrong protocol would hang
            # the dispatcher for good.
            check_connection(self._settings, self._timeout)
            timeout_ms = max(1, int(self._timeout * 1000))
            clients: list[Any] = []

            def new_client(**config: Any) -> Any:
                # Kept, so that a producer that cannot start does not leave its sockets open.
                clients.append(KafkaProducer.DEFAULT_CONFIG["kafka_client"](**config))
                return clients[-1]

            try:
                self._producer = KafkaProducer(
                    **client_options(self._settings, timeout_seconds=self._timeout),
                    acks="all",
                    # As for the publisher: a producer id does not survive a restart of the embedded
                    # broker, and consumers de-duplicate by metadata.uid anyway.
                    enable_idempotence=False,
                    linger_ms=0,
                    max_block_ms=timeout_ms,
                    request_timeout_ms=timeout_ms,
                    delivery_timeout_ms=timeout_ms,
                    # Findings are few: after an outage, try the brokers again within a second rather than
                    # backing off for up to 30 s (the client's default).
                    reconnect_backoff_max_ms=1000,
                    kafka_client=new_client,
                )
            except KafkaError:
                for client in clients:
                    client.close()
                raise
        return self._producer

    def _describe(self, exc: Exception) -> str:
        """A one-line error naming the sink and topic, with broker addresses left out (as other sinks leave
        out their URLs)."""
        detail = (str(exc) or type(exc).__name__).splitlines()[0]
        if not detail.startswith(type(exc).__name__):
            detail = f"{type(exc).__name__}: {detail}"
        for server in self._settings.bootstrap_servers.split(","):
            if server.strip():
                detail = detail.replace(server.strip(), "<broker>")
        return f"{self.name}: topic {self.topic}: {detail}"

    def close(self) -> None:
        """Flush what is pending (waiting at most the timeout) and close; safe to call more than once."""
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=self._timeout)
            except KafkaError as exc:
                log.warning("%s: closing the producer failed: %s", self.name, exc)
