"""Metrics: defined once with closed label sets, moving as the pipeline works, never naming a client."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from detector.domain import AlertKind, DeadLetterReason, Severity
from detector.ingest.kafka import KafkaSource
from detector.kafka import consumers as consumers_module
from detector.metrics import (
    EVENT_LATENCY_BUCKETS,
    PREFIX,
    SCORED_KINDS,
    BatchHistogram,
    Metrics,
    package_version,
)
from detector.scoring.detector import Detector, Moment
from detector.scoring.model import ScoringModel
from detector.service import replay
from detector.settings import KafkaSettings
from detector.simulate.sample import MALFORMED
from tests.scoring.test_scoring import RULES, baseline_trajectories, benign_clients, client_after
from tests.streams import Stream, augmentation_probe
from tests.support import make_settings
from tests.test_evaluate import BENIGN, PROBER, START, STRANGER, WALKER, write_labelled_traffic


class Clock:
    def __init__(self, now: float = 1_764_403_200.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def exposition(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


# -- definitions ---------------------------------------------------------------------------------------------


EXPECTED = {
    # family name (counters without `_total`, the info without `_info`): type
    "events_consumed": "counter",
    "queries": "counter",
    "duplicate_events": "counter",
    "dead_letters": "counter",
    "consumer_lag_records": "gauge",
    "last_event_timestamp_seconds": "gauge",
    "processing_latency_from_event_seconds": "histogram",
    "processing_latency_from_receipt_seconds": "histogram",
    "commits": "counter",
    "commit_duration_seconds": "histogram",
    "storage_available": "gauge",
    "storage_errors": "counter",
    "offset_commit_failures": "counter",
    "broker_connected": "gauge",
    "broker_disconnections": "counter",
    "positions_beyond_log_end": "counter",
    "fenced_commits": "counter",
    "active_sessions": "gauge",
    "sessions_closed": "counter",
    "tracked_clients": "gauge",
    "new_clients": "counter",
    "client_evictions": "counter",
    "exposure": "counter",
    "clients_released": "counter",
    "score_ratio": "histogram",
    "alerts_opened": "counter",
    "alerts_resolved": "counter",
    "notifications": "counter",
    "notifications_pending": "gauge",
    "notification_oldest_pending_seconds": "gauge",
    "notification_delivery_duration_seconds": "histogram",
    "outbox_backpressure": "gauge",
    "backpressure_seconds": "counter",
    "model_info": "gauge",
    "model_age_seconds": "gauge",
    "build": "info",
    "risk_refreshed_timestamp_seconds": "gauge",
    "risk_refresh_failures": "counter",
    "risk_decisions_in_force": "gauge",
    "risk_records_published": "counter",
    "risk_publish_failures": "counter",
    "retention_deleted_rows": "counter",
    "retention_runs": "counter",
    "canary_last_run_timestamp_seconds": "gauge",
    "canary_last_outcome": "gauge",
    "canary_last_latency_seconds": "gauge",
    "metrics_unauthorized_requests": "counter",
}


def test_every_metric_is_prefixed_documented_and_counters_end_in_total() -> None:
    metrics = Metrics()
    metrics.set_model("20261129T101500Z-fpr0.001", trained_at=1_764_403_200.0)  # age: only with a model
    families = list(metrics.registry.collect())
    assert {family.name: family.type for family in families} == {
        f"{PREFIX}_{name}": kind for name, kind in EXPECTED.items()
    }
    for family in families:
        assert family.name.startswith(f"{PREFIX}_"), family.name
        assert len(family.documentation) > 10, family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
    text = exposition(Metrics())
    assert f"# TYPE {PREFIX}_notifications_total counter" in text
    assert f"# TYPE {PREFIX}_backpressure_seconds_total counter" in text


def test_closed_label_sets_are_initialised_up_front() -> None:
    metrics = Metrics()
    for reason in DeadLetterReason:
        assert value(metrics, f"{PREFIX}_dead_letters_total", reason=reason.value) == 0
    for source in ("kafka", "file"):
        assert value(metrics, f"{PREFIX}_events_consumed_total", source=source) == 0
    for kind in AlertKind:
        for severity in Severity:
            labels = {"kind": kind.value, "severity": severity.value}
            assert value(metrics, f"{PREFIX}_alerts_opened_total", **labels) == 0
            assert value(metrics, f"{PREFIX}_alerts_resolved_total", **labels) == 0
    for kind in SCORED_KINDS:
        assert value(metrics, f"{PREFIX}_score_ratio_count", kind=kind.value) == 0
    assert AlertKind.COORDINATED_CLIENTS not in SCORED_KINDS  # judged per group, not per client
    assert value(metrics, f"{PREFIX}_outbox_backpressure") == 0


def test_build_info_names_the_package_and_python_versions() -> None:
    metrics = Metrics()
    labels = {"version": package_version(), "python": platform.python_version()}
    assert value(metrics, f"{PREFIX}_build_info", **labels) == 1
    assert package_version() != "unknown"  # the package is installed (editable) in the test environment


def test_two_instances_never_share_state() -> None:
    first, second = Metrics(), Metrics()
    first.queries.inc(5)
    assert value(second, f"{PREFIX}_queries_total") == 0


# -- the batch histogram -------------------------------------------------------------------------------------


def test_a_batch_histogram_counts_exactly_like_prometheus_client() -> None:
    values = [0.0, 0.01, 0.0100001, 0.3, 5.0, 59.9, 3600.0, 3600.5, 1e9, -2.0]
    reference_registry = CollectorRegistry()
    reference = Histogram(
        "reference", "reference", buckets=EVENT_LATENCY_BUCKETS, registry=reference_registry
    )
    batch = BatchHistogram("batch", "batch", EVENT_LATENCY_BUCKETS, CollectorRegistry())
    for number in values:
        reference.observe(number)
    batch.observe_many(values[:4])
    batch.observe_many(np.array(values[4:-1]))
    batch.observe(values[-1])
    batch.observe_many([float("nan")])  # ignored
    batch.observe_many([])

    def samples(collector: Any, name: str) -> dict[tuple[str, str], float]:
        return {
            (sample.name.removeprefix(name), sample.labels.get("le", "")): sample.value
            for family in collector.collect()
            for sample in family.samples
            if not sample.name.endswith("_created")
        }

    got, expected = samples(batch, "batch"), samples(reference_registry, "reference")
    assert got.pop(("_sum", "")) == pytest.approx(expected.pop(("_sum", "")))  # summed in another order
    assert got == expected


def test_a_labelled_batch_histogram_counts_every_single_value_by_the_next_scrape() -> None:
    registry = CollectorRegistry()
    reference = Histogram("reference", "reference", ["kind"], buckets=(0.5, 1.0, 2.0), registry=registry)
    batch = BatchHistogram("batch", "batch", (0.5, 1.0, 2.0), registry, labelnames=["kind"])
    batch.labels("idle")
    # More than one buffer's worth of one kind, and a few of another: both complete at the scrape.
    for index in range(BatchHistogram.BUFFERED + 7):
        number, kind = index % 5 * 0.5, "busy" if index % 3 else "rare"
        batch.observe(number, kind)
        reference.labels(kind=kind).observe(number)

    def sample(name: str, suffix: str, **labels: str) -> float | None:
        return registry.get_sample_value(name + suffix, labels)

    for kind in ("busy", "rare"):
        for le in ("0.5", "1.0", "2.0", "+Inf"):
            assert sample("batch", "_bucket", kind=kind, le=le) == sample(
                "reference", "_bucket", kind=kind, le=le
            )
        assert sample("batch", "_sum", kind=kind) == pytest.approx(sample("reference", "_sum", kind=kind))
    assert sample("batch", "_count", kind="idle") == 0
    with pytest.raises(ValueError, match="labels"):
        batch.labels()
    with pytest.raises(ValueError, match="labels"):
        batch.observe(1.0, "busy", "extra")


# -- values move as expected ---------------------------------------------------------------------------------


def test_latencies_and_the_newest_event_time_are_observed_per_batch() -> None:
    clock = Clock()
    metrics = Metrics(clock=clock)
    now = clock.now
    metrics.observe_processed([now - 0.5, now - 120.0, now + 30.0], [now - 0.002, now - 0.002, now - 0.2])
    assert value(metrics, f"{PREFIX}_processing_latency_from_event_seconds_count") == 3
    assert value(metrics, f"{PREFIX}_processing_latency_from_event_seconds_bucket", le="0.01") == 1  # skew: 0
    assert value(metrics, f"{PREFIX}_processing_latency_from_event_seconds_bucket", le="0.5") == 2
    assert value(metrics, f"{PREFIX}_processing_latency_from_event_seconds_sum") == pytest.approx(120.5)
    assert value(metrics, f"{PREFIX}_processing_latency_from_receipt_seconds_count") == 3
    assert value(metrics, f"{PREFIX}_processing_latency_from_receipt_seconds_bucket", le="0.0025") == 2
    assert value(metrics, f"{PREFIX}_last_event_timestamp_seconds") == now + 30.0

    metrics.observe_processed([now - 1000.0], [now])  # a late event does not move the newest event time back
    assert value(metrics, f"{PREFIX}_last_event_timestamp_seconds") == now + 30.0
    metrics.observe_processed([], [now])  # a batch of dead letters only: receipt latency, nothing else
    assert value(metrics, f"{PREFIX}_processing_latency_from_event_seconds_count") == 4
    assert value(metrics, f"{PREFIX}_processing_latency_from_receipt_seconds_count") == 5


def test_lag_is_set_per_partition_and_revoked_partitions_disappear() -> None:
    metrics = Metrics()
    lag = f"{PREFIX}_consumer_lag_records"
    metrics.observe_lag({("logs", 0): 10, ("logs", 1): 0, ("other", 3): 7})
    assert value(metrics, lag, topic="logs", partition="0") == 10
    assert value(metrics, lag, topic="other", partition="3") == 7
    metrics.observe_lag({("logs", 0): 4})
    assert value(metrics, lag, topic="logs", partition="0") == 4
    assert value(metrics, lag, topic="logs", partition="1") is None
    assert value(metrics, lag, topic="other", partition="3") is None
    metrics.observe_lag({})
    assert f"{lag}{{" not in exposition(metrics)


def test_the_model_is_exported_with_its_age_computed_at_scrape_time() -> None:
    clock = Clock()
    metrics = Metrics(clock=clock)
    age = f"{PREFIX}_model_age_seconds"
    assert f"\n{age} " not in exposition(metrics)  # no model: no series (never NaN)
    assert f"{PREFIX}_model_info{{" not in exposition(metrics)

    version = "20251129T080000Z-fpr0.001"
    metrics.set_model(version, trained_at=1_764_403_200.0)
    clock.now = 1_764_403_200.0 + 3600.0
    assert value(metrics, f"{PREFIX}_model_info", version=version) == 1
    assert value(metrics, age) == 3600.0
    clock.now += 60.0
    assert value(metrics, age) == 3660.0

    metrics.set_model("hand-made", trained_at=clock.now - 5.0)
    assert value(metrics, f"{PREFIX}_model_info", version=version) is None  # one model at a time
    assert value(metrics, f"{PREFIX}_model_info", version="hand-made") == 1
    assert value(metrics, age) == 5.0
    metrics.set_model("no-stamp")  # an unknown training time: the version, but no age
    assert value(metrics, age) is None
    metrics.set_model(None)
    assert f"{PREFIX}_model_info{{" not in exposition(metrics)
    assert value(metrics, age) is None


def test_the_detector_reports_each_kinds_ratio_and_a_ratio_of_one_or_more_where_it_alerts() -> None:
    observed: list[tuple[AlertKind, float]] = []
    detector = Detector(RULES)
    client = client_after(augmentation_probe(Stream("prober")))
    judged = detector.evaluate(
        Moment.of(("m", "prober"), client, client.last_seen),
        observe=lambda verdicts: observed.extend((v.kind, v.ratio) for v in verdicts),
    )
    detections = [detection for detection in judged if detection.fired]
    ratios = dict(observed)
    assert len(observed) == len(ratios) == len({rule.kind for rule in RULES})  # one per kind
    assert detections
    for detection in detections:
        assert ratios[detection.kind] >= 1.0
    for kind, ratio in ratios.items():
        assert ratio >= 0.0
        if ratio < 1.0:
            assert kind not in {detection.kind for detection in detections}


def test_the_anomaly_model_reports_a_ratio_for_every_client_it_scores() -> None:
    model = ScoringModel.fit(baseline_trajectories(), RULES, 0.01, scales={})
    clients = {("m", name): client for name, client in benign_clients().items()}
    clients[("m", "prober")] = client_after(augmentation_probe(Stream("prober")))
    observed: list[tuple[AlertKind, float]] = []
    judged = Detector(RULES, model).evaluate_anomalies(
        [Moment.of(key, client, client.last_seen) for key, client in clients.items()],
        observe=lambda verdicts: observed.extend((v.kind, v.ratio) for v in verdicts),
    )
    detections = [detection for detection in judged if detection.fired]
    scored = [key for key, client in clients.items() if client.queries >= 20]
    assert len(observed) == len(scored) > 0
    assert {kind for kind, _ in observed} == {AlertKind.ANOMALOUS_SESSION}
    assert sum(ratio >= 1.0 for _, ratio in observed) == len(detections)


class FakeConsumer:
    """Stands in for kafka-python's KafkaConsumer: fixed assignment, high watermarks and positions."""

    def __init__(self, **options: Any) -> None:
        from kafka import TopicPartition

        self.tp = TopicPartition
        self.highwaters = {TopicPartition("logs", 0): 100, TopicPartition("logs", 1): 5}
        self.highwaters[TopicPartition("logs", 2)] = None  # type: ignore[assignment]  # not fetched yet
        self.positions = {TopicPartition("logs", 0): 40, TopicPartition("logs", 1): 7}  # tansu: below

    def subscribe(self, topics: list[str], listener: Any) -> None:
        pass

    def assignment(self) -> set[Any]:
        return set(self.highwaters)

    def highwater(self, tp: Any) -> int | None:
        return self.highwaters[tp]

    def position(self, tp: Any, timeout_ms: int | None = None) -> int | None:
        assert timeout_ms == 0  # never blocks the consumer loop
        return self.positions.get(tp)


