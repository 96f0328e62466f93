"""The one configuration object: defaults < TOML file < environment (`MIA_*`) < command-line options.

Environment names are the group and the field joined by `_`: `MIA_KAFKA_BOOTSTRAP_SERVERS`,
`MIA_DATABASE_URL`, `MIA_SESSIONS_GAP_SECONDS`, ... Lists are JSON (`MIA_KAFKA_TOPICS='["a","b"]'`).
"""

from __future__ import annotations

import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from detector.allowlists import read_allowlist_file
from detector.domain import AlertKind, AllowEntry, AllowList, CanaryClients, Severity

_GROUP = ConfigDict(extra="forbid")

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
TLS_PROTOCOLS = ("SSL", "SASL_SSL")
SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")


class KafkaSettings(BaseModel):
    """Where query logs come from, and how the consumer group reads them."""

    model_config = _GROUP
    bootstrap_servers: str = "127.0.0.1:9092"
    # The consumer's client library: kafka-python, or librdkafka through confluent-kafka where volume
    # demands it (`pip install 'mia-detector[confluent]'`). Producers (dead letters, findings) and topic
    # administration use kafka-python either way: their volume is small.
    client: Literal["kafka-python", "confluent"] = "kafka-python"
    topics: list[str] = Field(default_factory=lambda: ["inference-logs"], min_length=1)
    group_id: str = "mia-detector"
    client_id: str = "mia-detector"
    dead_letter_topic: str | None = None
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    session_timeout_ms: int = Field(default=10_000, ge=1_000)
    max_poll_records: int = Field(default=5_000, ge=1)
    poll_timeout_ms: int = Field(default=500, ge=1)
    fetch_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_partition_fetch_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    fetch_min_bytes: int = Field(default=256 * 1024, ge=1)
    fetch_max_wait_ms: int = Field(default=100, ge=0)
    security_protocol: SecurityProtocol = "PLAINTEXT"
    # Bounds each step of reaching a broker at start (TCP connect, TLS handshake, first answer) and the
    # client's bootstrap: a wrong address, protocol or certificate fails within it instead of hanging.
    connect_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    # TLS (security_protocol SSL or SASL_SSL): the CA bundle that signed the brokers' certificates (the
    # system's trust store when unset), and a client certificate for brokers that require one.
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None  # when the key is not in ssl_certfile
    ssl_password: SecretStr | None = None  # of an encrypted key
    ssl_check_hostname: bool = True
    # SASL (security_protocol SASL_PLAINTEXT or SASL_SSL): username and password are then required.
    sasl_mechanism: SaslMechanism = "PLAIN"
    sasl_username: str | None = Field(default=None, validate_default=True)
    sasl_password: SecretStr | None = Field(default=None, validate_default=True)

    @field_validator("client")
    @classmethod
    def _client_installed(cls, value: str) -> str:
        if value == "confluent":
            try:
                import confluent_kafka  # noqa: F401
            except ImportError:
                raise ValueError("needs confluent-kafka: pip install 'mia-detector[confluent]'") from None
        return value

    @field_validator(
        "ssl_cafile",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_password",
        "sasl_username",
        "sasl_password",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        # An empty variable in a manifest means "not set" (an empty path would be the current directory).
        return _none_if_blank(value)

    @field_validator("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password")
    @classmethod
    def _only_with_tls(cls, value: Any, info: ValidationInfo) -> Any:
        protocol = info.data.get("security_protocol")
        if value is not None and protocol is not None and protocol not in TLS_PROTOCOLS:
            raise ValueError(
                f"TLS is not used with security protocol {protocol}: set MIA_KAFKA_SECURITY_PROTOCOL to SSL "
                "or SASL_SSL, or unset this"
            )
        key_part = info.field_name in ("ssl_keyfile", "ssl_password")
        if key_part and value is not None and info.data.get("ssl_certfile") is None:
            raise ValueError("belongs to a client certificate: set MIA_KAFKA_SSL_CERTFILE too")
        return value

    @field_validator("sasl_username", "sasl_password")
    @classmethod
    def _with_sasl_only(cls, value: Any, info: ValidationInfo) -> Any:
        protocol = info.data.get("security_protocol")
        if protocol is None:
            return value
        if protocol in SASL_PROTOCOLS and value is None:
            raise ValueError(f"required with security protocol {protocol}")
        if protocol not in SASL_PROTOCOLS and value is not None:
            raise ValueError(
                f"SASL is not used with security protocol {protocol}: set MIA_KAFKA_SECURITY_PROTOCOL to "
                "SASL_SSL or SASL_PLAINTEXT, or unset this"
            )
        return value


class DatabaseSettings(BaseModel):
    """Where sessions, dead letters and checkpoints are stored (SQLAlchemy URL)."""

    model_config = _GROUP
    url: SecretStr = SecretStr("sqlite:///mia-detector.db")
    migrate_on_start: bool = True
    # How long (wall time) a processed event id is remembered, so that a re-delivery or a replay of the same
    # records within that time changes nothing: at least the source's retention of records it may re-deliver.
    seen_events_retention_hours: float = Field(default=72.0, gt=0)
    # How long a SQLite statement waits for another writer's lock before the commit is retried.
    busy_timeout_seconds: float = Field(default=30.0, gt=0)
    # Backoff between attempts while the database is unreachable or locked: from `retry_initial_seconds`,
    # doubling up to `retry_max_seconds`, for as long as it takes (consumption is held meanwhile).
    retry_initial_seconds: float = Field(default=0.5, gt=0)
    retry_max_seconds: float = Field(default=30.0, gt=0)


class IngestSettings(BaseModel):
    """Limits that turn oversized or malformed input into dead letters instead of work."""

    model_config = _GROUP
    # 8 MiB: attack tools batch their queries, and a batch of 128 images of 32x32x3 values is 2.6 MB of JSON
    # as pixel values and 8.0 MB as float32 scaled to [0, 1]; at Kafka's default message size (1 MiB) such
    # attacks were dead letters, unanalysed. The costliest records cost about 0.14 CPU-s and 30 MiB a
    # megabyte to reject (`benchmarks/hostile.py`).
    max_record_bytes: int = Field(default=8 * 1024 * 1024, ge=64)
    max_batch_rows: int = Field(default=4096, ge=1)
    max_features: int = Field(default=65_536, ge=1)
    # How many leading bytes of a rejected record its dead letter keeps (in the database and the dead-letter
    # topic). A record is a model's raw input (features, text, possibly personal data): none by default, so
    # that the detector holds no copy of it; the reason, the detail, the size and the source address
    # (topic/partition@offset, file:line) find the record where it came from. Opt in while debugging a
    # producer.
    dead_letter_raw_bytes: int = Field(default=0, ge=0)
    # A record stamped further than this ahead of the moment it was received is dead-lettered
    # (`implausible_timestamp`): a forged or broken clock must not move the stream's event time.
    max_future_seconds: float | None = Field(default=86_400.0, gt=0)
    # Of the records within that horizon, a timestamp ahead of its receipt by more than this (clock skew
    # between the serving fleet and this host) still counts for its client but does not advance the stream's
    # event time, which closes sessions and resolves alerts.
    max_clock_skew_seconds: float | None = Field(default=300.0, ge=0)
    # A record stamped more than this before it was received is dead-lettered; unset (the default) accepts
    # any age after 1970, as a replay of old logs needs. `train` and `evaluate` unset all three: they read
    # labelled datasets, whose only clock is their own.
    max_age_seconds: float | None = Field(default=None, gt=0)

    def for_datasets(self) -> IngestSettings:
        """These limits for reading a labelled dataset: no check against receipt time, which a dataset
        read offline does not have (its timestamps may lie anywhere)."""
        return self.model_copy(
            update={"max_future_seconds": None, "max_clock_skew_seconds": None, "max_age_seconds": None}
        )


class SessionSettings(BaseModel):
    """Session windows per (model, client) and the bound on what is kept in memory."""

    model_config = _GROUP
    gap_seconds: float = Field(default=1800.0, gt=0)
    max_duration_seconds: float = Field(default=86_400.0, gt=0)
    max_active: int = Field(default=100_000, ge=1)
    # How far behind the newest event another partition's events may lag before idle sessions are closed.
    allowed_lateness_seconds: float = Field(default=300.0, ge=0)


def _none_if_blank(value: Any) -> Any:
    """None for a blank string (an empty variable in a manifest or env file means "not set"), else `value`."""
    return None if isinstance(value, str) and not value.strip() else value


class CommitSettings(BaseModel):
    """When the pipeline makes its results durable and commits source offsets."""

    model_config = _GROUP
    min_interval_seconds: float = Field(default=1.0, ge=0)
    min_records: int = Field(default=20_000, ge=1)


class AllowlistEntry(BaseModel):
    """A client (or a client for one alert kind) an operator has judged benign, and why."""

    model_config = _GROUP
    client_id: str = Field(min_length=1)
    kind: AlertKind | None = None
    reason: str = Field(min_length=3)


class DetectionSettings(BaseModel):
    """Detection: which rules, how many clients' features in memory, and the operators' allow-list."""

    model_config = _GROUP
    rules_path: Path | None = None
    max_clients: int = Field(default=20_000, ge=1)
    allowlist: list[AllowlistEntry] = Field(default_factory=list)
    # An allow-list file (`detector.allowlists`), such as the one `train` suggests once reviewed: its
    # entries are added to `allowlist`.
    allowlist_file: Path | None = None

    @model_validator(mode="after")
    def _add_allowlist_file(self) -> DetectionSettings:
        if self.allowlist_file is None:
            return self
        added = []
        for number, entry in enumerate(read_allowlist_file(self.allowlist_file), start=1):
            try:
                added.append(AllowlistEntry.model_validate(entry))
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(part) for part in first["loc"]) or "entry"
                raise ValueError(
                    f"allow-list file {self.allowlist_file}, entry {number}: {where}: {first['msg']}"
                ) from None
        self.allowlist = [*self.allowlist, *added]
        return self

    def allow_list(self) -> AllowList:
        """The operators' allow-list as the detector applies it."""
        return AllowList(
            tuple(AllowEntry(entry.client_id, entry.reason, entry.kind) for entry in self.allowlist)
        )


