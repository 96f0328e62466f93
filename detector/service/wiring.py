"""Wiring: the store, the alert lifecycle, the detection step and the pipeline, built from the settings."""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
from sqlalchemy import Engine

from detector.alerts.dispatcher import Dispatcher, RetryPolicy
from detector.alerts.lifecycle import AlertLifecycle
from detector.alerts.risk_endpoint import PREFIX, RiskEndpoint
from detector.alerts.risk_feed import RiskFeed, RiskView
from detector.alerts.risk_topic import TOPIC_CONFIGS, RiskTopic
from detector.alerts.sinks import build_sinks
from detector.domain import CANARY_MODEL, AlertKind
from detector.eventtime import Watermark
from detector.features.client import FeatureTracker, TrainingIndexes, TrainingLookup
from detector.features.embedding import ModelScale, QueryEmbedder
from detector.ingest.decode import RecordDecoder
from detector.kafka import KafkaPublisher, ensure_topic, latest_values
from detector.metrics import BasicAuth, Metrics
from detector.pipeline import (
    CommitPolicy,
    DecodeStep,
    DeduplicateStep,
    DetectStep,
    Outputs,
    Pipeline,
    RestoreStep,
    SessionizeStep,
)
from detector.scoring.coordination import CoordinationTracker
from detector.scoring.detector import Detector
from detector.scoring.model import ScoringModel
from detector.scoring.rules import load_rules
from detector.scoring.scorer import Scorer
from detector.sessions import SessionTracker
from detector.settings import MetricsSettings, Settings
from detector.simulate.canary import canary_scale
from detector.storage import OutboxStore, RiskStore, Store, open_store

log = logging.getLogger(__name__)

# How long a stopping daemon (or a finished replay) waits for due notifications to be delivered.
DRAIN_SECONDS = 10.0


@contextmanager
def persisting(settings: Settings, metrics: Metrics) -> Iterator[tuple[Store, Dispatcher | None]]:
    """For the block: the store, its alert changes notifying every configured sink, and a started
    dispatcher delivering them from the outbox (None without sinks).

    On the way out the dispatcher is given `DRAIN_SECONDS` to deliver what is due; anything left stays in
    the outbox for the next start.
    """
    sinks = build_sinks(settings)
    with open_store(settings) as store:
        if not sinks:
            yield store, None
            return
        dispatcher = Dispatcher(
            OutboxStore(store.engine),
            sinks,
            metrics,
            retry=RetryPolicy(settings.alerts.retry_initial_seconds, settings.alerts.retry_max_seconds),
            max_pending=settings.alerts.outbox_max_pending,
        )
        dispatcher.start()
        log.info("delivering alerts to %s", ", ".join(dispatcher.sink_names))
        try:
            yield store, dispatcher
        finally:
            if not dispatcher.drain(DRAIN_SECONDS):
                log.warning("notifications still pending: they are delivered at the next start")
            dispatcher.close()


def serve_metrics(metrics: Metrics, settings: MetricsSettings) -> Callable[[], None]:
    """Serve `metrics` as `settings` say (address, basic authentication, TLS); return the function that
    stops serving. Raises `OSError` with a one-line message naming the setting when the address cannot be
    bound or the certificate cannot be loaded (and `ValueError` when metrics are turned off)."""
    if settings.host_port is None:
        raise ValueError("metrics are turned off (MIA_METRICS_ADDR is empty)")
    host, port = settings.host_port
    auth = None
    if settings.username is not None and settings.password is not None:
        auth = BasicAuth(settings.username, settings.password.get_secret_value())
    tls = None
    if settings.tls_certfile is not None:
        tls = server_tls_context(settings.tls_certfile, settings.tls_keyfile)
    elif auth is not None and not _loopback(host):
        log.warning(
            "metrics credentials cross the network in the clear: set MIA_METRICS_TLS_CERTFILE to serve "
            "/metrics over TLS"
        )
    try:
        stop = metrics.serve(host, port, auth=auth, tls=tls)
    except OSError as error:
        raise OSError(
            f"cannot serve metrics on {settings.addr} (MIA_METRICS_ADDR): {error.strerror or error}"
        ) from None
    scheme = "https" if tls is not None else "http"
    log.info("metrics at %s://%s/metrics%s", scheme, settings.addr, " (basic authentication)" if auth else "")
    return stop