def test_source_lag_comes_from_the_last_fetch_and_is_never_negative(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        consumers_module, "open_client", lambda factory, settings, **options: FakeConsumer(**options)
    )
    source = KafkaSource(KafkaSettings(topics=["logs"], client="kafka-python"), on_revoke=lambda: None)
    assert source.lag() == {("logs", 0): 60, ("logs", 1): 0}


# -- a stream with detections --------------------------------------------------------------------------------


def write_stream(directory: Path) -> tuple[Path, int]:
    """Labelled traffic (benign clients, a prober and a walker: two detections) with one malformed record
    of each kind in `MALFORMED` mixed in; its path and number of records."""
    events = write_labelled_traffic(directory).events
    lines = events.read_bytes().splitlines()
    for index, bad in enumerate(MALFORMED):
        lines.insert(50 * (index + 1), bad)
    events.write_bytes(b"\n".join(lines) + b"\n")
    return events, len(lines)


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Metrics, Any, int]:
    """`write_stream` replayed in small batches; the metrics, the stats and the number of records."""
    directory = tmp_path_factory.mktemp("replayed")
    events, records = write_stream(directory)
    metrics = Metrics()
    settings = make_settings(f"sqlite:///{directory / 'mia.db'}", kafka={"max_poll_records": 50})
    stats = replay(settings, [str(events)], metrics=metrics)
    return metrics, stats, records