class _ReceiverGroup(BaseModel):
    """A group of optional receiver settings: a blank value (`MIA_SLACK_WEBHOOK_URL=` in a manifest or an
    env file) means "not set", not a receiver at an empty address."""

    model_config = _GROUP

    @field_validator("*", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str) and not value.strip() and info.field_name is not None:
            field = cls.model_fields[info.field_name]
            return field.get_default(call_default_factory=True)
        return value


class AlertSettings(BaseModel):
    """The alert lifecycle and how notifications are delivered from the outbox."""

    model_config = _GROUP
    # An alert without a new detection for this long (event time, or wall time when the stream stops) is
    # resolved.
    resolve_after_seconds: float = Field(default=1800.0, gt=0)
    # An open alert with new evidence but no higher severity notifies again at most this often.
    renotify_seconds: float = Field(default=900.0, gt=0)
    # Alerts below this severity are recorded (alerts list and export, dashboards) but not delivered: low is
    # exposure, such as confidence harvesting with no membership-inference evidence beside it. Delivered as
    # opened once escalated to this severity or above.
    min_severity: Severity = Severity.MEDIUM
    # Undelivered notifications beyond which consumption pauses until the sinks catch up.
    outbox_max_pending: int = Field(default=10_000, ge=1)
    retry_initial_seconds: float = Field(default=1.0, gt=0)
    retry_max_seconds: float = Field(default=300.0, gt=0)
    timeout_seconds: float = Field(default=10.0, gt=0)


