"""The database schema: sessions, dead letters, checkpoints and partition leases, the seen-event ledger,
alerts, silences and the notification outbox.

Column lengths follow the input contract in `detector.schemas` (model and client ids up to 256
characters, ...) so that a record the decoder accepted can always be stored, also on PostgreSQL where
lengths are enforced.
Every timestamp is a `UTCDateTime`: stored in UTC, read back as a timezone-aware UTC `datetime`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Deterministic constraint and index names, so that migrations can drop or alter them by name everywhere.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware in UTC, whatever the backend.

    PostgreSQL keeps it as `timestamptz`; SQLite, which has no time zones, keeps the UTC wall time as
    fixed-width text (`2024-03-01 06:30:00.000000`), so that text order is time order. Naive datetimes are
    refused rather than guessed at.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> Callable[[datetime | None], datetime | str | None]:
        # Replaces the impl's processing instead of wrapping it as `process_bind_param` would: a batch binds
        # tens of thousands of timestamps, and on SQLite the generic two-step formatting cost more than the
        # inserts themselves.
        if dialect.name == "sqlite":
            return _SQLiteText()
        return _as_utc

    def process_result_value(self, value: Any | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the database, got {type(value).__name__}")
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _as_utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is UTC:
        return value
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value.isoformat()} cannot be stored as UTC")
    return value.astimezone(UTC)


class _SQLiteText:
    """Turns aware datetimes into the UTC text SQLAlchemy's SQLite DATETIME writes and parses.

    Remembers its last value: a batch binds the same "now" on every row of a column.
    """

    def __init__(self) -> None:
        self._last: tuple[datetime | None, str | None] = (None, None)

    def __call__(self, value: datetime | None) -> str | None:
        last_value, last_text = self._last  # one read: processors are shared between threads
        if value is last_value:
            return last_text
        utc = _as_utc(value)
        # isoformat's "+00:00" suffix is cut off: SQLite stores the UTC wall time.
        text = None if utc is None else utc.isoformat(" ", "microseconds")[:26]
        self._last = (value, text)
        return text


# The rows `uq_alerts_open_dedup_key` covers, as an `ON CONFLICT` clause must name them to use that index.
OPEN_ALERT_CONDITION = "status = 'open'"


class Base(DeclarativeBase):
    """Declarative base of every table; `Base.metadata` is what migrations must match."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class SessionRow(Base):
    """One session of one (model, client) pair: the persisted form of `detector.sessions.SessionState`."""

    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    model: Mapped[str] = mapped_column(String(256))
    client_id: Mapped[str] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(16))
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime())
    queries: Mapped[int] = mapped_column(BigInteger)
    requests: Mapped[int] = mapped_column(BigInteger)
    confidence_queries: Mapped[int] = mapped_column(BigInteger)
    text_queries: Mapped[int] = mapped_column(BigInteger)
    max_batch_size: Mapped[int] = mapped_column(Integer)
    model_version: Mapped[str | None] = mapped_column(String(128))
    client_ip: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(1024))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (
        # Restoring a key's latest session, and listing one client's sessions.
        Index(None, "model", "client_id", "last_seen"),
        # Closing idle open sessions.
        Index(None, "status", "last_seen"),
        # Listing a client's sessions across models.
        Index(None, "client_id"),
        # Retention: sessions not written for a while.
        Index(None, "updated_at"),
    )