def test_replaying_a_stream_moves_every_pipeline_metric(replayed: tuple[Metrics, Any, int]) -> None:
    metrics, stats, records = replayed
    assert value(metrics, f"{PREFIX}_events_consumed_total", source="file") == records == stats.records
    assert value(metrics, f"{PREFIX}_queries_total") == stats.queries > 0
    dead = sum(value(metrics, f"{PREFIX}_dead_letters_total", reason=r.value) or 0 for r in DeadLetterReason)
    assert dead == len(MALFORMED) == sum(stats.dead_letters.values())
    assert value(metrics, f"{PREFIX}_processing_latency_from_event_seconds_count") == stats.events
    assert value(metrics, f"{PREFIX}_processing_latency_from_receipt_seconds_count") == records
    newest = value(metrics, f"{PREFIX}_last_event_timestamp_seconds")
    assert newest is not None and START + 3000.0 < newest <= START + 3600.0  # the traffic's last hour
    assert (value(metrics, f"{PREFIX}_commits_total") or 0) >= 1
    opened = {
        kind.value: value(metrics, f"{PREFIX}_alerts_opened_total", kind=kind.value, severity="high")
        for kind in (AlertKind.AUGMENTATION_PROBING, AlertKind.BOUNDARY_PROBING)
    }
    assert opened == {"augmentation_probing": 1, "boundary_probing": 1}
    for kind in (AlertKind.AUGMENTATION_PROBING, AlertKind.BOUNDARY_PROBING):
        judged = value(metrics, f"{PREFIX}_score_ratio_count", kind=kind.value) or 0
        below_one = value(metrics, f"{PREFIX}_score_ratio_bucket", kind=kind.value, le="0.9") or 0
        assert judged > below_one > 0  # most judgements are quiet, some crossed the threshold