class AlertmanagerSettings(_ReceiverGroup):
    """Prometheus Alertmanager (`MIA_ALERTMANAGER_URL`, e.g. http://alertmanager:9093)."""

    url: SecretStr | None = None


class PagerDutySettings(_ReceiverGroup):
    """PagerDuty Events API v2 (`MIA_PAGERDUTY_ROUTING_KEY`, `MIA_PAGERDUTY_URL`)."""

    routing_key: SecretStr | None = None
    url: str = "https://events.pagerduty.com/v2/enqueue"


class SlackSettings(_ReceiverGroup):
    """A Slack incoming webhook (`MIA_SLACK_WEBHOOK_URL`; the URL is the secret)."""

    webhook_url: SecretStr | None = None


class WebhookSettings(_ReceiverGroup):
    """A generic JSON webhook (`MIA_WEBHOOK_URL`, `MIA_WEBHOOK_SECRET`, `MIA_WEBHOOK_HEADERS` as JSON)."""

    url: SecretStr | None = None
    secret: SecretStr | None = None
    headers: dict[str, str] = Field(default_factory=dict)


class OcsfSettings(_ReceiverGroup):
    """OCSF Detection Findings for a SIEM: a JSON Lines file and/or a Kafka topic (`MIA_OCSF_FILE`,
    `MIA_OCSF_TOPIC`; the topic is written through the `kafka` settings' brokers)."""

    file: Path | None = None
    topic: str | None = None