def serve_risk(settings: Settings, engine: Engine, metrics: Metrics) -> Callable[[], None]:
    """The risk feed of `settings.risk`, started: the decisions stored through `engine`, read again every
    refresh, answered on `MIA_RISK_ADDR` and published to the compacted topic `MIA_RISK_TOPIC` (each when
    set; the topic is created when absent), told to `metrics`. Returns the function that stops it all.
    Raises `OSError` with a one-line message naming the setting when the address cannot be bound,
    `KafkaUnreachable` when the topic's brokers do not answer (and `ValueError` when both are off)."""
    risk = settings.risk
    if risk.host_port is None and not risk.topic:
        raise ValueError("the risk feed is turned off (MIA_RISK_ADDR and MIA_RISK_TOPIC are empty)")
    view = RiskView(RiskStore(engine).decisions)
    with ExitStack() as started:
        listeners = []
        if risk.topic:
            ensure_topic(settings.kafka, risk.topic, 1, configs=TOPIC_CONFIGS)
            publisher = KafkaPublisher(settings.kafka)
            started.callback(publisher.close)
            published = latest_values(settings.kafka, risk.topic)
            listeners.append(RiskTopic(publisher, risk.topic, published, metrics))
            log.info("risk decisions published to topic %s", risk.topic)
        started.callback(RiskFeed(view, risk.refresh_seconds, listeners, metrics).start().close)
        if risk.host_port is not None:
            host, port = risk.host_port
            token = risk.token.get_secret_value() if risk.token is not None else None
            if token is None and not _loopback(host):
                log.warning("the risk endpoint answers anyone on the network: set MIA_RISK_TOKEN")
            try:
                endpoint = RiskEndpoint(view, host, port, token)
            except OSError as error:
                raise OSError(
                    f"cannot serve risk decisions on {risk.addr} (MIA_RISK_ADDR): {error.strerror or error}"
                ) from None
            started.callback(endpoint.start().close)
            guarded = " (bearer token)" if token else ""
            log.info("risk decisions at http://%s%s{model}/{client}%s", risk.addr, PREFIX, guarded)
        return started.pop_all().close