class DeadLetterRow(Base):
    """A record that could not be decoded, stored once per source address (`Origin.describe()`)."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"),  # SQLite only autoincrements INTEGER keys
        primary_key=True,
        autoincrement=True,
    )
    source_key: Mapped[str] = mapped_column(String(1024), unique=True)
    reason: Mapped[str] = mapped_column(String(32), index=True)
    detail: Mapped[str] = mapped_column(Text)
    origin_kind: Mapped[str] = mapped_column(String(16))
    origin_name: Mapped[str] = mapped_column(String(1024))
    partition: Mapped[int] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(BigInteger)
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    raw_size: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class CheckpointRow(Base):
    """The next offset to read per (consumer group, topic, partition), committed with the results."""

    __tablename__ = "consumer_checkpoints"

    group_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    topic: Mapped[str] = mapped_column(String(256), primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    next_offset: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class PartitionLeaseRow(Base):
    """Which member of a consumer group owns a partition's stored state, as an epoch raised by every claim:
    a commit made under an older epoch is refused (fencing; see `detector.storage.repository`)."""

    __tablename__ = "partition_leases"

    group_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    topic: Mapped[str] = mapped_column(String(256), primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger)
    owner: Mapped[str] = mapped_column(String(256))  # host:pid of the member that claimed it, for operators
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime())
    committed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # the owner's last commit


class ClientStateRow(Base):
    """The streaming features of one (model, client) key as of the last commit that changed them
    (`detector.features.client.ClientFeatures.to_bytes`): what a restarted process, or the new owner of the
    key's partition, goes on from."""

    __tablename__ = "client_states"

    model: Mapped[str] = mapped_column(String(256), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    state: Mapped[bytes] = mapped_column(LargeBinary)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime())  # event time of the client's latest query
    # What the client was given by the model (`detector.domain.Exposure`) since `first_seen` (event time),
    # as columns that operators and dashboards query; null first_seen for states stored before.
    first_seen: Mapped[datetime | None] = mapped_column(UTCDateTime())
    probability_records: Mapped[int] = mapped_column(BigInteger, server_default="0")
    training_records: Mapped[int] = mapped_column(BigInteger, server_default="0")
    label_only_answers: Mapped[int] = mapped_column(BigInteger, server_default="0")
    probes: Mapped[int] = mapped_column(BigInteger, server_default="0")
    # Retention: states not written for a while (the client has been idle that long).
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class ModelScaleRow(Base):
    """The input scale learned online for a model served without a trained scoring model (see
    `detector.features.embedding.ModelScale.to_bytes`): the points every client's features were built on."""

    __tablename__ = "model_scales"

    model: Mapped[str] = mapped_column(String(256), primary_key=True)
    state: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class CoordinationPoolRow(Base):
    """One pool of keys sharing a model and a network, as pooled by every member of a consumer group
    (`detector.scoring.coordination.PoolState.to_bytes`): its participants and the keys already reported."""

    __tablename__ = "coordination_pools"

    model: Mapped[str] = mapped_column(String(256), primary_key=True)
    network: Mapped[str] = mapped_column(String(64), primary_key=True)  # an IPv4 /24 or an IPv6 /48
    state: Mapped[bytes] = mapped_column(LargeBinary)
    # Retention: pools not written for a while (none of their keys has queried since).
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class RiskDecisionRow(Base):
    """A risk decision on a (model, client) (`detector.domain.RiskDecision`): the policy's for one open alert
    (`origin` `alert:<id>`, withdrawn when the alert resolves), or the operator's (`origin` `operator`)."""

    __tablename__ = "risk_decisions"

    model: Mapped[str] = mapped_column(String(256), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    origin: Mapped[str] = mapped_column(String(32), primary_key=True)
    alert_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    action: Mapped[str] = mapped_column(String(16))
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(256))
    reason: Mapped[str] = mapped_column(Text)
    decided_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class RiskAuditRow(Base):
    """One change to the risk decisions, as it happened: who (`actor`), why, what (`change`: decided,
    changed, withdrawn, overridden, cleared) and the decision as it then stood."""

    __tablename__ = "risk_audit"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    model: Mapped[str] = mapped_column(String(256))
    client_id: Mapped[str] = mapped_column(String(256))
    change: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(16))
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(String(16))
    alert_id: Mapped[int | None] = mapped_column(BigInteger)
    actor: Mapped[str] = mapped_column(String(256))
    reason: Mapped[str] = mapped_column(Text)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class SeenEventRow(Base):
    """An event id already processed: the ledger that makes re-delivered events change nothing."""

    __tablename__ = "seen_events"

    event_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    event_time: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    # BLAKE2b-128 of the record's bytes: tells a re-delivery (same bytes) from another record reusing the id.
    # Null for events stored before digests were kept.
    digest: Mapped[bytes | None] = mapped_column(LargeBinary)