class DashboardSettings(_ReceiverGroup):
    """Where responders look (`MIA_DASHBOARD_URL`): notifications link to it."""

    url: str | None = None


class GrafanaSettings(_ReceiverGroup):
    """Grafana (`MIA_GRAFANA_URL`, `MIA_GRAFANA_TOKEN`, a service-account token): alerts become annotations
    when both are set, and `mia-detector dashboards push` publishes there, giving the PostgreSQL data source
    the password `MIA_GRAFANA_POSTGRES_PASSWORD`. `MIA_GRAFANA_VERIFY_TLS=false` accepts a self-signed
    certificate."""

    url: str | None = None
    token: SecretStr | None = None
    postgres_password: SecretStr | None = None
    verify_tls: bool = True

    @field_validator("url")
    @classmethod
    def _grafana_base_url(cls, value: str | None) -> str | None:
        # Checked here, not when a command first uses it: every command then reports a bad URL in one
        # line (the message never quotes the URL, which may hold a password).
        if value is not None:
            from detector.http import GrafanaAddress

            GrafanaAddress.parse(value)
        return value


class _Listening(BaseModel):
    """A server's address, `addr` (host:port; empty turns the server off)."""

    model_config = _GROUP
    addr: str = ""

    @field_validator("addr")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        if value:
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"expected host:port such as 127.0.0.1:9108, got {value!r}")
        return value

    @property
    def host_port(self) -> tuple[str, int] | None:
        """(host, port) to listen on, or None when the server is turned off."""
        if not self.addr:
            return None
        host, _, port = self.addr.rpartition(":")
        return host.strip("[]"), int(port)