def server_tls_context(certfile: Path, keyfile: Path | None) -> ssl.SSLContext:
    """A TLS server context (TLS 1.2 or later) with the certificate chain of `certfile` and the key of
    `keyfile` (or of `certfile`). Raises `OSError` naming the setting when they cannot be loaded."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile)
    except OSError as error:  # ssl.SSLError is an OSError too
        reason = getattr(error, "reason", None) or error.strerror or type(error).__name__
        with_key = f" with MIA_METRICS_TLS_KEYFILE ({keyfile})" if keyfile is not None else ""
        raise OSError(f"cannot load MIA_METRICS_TLS_CERTFILE ({certfile}){with_key}: {reason}") from None
    return context


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def load_scoring_model(settings: Settings) -> ScoringModel | None:
    """The scoring model at `MIA_MODEL_PATH`, if configured (hash-checked, never unpickled)."""
    if settings.model_path is None:
        return None
    model = ScoringModel.load(settings.model_path)
    log.info("scoring model %s (target FPR %g)", model.version, model.target_fpr)
    return model


def load_training_indexes(settings: Settings) -> TrainingIndexes:
    """The training-set indexes at `MIA_TRAINING_INDEX`: one file (for every model of its width), or a
    directory of `<model name>.npz` files. Keys come from `MIA_TRAINING_INDEX_KEY` when not in the files."""
    path = settings.training_index
    if path is None:
        return TrainingIndexes()
    from detector.trainingset import TrainingSetIndex

    key = settings.index_key
    if path.is_dir():
        by_model: dict[str, TrainingLookup] = {
            file.stem: TrainingSetIndex.load(file, key=key) for file in sorted(path.glob("*.npz"))
        }
        log.info("training-set indexes for models %s", sorted(by_model))
        return TrainingIndexes(by_model)
    index = TrainingSetIndex.load(path, key=key)
    log.info("training-set index of %d rows of width %d", index.size, index.width)
    return TrainingIndexes(default=index)


def build_detection(
    settings: Settings, model: ScoringModel | None = None, indexes: TrainingIndexes | None = None
) -> DetectStep:
    """The detection step: features (scaled as the model was trained, if any), rules, model, allow-list."""
    scales = {
        name: ModelScale.fixed(np.asarray(scale["mean"]), np.asarray(scale["std"]))
        for name, scale in (model.scales.items() if model else ())
    }
    # The canaries' model sees no real traffic to learn a scale from: its dataset's is known.
    scales[CANARY_MODEL] = ModelScale.fixed(*canary_scale())
    tracker = FeatureTracker(QueryEmbedder(scales), indexes, settings.detection.max_clients)
    detector = Detector(load_rules(settings.detection.rules_path), model)
    scorer = detector.scorer
    training_rule = next(rule for rule in scorer.rules if rule.kind is AlertKind.TRAINING_SET_TARGETING)
    coordination = CoordinationTracker(
        scorer.threshold(training_rule),
        settings.detection.max_clients,
        allowed=settings.detection.allow_list().clients,
    )
    # A client is judged again at least four times per quiet period: its open alert is kept alive (or let
    # go) by its own queries, not resolved in a gap between judgements.
    return DetectStep(
        tracker, detector, coordination, revisit_seconds=settings.alerts.resolve_after_seconds / 4
    )


def build_pipeline(
    settings: Settings,
    store: Store,
    metrics: Metrics,
    *,
    outputs: Outputs | None = None,
    group_id: str = "",
    detect: DetectStep | None = None,
) -> Pipeline:
    """A pipeline configured from `settings`, writing to `store` and reporting to `outputs` (detection from
    the settings by default). Its alert lifecycle notifies the sinks `outputs.outbox` delivers to."""
    if detect is None:
        detect = build_detection(settings, load_scoring_model(settings), load_training_indexes(settings))
    detect.observe_ratio = metrics.observe_score_ratio
    detect.stored = store
    model = detect.detector.model
    metrics.set_model(model.version if model else None, model.trained_at if model else None)
    _warn_of_what_is_missing(detect.detector.scorer, detect.tracker.training_indexes)
    sessions = SessionTracker(
        gap_seconds=settings.sessions.gap_seconds,
        max_duration_seconds=settings.sessions.max_duration_seconds,
        max_active=settings.sessions.max_active,
        allowed_lateness_seconds=settings.sessions.allowed_lateness_seconds,
    )
    keep_raw_bytes = settings.ingest.dead_letter_raw_bytes
    outputs = outputs or Outputs()
    sinks = outputs.outbox.sink_names if outputs.outbox is not None else []
    return Pipeline(
        [
            DecodeStep(RecordDecoder(settings.ingest), keep_raw_bytes),
            DeduplicateStep(store, keep_raw_bytes),
            RestoreStep(sessions, detect, store),
            SessionizeStep(sessions),
            detect,
        ],
        detect=detect,
        sessions=sessions,
        lifecycle=AlertLifecycle.from_settings(settings, sinks),
        store=store,
        policy=CommitPolicy(settings.commit.min_interval_seconds, settings.commit.min_records),
        metrics=metrics,
        outputs=outputs,
        watermark=Watermark(settings.ingest.max_clock_skew_seconds),
        group_id=group_id,
        seen_retention_seconds=settings.database.seen_events_retention_hours * 3600.0,
    )


def _warn_of_what_is_missing(scorer: Scorer, indexes: TrainingIndexes) -> None:
    # Said once everything has loaded and started, so that a refused file or address is the one line a
    # failed start prints.
    model = scorer.model
    if model is None:
        log.warning(
            "no scoring model (MIA_MODEL_PATH unset): rules judge at their floors, without thresholds "
            "calibrated on your traffic, and the anomaly model is off; `mia-detector train` makes one"
        )
    if not (indexes.by_model or indexes.default):
        log.warning(
            "no training-set index (MIA_TRAINING_INDEX unset): queries for training records "
            "(MIA-003, MIA-005) go unseen; `mia-detector index-training` builds one"
        )
    if model is None:
        return
    for rule in scorer.stale:
        log.warning(
            "scoring model %s calibrated %s's threshold on another measure than it scores now (%s): the rule "
            "judges at its floor until `mia-detector train` calibrates it again",
            model.version,
            rule.id,
            rule.measure,
        )
    if model.rule_measures is None:
        log.warning(
            "scoring model %s does not record what its thresholds were calibrated on (trained by an earlier "
            "version): they apply as they are, even to rules that changed since; `mia-detector train` "
            "calibrates them again",
            model.version,
        )