def test_no_client_or_event_id_ever_becomes_a_label_value(replayed: tuple[Metrics, Any, int]) -> None:
    metrics, _, _ = replayed
    clients = {PROBER, WALKER, STRANGER, *(client for names in BENIGN.values() for client in names)}
    label_values = {
        label
        for family in text_string_to_metric_families(exposition(metrics))
        for sample in family.samples
        for label in sample.labels.values()
    }
    assert label_values  # the search covers something
    leaked = {label for label in label_values if any(client in label for client in clients)}
    assert leaked == set()
    assert not any(label.startswith(("evt-", "bad-")) for label in label_values)
    assert len(label_values) < 100  # closed sets only: nothing grows with the traffic


def test_the_model_in_use_is_exported_when_the_pipeline_is_built(tmp_path: Path) -> None:
    model = ScoringModel.fit(baseline_trajectories(), RULES, 0.01, scales={})
    model.save(tmp_path / "model")
    events = write_labelled_traffic(tmp_path).events
    settings = make_settings(f"sqlite:///{tmp_path / 'mia.db'}").model_copy(
        update={"model_path": tmp_path / "model"}
    )
    metrics = Metrics()
    replay(settings, [str(events)], metrics=metrics)
    assert value(metrics, f"{PREFIX}_model_info", version=model.version) == 1
    age = value(metrics, f"{PREFIX}_model_age_seconds")
    assert age is not None and 0 <= age < 3600
    assert (value(metrics, f"{PREFIX}_score_ratio_count", kind="anomalous_session") or 0) > 0