class AlertRow(Base):
    """An alert: the detections of one (model, client(s), kind) while it is open, combined.

    At most one row per `dedup_key` is open (a partial unique index); resolved rows are history. `first_seen`
    and `last_seen` are event time, `raised_at`, `updated_at` and `resolved_at` wall-clock time.
    """

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"),  # SQLite only autoincrements INTEGER keys
        primary_key=True,
        autoincrement=True,
    )
    dedup_key: Mapped[str] = mapped_column(String(1024))  # detector.alerts.MAX_DEDUP_KEY_LENGTH
    model: Mapped[str] = mapped_column(String(256))
    client_id: Mapped[str] = mapped_column(String(256))
    client_ids: Mapped[list[str]] = mapped_column(JSON)
    kind: Mapped[str] = mapped_column(String(64))
    severity: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    rule_id: Mapped[str] = mapped_column(String(256))
    score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    reasons: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    evidence: Mapped[list[str]] = mapped_column(JSON)
    atlas_technique: Mapped[str] = mapped_column(String(64))
    triage: Mapped[str] = mapped_column(Text)
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime())
    raised_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    queries: Mapped[int] = mapped_column(BigInteger)
    # Event time of the query on which the rule first crossed its threshold, and the client's queries by then.
    detected_at: Mapped[datetime] = mapped_column(UTCDateTime())
    detected_after_queries: Mapped[int] = mapped_column(BigInteger)
    updates: Mapped[int] = mapped_column(Integer)
    acknowledged_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The last notification written for the alert: when (wall time) and at which severity; null until the
    # first (an alert opened under a silence has none).
    notified_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    notified_severity: Mapped[str | None] = mapped_column(String(16))
    exposure: Mapped[dict[str, int] | None] = mapped_column(JSON)  # `detector.domain.Exposure`

    __table_args__ = (
        # Never two open alerts for one key, even from concurrent writers; also finds a key's open alert.
        Index(
            "uq_alerts_open_dedup_key",
            "dedup_key",
            unique=True,
            sqlite_where=text(OPEN_ALERT_CONDITION),
            postgresql_where=text(OPEN_ALERT_CONDITION),
        ),
        # Listing, newest first, optionally by status; listing by client or kind.
        Index(None, "status", "raised_at"),
        Index(None, "client_id"),
        Index(None, "kind"),
        # Retention: alerts resolved long ago.
        Index(None, "status", "resolved_at"),
    )


class SilenceRow(Base):
    """An operator's silence: alerts it matches raise no notifications until `expires_at`.

    Each of `client_id`, `model`, `kind` and `rule_id` that is set must match; at least one is set.
    """

    __tablename__ = "silences"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    client_id: Mapped[str | None] = mapped_column(String(256))
    model: Mapped[str | None] = mapped_column(String(256))
    kind: Mapped[str | None] = mapped_column(String(64))
    rule_id: Mapped[str | None] = mapped_column(String(256))
    reason: Mapped[str] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class NotificationRow(Base):
    """The outbox: one row per notification and sink, written in the transaction of the alert change.

    `status` is pending until the sink accepted it (delivered) or rejected it as invalid (failed); a pending
    row is tried again at `next_attempt_at`.
    """

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    alert_id: Mapped[int] = mapped_column(BigInteger, index=True)
    sink: Mapped[str] = mapped_column(String(32))
    idempotency_key: Mapped[str] = mapped_column(String(64))
    event: Mapped[str] = mapped_column(String(16))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        # A notification is queued once per sink.
        Index(None, "idempotency_key", "sink", unique=True),
        # A sink's queue, in order.
        Index(None, "sink", "status", "id"),
        # Retention: notifications delivered long ago.
        Index(None, "status", "delivered_at"),
    )