class MetricsSettings(_Listening):
    """The Prometheus endpoint of `mia-detector run` (`MIA_METRICS_ADDR`, host:port; empty turns it off),
    optionally behind HTTP basic authentication (`MIA_METRICS_USERNAME` and `MIA_METRICS_PASSWORD`, both or
    neither) and TLS (`MIA_METRICS_TLS_CERTFILE`, PEM, with `MIA_METRICS_TLS_KEYFILE` when the key is not in
    it)."""

    model_config = _GROUP
    addr: str = "127.0.0.1:9108"
    username: str | None = None
    password: SecretStr | None = Field(default=None, validate_default=True)
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = Field(default=None, validate_default=True)

    @field_validator("username", "password", "tls_certfile", "tls_keyfile", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        # An empty variable in a manifest means "not set" (an empty path would be the current directory).
        return _none_if_blank(value)

    @field_validator("username")
    @classmethod
    def _no_colon(cls, value: str | None) -> str | None:
        # Basic authentication sends "username:password": a colon in the name could never match.
        if value is not None and ":" in value:
            raise ValueError("a basic-auth username cannot contain ':'")
        return value

    @field_validator("password")
    @classmethod
    def _with_username(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if "username" not in info.data:  # the username itself was invalid
            return value
        if (value is None) != (info.data["username"] is None):
            raise ValueError("basic authentication needs both MIA_METRICS_USERNAME and MIA_METRICS_PASSWORD")
        return value

    @field_validator("tls_keyfile")
    @classmethod
    def _with_certificate(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and info.data.get("tls_certfile") is None:
            raise ValueError("belongs to a certificate: set MIA_METRICS_TLS_CERTFILE too")
        return value


class RiskSettings(_Listening):
    """The risk feed: the policy that decides what gateways do with the clients of open alerts
    (`MIA_RISK_POLICY_PATH`, default the packaged `risk_policy.toml`); the endpoint that answers gateways
    (`MIA_RISK_ADDR`, host:port; empty, the default, turns it off), optionally asking for `Authorization:
    Bearer MIA_RISK_TOKEN`; the compacted topic the decisions are published to (`MIA_RISK_TOPIC`; empty,
    the default, publishes none). Both read the stored decisions every `MIA_RISK_REFRESH_SECONDS` (an
    operator's decision from another process is served and published within that)."""

    model_config = _GROUP
    policy_path: Path | None = None
    topic: str = ""
    token: SecretStr | None = None
    refresh_seconds: float = Field(default=1.0, gt=0, le=300)

    @field_validator("policy_path", "token", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return _none_if_blank(value)


class CanarySettings(BaseModel):
    """Detection canaries (docs/canaries.md): every `MIA_CANARY_INTERVAL_SECONDS` (unset, the default, injects
    none) the daemon publishes one synthetic attack to its own input topic as a client named by the reserved
    `MIA_CANARY_CLIENT_PREFIX` and tagged with `MIA_CANARY_KEY`, and raises `canary_missed` through the sinks
    when its alert is not raised within `MIA_CANARY_DEADLINE_SECONDS`. Every process given the key (each
    replica, `replay`) keeps the alerts of canaries from the incident sinks and the risk feed."""

    model_config = _GROUP
    interval_seconds: float | None = Field(default=None, gt=0)
    deadline_seconds: float = Field(default=60.0, gt=0)
    key: SecretStr | None = Field(default=None, validate_default=True)
    # Letters, digits and `._-`: a prefix that no escaping in a receiver or a dashboard can change.
    client_prefix: str = Field(
        default="mia-canary-", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$"
    )

    @field_validator("interval_seconds", "key", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return _none_if_blank(value)

    @field_validator("key")
    @classmethod
    def _key(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        # A canary's id keeps its alerts from the responders: a guess must not find the key that tags it.
        if value is None and info.data.get("interval_seconds") is not None:
            raise ValueError("required with MIA_CANARY_INTERVAL_SECONDS: it tags the canaries' clients")
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("the canary key must be at least 16 characters")
        return value

    def clients(self) -> CanaryClients | None:
        """The canary clients of the key; None without a key (then no client is a canary)."""
        if self.key is None:
            return None
        return CanaryClients(self.client_prefix, self.key.get_secret_value().encode())


class RetentionSettings(BaseModel):
    """How long stored data is kept (`mia-detector retention run`, and the daemon every
    `MIA_RETENTION_INTERVAL_SECONDS`). Each period is in days; unset (blank) keeps that data for good. The
    seen-event ledger follows `MIA_DATABASE_SEEN_EVENTS_RETENTION_HOURS`."""

    model_config = _GROUP
    # Sessions not written for this long (a closed session is written a last time when it closes).
    sessions_days: float | None = Field(default=30.0, gt=0)
    # The streaming features of clients idle this long: a slow attack spread over days goes on from them;
    # each holds its client's latest input row (the next query's change test compares against it).
    client_states_days: float | None = Field(default=14.0, gt=0)
    # Dead letters, by when they were stored: they hold the reason and where the record came from (and its
    # first bytes when MIA_INGEST_DEAD_LETTER_RAW_BYTES is set).
    dead_letters_days: float | None = Field(default=7.0, gt=0)
    # Resolved alerts, by when they were resolved, with their evidence; open and acknowledged alerts stay.
    alerts_days: float | None = Field(default=365.0, gt=0)
    # Notifications the sink accepted, by when it did; pending and failed ones stay.
    notifications_days: float | None = Field(default=30.0, gt=0)
    # The risk feed's audit (who decided what on which client, and why), by when each change was made; and
    # risk decisions, by when they expired.
    risk_days: float | None = Field(default=365.0, gt=0)
    # How often the daemon deletes what is past retention, from its own thread and connection; unset turns
    # the scheduled run off (then run `mia-detector retention run` from cron).
    interval_seconds: float | None = Field(default=3600.0, gt=0)

    @field_validator(
        "sessions_days", "client_states_days", "dead_letters_days", "alerts_days", "notifications_days",
        "risk_days", "interval_seconds", mode="before",
    )  # fmt: skip
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value


class LogSettings(BaseModel):
    """How the daemon logs: human-readable lines or one JSON object a line."""

    model_config = _GROUP
    format: Literal["console", "json"] = "console"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("format", "level", mode="before")
    @classmethod
    def _any_case(cls, value: object, info: ValidationInfo) -> object:
        # `MIA_LOG_LEVEL=debug` and `--log-level DEBUG` both work, as they do for the command's options.
        if not isinstance(value, str):
            return value
        return value.upper() if info.field_name == "level" else value.lower()


class Settings(BaseSettings):
    """Everything that can be configured, grouped by the part of the detector it concerns."""

    model_config = SettingsConfigDict(
        env_prefix="MIA_",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="forbid",
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    sessions: SessionSettings = Field(default_factory=SessionSettings)
    commit: CommitSettings = Field(default_factory=CommitSettings)
    detection: DetectionSettings = Field(default_factory=DetectionSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    alertmanager: AlertmanagerSettings = Field(default_factory=AlertmanagerSettings)
    pagerduty: PagerDutySettings = Field(default_factory=PagerDutySettings)
    slack: SlackSettings = Field(default_factory=SlackSettings)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    ocsf: OcsfSettings = Field(default_factory=OcsfSettings)
    dashboard: DashboardSettings = Field(default_factory=DashboardSettings)
    grafana: GrafanaSettings = Field(default_factory=GrafanaSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    risk: RiskSettings = Field(default_factory=RiskSettings)
    canary: CanarySettings = Field(default_factory=CanarySettings)
    # Fixed names operators' manifests rely on: MIA_MODEL_PATH, MIA_TRAINING_INDEX, MIA_TRAINING_INDEX_KEY.
    model_path: Path | None = None
    training_index: Path | None = None
    training_index_key: SecretStr | None = None

    @field_validator("training_index_key", mode="before")
    @classmethod
    def _blank_key_is_unset(cls, value: Any) -> Any:
        return _none_if_blank(value)

    @field_validator("training_index_key")
    @classmethod
    def _hex_key(cls, value: SecretStr | None) -> SecretStr | None:
        # Checked here so that every command reports a bad key in one line (never quoting it).
        if value is not None:
            try:
                key = bytes.fromhex(value.get_secret_value())
            except ValueError:
                raise ValueError("not a hexadecimal key") from None
            if not 16 <= len(key) <= 64:
                raise ValueError(f"the index key must be 16 to 64 bytes, not {len(key)}")
        return value

    @property
    def index_key(self) -> bytes | None:
        """The training-set index key (`training_index_key`, checked to be hex) as bytes; None when unset."""
        secret = self.training_index_key
        return bytes.fromhex(secret.get_secret_value()) if secret is not None else None

    def masked(self) -> dict[str, Any]:
        """The effective configuration as plain data that holds no secret: every secret setting masked,
        and in every URL (the database's included) the password and the query and fragment values."""
        data = self.model_dump(mode="json")
        # The database URL stays readable (which host, which database) but for its credentials.
        data["database"]["url"] = self.database.url.get_secret_value()
        # Webhook headers usually carry credentials (Authorization, API keys).
        data["webhook"]["headers"] = dict.fromkeys(self.webhook.headers, HIDDEN)
        masked: dict[str, Any] = _mask_urls(data)
        return masked


HIDDEN = "**********"
# What replaces a password or a query value in a URL shown to people.
URL_MASK = "***"
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def mask_url(url: str) -> str:
    """`url` with the password of its user part and the value of every query and fragment parameter
    replaced by `***`: scheme, user name, host, port, path and parameter names stay readable. A string that
    cannot be split as a URL is masked whole.

    No list of sensitive parameter names is kept: `?token=`, `?api_key=`, `?sig=` and any name a receiver
    may invent are all masked. A URL whose path is itself the secret (a Slack webhook) must be a secret
    setting instead.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return HIDDEN
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:{URL_MASK}@{host}" if has_password else f"{user}@{host}"
    # Put together by hand: urlunsplit drops the `//` of an empty host (`sqlite:///path`).
    start = _URL.match(url)
    masked = (
        f"{start.group(0)}{netloc}{parts.path}"
        if start
        else urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    )
    if parts.query:
        masked += f"?{_mask_parameters(parts.query)}"
    if parts.fragment:
        masked += f"#{_mask_parameters(parts.fragment)}"
    return masked


def _mask_parameters(text: str) -> str:
    """`a=1&b=2` as `a=***&b=***`; a part without `=` (a bare token) is masked whole."""
    masked = []
    for part in text.split("&"):
        name, has_value, _ = part.partition("=")
        masked.append(f"{name}={URL_MASK}" if has_value else URL_MASK if part else part)
    return "&".join(masked)


def _mask_urls(value: Any) -> Any:
    """`value` (plain data) with `mask_url` applied to every string that starts like a URL."""
    if isinstance(value, dict):
        return {key: _mask_urls(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_mask_urls(item) for item in value]
    if isinstance(value, str) and _URL.match(value):
        return mask_url(value)
    return value


class ConfigError(ValueError):
    """A configuration value or file is invalid; the message is one line meant for the operator."""


def secret_variables() -> dict[str, tuple[str, ...]]:
    """Every secret setting (a `SecretStr` field, at the top level or in a group) by environment variable
    name: `{"MIA_DATABASE_URL": ("database", "url"), ...}`."""
    variables = _variables().items()
    return {variable: path for variable, (path, field) in variables if _holds_secret(field.annotation)}


def _variables() -> dict[str, tuple[tuple[str, ...], FieldInfo]]:
    """Every setting's environment variable, with its path in `Settings` and its field."""
    found: dict[str, tuple[tuple[str, ...], FieldInfo]] = {}
    for name, field in Settings.model_fields.items():
        group = _model_of(field)
        if group is None:
            found[f"MIA_{name}".upper()] = ((name,), field)
            continue
        for member, member_field in group.model_fields.items():
            found[f"MIA_{name}_{member}".upper()] = ((name, member), member_field)
    return found


# What a variable holding a list or a table must look like, by the field's type: pydantic-settings decodes
# such variables as JSON and, when that fails, names only the settings group.
_JSON_FORMS: dict[Any, str] = {
    list: 'a JSON list, e.g. ["inference-logs"]',
    dict: 'a JSON object, e.g. {"X-Team": "security"}',
}


def _json_form(field: FieldInfo) -> str | None:
    """What the variable of `field` must hold when the setting is a list or a table, else None."""
    return _JSON_FORMS.get(typing.get_origin(field.annotation))


def _undecodable_variable(environ: typing.Mapping[str, str]) -> str | None:
    """The message for the first set variable of a list or table setting that is not JSON, if any."""
    upper = {key.upper(): value for key, value in environ.items()}
    for variable, (_, field) in _variables().items():
        form = _json_form(field)
        value = upper.get(variable)
        if form is None or value is None or not value.strip():
            continue
        try:
            json.loads(value)
        except ValueError:
            return f"invalid configuration: {variable} must be {form}"
    return None


def _model_of(field: FieldInfo) -> type[BaseModel] | None:
    annotation = field.annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _holds_secret(annotation: Any) -> bool:
    if annotation is SecretStr:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_holds_secret(member) for member in typing.get_args(annotation))
    return False


class SecretFilesSource(PydanticBaseSettingsSource):
    """Secret settings read from files: `<VAR>_FILE=/run/secrets/...` for every secret setting `<VAR>`
    (`MIA_DATABASE_URL_FILE`, `MIA_KAFKA_SASL_PASSWORD_FILE`, ...), as container platforms mount them.

    The value is the file's content without its trailing newline. Raises `ConfigError` (one line naming the
    variable, never the content) when a file cannot be read, or when `<VAR>` is set as well.
    """

    def __init__(self, settings_cls: type[BaseSettings], environ: typing.Mapping[str, str] | None = None):
        super().__init__(settings_cls)
        self._environ = {key.upper(): value for key, value in (environ or os.environ).items()}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        # Values are gathered in __call__, across groups.
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for variable, path in secret_variables().items():
            file_variable = f"{variable}_FILE"
            location = self._environ.get(file_variable)
            if location is None:
                continue
            if self._environ.get(variable, "").strip():
                raise ConfigError(f"both {variable} and {file_variable} are set: keep one")
            target = values
            for part in path[:-1]:
                target = target.setdefault(part, {})
            target[path[-1]] = _read_secret_file(file_variable, location)
        return values


def _read_secret_file(variable: str, location: str) -> str:
    try:
        content = Path(location).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read {variable} ({location}): {exc.strerror or type(exc).__name__}"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read {variable} ({location}): not UTF-8 text") from None
    return content.rstrip("\r\n")


def _without_secret_files(source: PydanticBaseSettingsSource) -> PydanticBaseSettingsSource:
    """The environment source, blind to the `<VAR>_FILE` variables (read by `SecretFilesSource`), which
    it would otherwise take for unknown fields of their group."""
    if isinstance(source, EnvSettingsSource):
        names = {f"{variable}_FILE".lower() for variable in secret_variables()}
        source.env_vars = {key: value for key, value in source.env_vars.items() if key.lower() not in names}
    return source


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from defaults, an optional TOML file, the environment and `overrides`.

    `overrides` are nested dicts by group (`{"kafka": {"topics": [...]}}`), taking precedence over all else.
    Raises `ConfigError` with a one-line message when anything is invalid.
    """
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"configuration file not found: {config_file}")

    class _Settings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            # A secret's file and its variable are never both set (an error), so the files' place among
            # the sources only decides what an empty variable beside a file means: the file.
            sources: tuple[PydanticBaseSettingsSource, ...] = (
                init_settings,
                SecretFilesSource(settings_cls),
                _without_secret_files(env_settings),
            )
            if config_file is not None:
                sources += (TomlConfigSettingsSource(settings_cls, toml_file=config_file),)
            return sources

    try:
        loaded = _Settings(**_merge_overrides(overrides))
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None
    except ConfigError:
        raise
    except ValueError as exc:  # malformed TOML or JSON in an environment variable
        message = _undecodable_variable(os.environ) or f"invalid configuration: {exc}".splitlines()[0]
        raise ConfigError(message) from None
    return loaded


def _merge_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Drop unset (None) override values so that they do not mask the environment or the file."""
    merged: dict[str, Any] = {}
    for group, values in overrides.items():
        kept = {key: value for key, value in values.items() if value is not None}
        if kept:
            merged[group] = kept
    return merged


def _one_line(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    env_name = "MIA_" + "_".join(str(part) for part in first["loc"][:2]).upper()
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    known = _variables().get(env_name)
    form = _json_form(known[1]) if known else None
    expected = f"; it must be {form}" if form and len(first["loc"]) == 2 else ""
    return f"invalid configuration {where} ({env_name}): {first['msg']}{expected}{more}"
