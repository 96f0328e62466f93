"""The one gateway to the database: what the pipeline reads and makes durable, and what the CLI reads.

`Store.transaction` is the pipeline's commit point: alerts (through `Transaction.alerts`), seen events,
sessions, dead letters and consumer checkpoints (`Transaction.write`) go in one transaction, so offsets are
never stored ahead of what was derived from them, and writing the same batch again changes nothing.

Fencing: a consumer-group member claims its partitions when they are assigned (`Store.claim_partitions`),
raising each one's lease epoch, and every commit first holds the leases it was given
(`Transaction.hold_leases`). A member that lost a partition without knowing it yet (stalled past its session
timeout, cut off from the brokers) then finds a newer epoch and stores nothing. The lease rows are locked by
both, so a commit and a claim of the same partition are serialised: either the commit lands first and the
claim reads its positions, or the claim lands first and the commit is refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeVar

import orjson
from sqlalchemy import Engine, delete, func, select, tuple_, update
from sqlalchemy.engine import Connection, Row

from detector.domain import DeadLetter, Exposure, SessionKey, SessionState, SessionStatus
from detector.settings import Settings
from detector.storage.alerts import AlertRepository, AlertStore
from detector.storage.base import Repository, dialect_insert, lock_sqlite
from detector.storage.database import open_engine
from detector.storage.errors import Fenced, storage_errors
from detector.storage.tables import (
    Base,
    CheckpointRow,
    ClientStateRow,
    CoordinationPoolRow,
    DeadLetterRow,
    ModelScaleRow,
    PartitionLeaseRow,
    SeenEventRow,
    SessionRow,
)

# Bound parameters per IN list: far below every backend's limit, large enough to need few statements.
_CHUNK = 500
# Learned input scales read back at start: as many as a process keeps (`detector.features.embedding`).
MAX_STORED_SCALES = 256

_T = TypeVar("_T")

_SESSION_COLUMNS = tuple(column.name for column in SessionRow.__table__.columns)
# What a later commit writes over a client's stored state: all but its key.
_CLIENT_STATE_UPDATED = tuple(
    column.name for column in ClientStateRow.__table__.columns if column.name not in ("model", "client_id")
)


@dataclass(frozen=True)
class Checkpoint:
    """The next offset to consume from one partition, for one consumer group."""

    group_id: str
    topic: str
    partition: int
    next_offset: int


Partition = tuple[str, int]  # (topic, partition)
PoolKey = tuple[str, str]  # (model, network)


@dataclass(frozen=True)
class Claim:
    """Partitions claimed for one member of a consumer group: the epoch of each lease, and the positions
    stored for them (partitions without a stored position are left out)."""

    epochs: dict[Partition, int]
    positions: dict[Partition, int]


class StoredClientState(NamedTuple):
    """One (model, client) key's streaming features as stored (opaque bytes, see
    `detector.features.client.ClientFeatures.to_bytes`), with the event time of its latest query, and what it
    was given by the model since its first (stored apart for people to query)."""

    model: str
    client_id: str
    state: bytes
    last_seen: float
    first_seen: float | None = None
    exposure: Exposure = Exposure()


class ClientExposure(NamedTuple):
    """What one (model, client) key was given by the model (see `StoredClientState`), as of its last
    stored change (wall time `updated_at`) and the event time of its first and latest query."""

    model: str
    client_id: str
    first_seen: datetime | None
    last_seen: datetime
    exposure: Exposure
    updated_at: datetime


class SeenEvent(NamedTuple):
    """An event processed: its id, its event time (epoch seconds) and the digest of its record's bytes."""

    event_id: str
    event_time: float
    digest: bytes


@dataclass
class DurableBatch:
    """What the pipeline derived from records, besides alerts, to be stored atomically with them.

    `close_sessions_before` closes stored open sessions whose last query is older (epoch seconds);
    `forget_seen_after_seconds` forgets seen events processed (wall time) longer ago than that.
    """

    seen_events: list[SeenEvent] = field(default_factory=list)
    sessions: list[SessionState] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    client_states: list[StoredClientState] = field(default_factory=list)
    model_scales: dict[str, bytes] = field(default_factory=dict)  # model -> its learned input scale
    close_sessions_before: float | None = None
    forget_seen_after_seconds: float | None = None


@dataclass(frozen=True)
class StoredDeadLetter:
    """A dead letter as stored; `source` is where the record came from (`Origin.describe()`)."""

    id: int
    reason: str
    detail: str
    source: str
    raw: bytes
    raw_size: int
    received_at: datetime
    created_at: datetime


def open_store(settings: Settings, migrate: bool | None = None) -> Store:
    """The store at the configured database URL, migrated to the latest schema unless told otherwise (see
    `open_engine`)."""
    return Store(open_engine(settings, migrate))


class Store(Repository):
    """Reads and writes the detector's tables on SQLite or PostgreSQL (migrated to head beforehand).

    `clock` returns the current time in epoch seconds; it stamps `updated_at`, `created_at` and `seen_at`.
    """

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(engine, clock=clock)
        self.alerts = AlertStore(engine, clock=clock)

    # -- pipeline ----------------------------------------------------------------------------------------

    def seen_digests(self, event_ids: Collection[str]) -> dict[str, bytes | None]:
        """Those of `event_ids` already processed (and not yet forgotten), with the digest of their record
        (None for events stored before digests were kept). Raises `StorageError`."""
        if not event_ids:
            return {}
        # One statement whatever the batch size: the ids travel as one array (PostgreSQL) or one JSON
        # document (SQLite) instead of thousands of bound parameters.
        if self._engine.dialect.name == "sqlite":
            sql = (
                "SELECT event_id, digest FROM seen_events WHERE event_id IN (SELECT value FROM json_each(?))"
            )
            parameters: Any = (orjson.dumps(list(event_ids)).decode(),)
        else:
            sql = "SELECT event_id, digest FROM seen_events WHERE event_id = ANY(%(ids)s)"
            parameters = {"ids": list(event_ids)}
        with storage_errors("reading seen events"), self._engine.connect() as connection:
            return {row[0]: row[1] for row in connection.exec_driver_sql(sql, parameters)}

    def latest_sessions(self, keys: Collection[SessionKey]) -> list[SessionState]:
        """For each (model, client) key, its stored session with the latest `last_seen`, open or closed.

        Keys without a stored session are left out; the result is in no particular order. Raises
        `StorageError`.
        """
        latest: list[SessionState] = []
        with storage_errors("reading sessions"), self._engine.connect() as connection:
            for chunk in _chunks(list(set(keys))):
                ranked = (
                    select(
                        SessionRow.__table__,
                        func.row_number()
                        .over(
                            partition_by=(SessionRow.model, SessionRow.client_id),
                            order_by=(SessionRow.last_seen.desc(), SessionRow.id.desc()),
                        )
                        .label("rank"),
                    )
                    .where(tuple_(SessionRow.model, SessionRow.client_id).in_(chunk))
                    .subquery()
                )
                rows = connection.execute(select(ranked).where(ranked.c.rank == 1))
                latest.extend(_session_state(row) for row in rows)
        return latest

    def client_states(self, keys: Collection[SessionKey]) -> dict[SessionKey, bytes]:
        """The stored state of each of the (model, client) `keys` that has one. Raises `StorageError`."""
        found: dict[SessionKey, bytes] = {}
        with storage_errors("reading client states"), self._engine.connect() as connection:
            for chunk in _chunks(list(set(keys))):
                rows = connection.execute(
                    select(ClientStateRow.model, ClientStateRow.client_id, ClientStateRow.state).where(
                        tuple_(ClientStateRow.model, ClientStateRow.client_id).in_(chunk)
                    )
                )
                found.update({(model, client_id): state for model, client_id, state in rows})
        return found

    def every_client_state(self) -> dict[SessionKey, bytes]:
        """The stored state of every (model, client) key: the whole table, for a database of bounded size
        (an evaluation's own). Raises `StorageError`."""
        with storage_errors("reading client states"), self._engine.connect() as connection:
            rows = connection.execute(
                select(ClientStateRow.model, ClientStateRow.client_id, ClientStateRow.state)
            )
            return {(model, client_id): state for model, client_id, state in rows}

    def pools(self, keys: Collection[PoolKey]) -> dict[PoolKey, bytes]:
        """The stored state of each of the (model, network) pools `keys` that has one, unlocked (see
        `Transaction.read_pools` for the locked read of a commit). Raises `StorageError`."""
        with storage_errors("reading coordination pools"), self._engine.connect() as connection:
            return _pools(connection, keys)

    def model_scales(self) -> dict[str, bytes]:
        """The input scales learned online and stored, by model: the `MAX_STORED_SCALES` most recently
        written (model names come from the records, so there may be many). Raises `StorageError`."""
        with storage_errors("reading input scales"), self._engine.connect() as connection:
            rows = connection.execute(
                select(ModelScaleRow.model, ModelScaleRow.state)
                .order_by(ModelScaleRow.updated_at.desc())
                .limit(MAX_STORED_SCALES)
            )
            return {model: state for model, state in rows}

    def claim_partitions(self, group_id: str, partitions: Collection[Partition], owner: str) -> Claim:
        """Take the leases of `partitions` for `owner` (a member of `group_id`), each a new epoch, and read
        their stored positions after every commit made under an older lease. Raises `StorageError`."""
        with self.transaction("claiming partitions") as transaction:
            return transaction.claim(group_id, partitions, owner)

    @contextmanager
    def transaction(self, action: str = "storing a batch") -> Iterator[Transaction]:
        """One transaction for the block: all of what is written through it or, on error, none of it.

        Raises `StorageUnavailable` (retry the same work later) or `StorageFailed`, naming `action`; an
        exception of the block's own passes through, rolling back.
        """
        with storage_errors(action), self._engine.begin() as connection:
            lock_sqlite(connection)
            yield Transaction(connection, self._clock)

    # -- command line ------------------------------------------------------------------------------------

    def list_sessions(
        self, client_id: str | None = None, model: str | None = None, limit: int = 1000
    ) -> list[SessionState]:
        """Up to `limit` stored sessions, optionally of one client and/or model, latest `last_seen` first."""
        query = (
            select(SessionRow.__table__)
            .order_by(SessionRow.last_seen.desc(), SessionRow.id.desc())
            .limit(limit)
        )
        if client_id is not None:
            query = query.where(SessionRow.client_id == client_id)
        if model is not None:
            query = query.where(SessionRow.model == model)
        with self._engine.connect() as connection:
            return [_session_state(row) for row in connection.execute(query)]

    def client_exposures(self, client_id: str, model: str | None = None) -> list[ClientExposure]:
        """What the client was given, one entry per model it queried (or `model`'s only), by model name."""
        query = select(ClientStateRow.__table__).where(ClientStateRow.client_id == client_id)
        if model is not None:
            query = query.where(ClientStateRow.model == model)
        with self._engine.connect() as connection:
            rows = connection.execute(query.order_by(ClientStateRow.model))
            return [
                ClientExposure(
                    row.model,
                    row.client_id,
                    row.first_seen,
                    row.last_seen,
                    Exposure(**{name: getattr(row, name) for name in Exposure.model_fields}),
                    row.updated_at,
                )
                for row in rows
            ]

    def count_sessions(self) -> int:
        """How many sessions are stored, open or closed."""
        return self._count(SessionRow)

    def list_dead_letters(self, reason: str | None = None, limit: int = 1000) -> list[StoredDeadLetter]:
        """Up to `limit` dead letters, optionally of one reason, most recently stored first."""
        query = (
            select(DeadLetterRow.__table__)
            .order_by(DeadLetterRow.created_at.desc(), DeadLetterRow.id.desc())
            .limit(limit)
        )
        if reason is not None:
            query = query.where(DeadLetterRow.reason == reason)
        with self._engine.connect() as connection:
            return [
                StoredDeadLetter(
                    id=row.id,
                    reason=row.reason,
                    detail=row.detail,
                    source=row.source_key,
                    raw=row.raw,
                    raw_size=row.raw_size,
                    received_at=row.received_at,
                    created_at=row.created_at,
                )
                for row in connection.execute(query)
            ]

    def dead_letter_counts(self) -> dict[str, int]:
        """The number of stored dead letters per reason (reasons without any are absent)."""
        query = select(DeadLetterRow.reason, func.count()).group_by(DeadLetterRow.reason)
        with self._engine.connect() as connection:
            return {reason: count for reason, count in connection.execute(query)}

    def checkpoints(self, group_id: str) -> dict[tuple[str, int], int]:
        """The stored next offset of each (topic, partition) consumed by `group_id`."""
        query = select(CheckpointRow.topic, CheckpointRow.partition, CheckpointRow.next_offset).where(
            CheckpointRow.group_id == group_id
        )
        with self._engine.connect() as connection:
            return {
                (topic, partition): next_offset for topic, partition, next_offset in connection.execute(query)
            }

    def count_seen_events(self) -> int:
        """How many event ids are remembered as seen."""
        return self._count(SeenEventRow)

    # -- internals ---------------------------------------------------------------------------------------

    def _count(self, table: type[Base]) -> int:
        with self._engine.connect() as connection:
            return connection.execute(select(func.count()).select_from(table)).scalar_one()


class Transaction:
    """Writes inside one of `Store.transaction`'s transactions: the alerts (`alerts`) and the rest of what
    the pipeline derived from its records (`write`). `clock` (epoch seconds) stamps what is written."""

    def __init__(self, connection: Connection, clock: Callable[[], float]) -> None:
        self._connection = connection
        self._clock = clock
        self.alerts = AlertRepository(connection)

    def claim(self, group_id: str, partitions: Collection[Partition], owner: str) -> Claim:
        """See `Store.claim_partitions`."""
        if not partitions:
            return Claim({}, {})
        now = _utc(self._clock())
        statement = dialect_insert(self._connection, PartitionLeaseRow)
        statement = statement.on_conflict_do_update(
            index_elements=["group_id", "topic", "partition"],
            set_={
                "epoch": PartitionLeaseRow.epoch + 1,
                "owner": statement.excluded.owner,
                "claimed_at": statement.excluded.claimed_at,
            },
        )
        keys = sorted(set(partitions))  # one lock order for every claimer: no deadlock between two of them
        self._connection.execute(
            statement,
            [
                {"group_id": group_id, "topic": topic, "partition": partition, "epoch": 1, "owner": owner}
                | {"claimed_at": now}
                for topic, partition in keys
            ],
        )
        epochs: dict[Partition, int] = {}
        positions: dict[Partition, int] = {}
        for chunk in _chunks(keys):
            for topic, partition, epoch in self._connection.execute(
                select(PartitionLeaseRow.topic, PartitionLeaseRow.partition, PartitionLeaseRow.epoch).where(
                    PartitionLeaseRow.group_id == group_id,
                    tuple_(PartitionLeaseRow.topic, PartitionLeaseRow.partition).in_(chunk),
                )
            ):
                epochs[(topic, partition)] = epoch
            for topic, partition, offset in self._connection.execute(
                select(CheckpointRow.topic, CheckpointRow.partition, CheckpointRow.next_offset).where(
                    CheckpointRow.group_id == group_id,
                    tuple_(CheckpointRow.topic, CheckpointRow.partition).in_(chunk),
                )
            ):
                positions[(topic, partition)] = offset
        return Claim(epochs, positions)

    def hold_leases(self, group_id: str, epochs: Mapping[Partition, int]) -> None:
        """Check that `group_id`'s lease of each partition in `epochs` still has the epoch given, locking the
        leases until the transaction ends. Call first in the transaction (before other rows are locked).

        Raises `Fenced` when another member claimed one of them since (an epoch 0 stands for a partition never
        claimed, and is always refused); the transaction then rolls back.
        """
        if not epochs:
            return
        # One locking read, in one order as every claimer locks them (a single UPDATE would lock the rows in
        # the table's order, and could deadlock with a claim of two of them), gives the epochs to compare.
        current = {
            (topic, partition): (epoch, owner)
            for chunk in _chunks(sorted(epochs))
            for topic, partition, epoch, owner in self._connection.execute(
                select(
                    PartitionLeaseRow.topic,
                    PartitionLeaseRow.partition,
                    PartitionLeaseRow.epoch,
                    PartitionLeaseRow.owner,
                )
                .where(
                    PartitionLeaseRow.group_id == group_id,
                    tuple_(PartitionLeaseRow.topic, PartitionLeaseRow.partition).in_(chunk),
                )
                .order_by(PartitionLeaseRow.topic, PartitionLeaseRow.partition)
                .with_for_update()
            )
        }
        if all(current.get(key, (0, ""))[0] == epoch != 0 for key, epoch in epochs.items()):
            now = _utc(self._clock())
            for chunk in _chunks(sorted(epochs)):
                self._connection.execute(
                    update(PartitionLeaseRow)
                    .where(
                        PartitionLeaseRow.group_id == group_id,
                        tuple_(PartitionLeaseRow.topic, PartitionLeaseRow.partition).in_(chunk),
                    )
                    .values(committed_at=now)
                )
            return
        lost = []
        for key, epoch in sorted(epochs.items()):
            if key not in current:
                lost.append(f"{key[0]}/{key[1]} (epoch {epoch}, never claimed)")
            elif current[key][0] != epoch:
                now_epoch, owner = current[key]
                lost.append(f"{key[0]}/{key[1]} (epoch {epoch}, now {now_epoch}, claimed by {owner})")
        raise Fenced(
            f"group {group_id}: partitions claimed by another member: {', '.join(lost)}; nothing stored, the "
            "records read and not stored are read again by the partitions' owners"
        )

    def read_pools(self, keys: Sequence[PoolKey]) -> dict[PoolKey, bytes]:
        """The stored state of each of the (model, network) pools `keys` that has one, every one of them
        locked until the transaction ends, whether it has a state yet or not: another member's commit that
        shares one of these pools waits for this one, and reads what it wrote."""
        if not keys:
            return {}
        # An empty row for each pool not stored yet: a row to lock (two members creating one pool at once
        # are serialised on its key).
        placeholder = dialect_insert(self._connection, CoordinationPoolRow).on_conflict_do_nothing(
            index_elements=["model", "network"]
        )
        now = _utc(self._clock())
        ordered = sorted(set(keys))  # one lock order for every member
        for chunk in _chunks(ordered):
            self._connection.execute(
                placeholder,
                [
                    {"model": model, "network": network, "state": b"", "updated_at": now}
                    for model, network in chunk
                ],
            )
        return _pools(self._connection, ordered, lock=True)

    def write_pools(self, pools: Mapping[PoolKey, bytes]) -> None:
        """Store the state of each pool, replacing what was stored."""
        if not pools:
            return
        now = _utc(self._clock())
        statement = dialect_insert(self._connection, CoordinationPoolRow)
        statement = statement.on_conflict_do_update(
            index_elements=["model", "network"],
            set_={"state": statement.excluded.state, "updated_at": statement.excluded.updated_at},
        )
        rows = [
            {"model": model, "network": network, "state": state, "updated_at": now}
            for (model, network), state in sorted(pools.items())
        ]
        for chunk in _chunks(rows):
            self._connection.execute(statement, list(chunk))

    def write(self, batch: DurableBatch) -> None:
        """Store `batch`: seen events and dead letters already stored are kept as they are; sessions (by id),
        checkpoints (by group, topic and partition) and client states (by model and client) are
        overwritten. Stale open sessions are then closed and old seen events forgotten. Writing the same
        batch twice leaves the same rows as writing it once, but for the `updated_at` stamps."""
        now = _utc(self._clock())
        self._insert_seen_events(batch.seen_events, now)
        self._upsert_sessions(batch.sessions, now)
        self._insert_dead_letters(batch.dead_letters, now)
        self._upsert_checkpoints(batch.checkpoints, now)
        self._upsert_client_states(batch.client_states, now)
        self._upsert_model_scales(batch.model_scales, now)
        if batch.close_sessions_before is not None:
            self._connection.execute(
                update(SessionRow)
                .where(
                    SessionRow.status == SessionStatus.OPEN.value,
                    SessionRow.last_seen < _utc(batch.close_sessions_before),
                )
                .values(status=SessionStatus.CLOSED.value, updated_at=now)
            )
        if batch.forget_seen_after_seconds is not None:
            cutoff = _utc(self._clock() - batch.forget_seen_after_seconds)
            self._connection.execute(delete(SeenEventRow).where(SeenEventRow.seen_at < cutoff))

    def _insert_seen_events(self, events: Sequence[SeenEvent], now: datetime) -> None:
        # The one per-event write of the pipeline: it goes to the driver directly (one executemany on SQLite,
        # one array statement on PostgreSQL), which costs a fraction of SQLAlchemy's per-row parameter work.
        if not events:
            return
        if self._connection.dialect.name == "sqlite":
            now_text = _sqlite_text(now.timestamp())
            self._connection.exec_driver_sql(
                "INSERT INTO seen_events (event_id, event_time, seen_at, digest) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (event_id) DO NOTHING",
                [
                    (event.event_id, _sqlite_text(event.event_time), now_text, event.digest)
                    for event in events
                ],
            )
            return
        self._connection.exec_driver_sql(
            "INSERT INTO seen_events (event_id, event_time, seen_at, digest)"
            " SELECT id, to_timestamp(t), %(now)s, d"
            " FROM unnest(%(ids)s::varchar[], %(times)s::float8[], %(digests)s::bytea[]) AS u(id, t, d)"
            " ON CONFLICT (event_id) DO NOTHING",
            {
                "ids": [event.event_id for event in events],
                "times": [event.event_time for event in events],
                "digests": [event.digest for event in events],
                "now": now,
            },
        )

    def _upsert_sessions(self, sessions: Sequence[SessionState], now: datetime) -> None:
        if not sessions:
            return
        # One row per id, the last state winning: PostgreSQL refuses to update a row twice in one statement.
        rows = {session.id: _session_row(session, now) for session in sessions}
        statement = dialect_insert(self._connection, SessionRow)
        statement = statement.on_conflict_do_update(
            index_elements=["id"],
            set_={name: statement.excluded[name] for name in _SESSION_COLUMNS if name != "id"},
        )
        self._connection.execute(statement, list(rows.values()))

    def _insert_dead_letters(self, dead_letters: Sequence[DeadLetter], now: datetime) -> None:
        if not dead_letters:
            return
        rows: dict[str, dict[str, Any]] = {}
        for letter in dead_letters:
            source = letter.origin.describe()
            rows.setdefault(
                source,
                {
                    "source_key": source,
                    "reason": letter.reason.value,
                    "detail": letter.detail,
                    "origin_kind": letter.origin.kind,
                    "origin_name": letter.origin.name,
                    "partition": letter.origin.partition,
                    "position": letter.origin.position,
                    "raw": letter.raw,
                    "raw_size": letter.raw_size,
                    "received_at": _utc(letter.received_at),
                    "created_at": now,
                },
            )
        statement = dialect_insert(self._connection, DeadLetterRow).on_conflict_do_nothing(
            index_elements=["source_key"]
        )
        self._connection.execute(statement, list(rows.values()))

    def _upsert_checkpoints(self, checkpoints: Sequence[Checkpoint], now: datetime) -> None:
        if not checkpoints:
            return
        rows = {
            (checkpoint.group_id, checkpoint.topic, checkpoint.partition): {
                "group_id": checkpoint.group_id,
                "topic": checkpoint.topic,
                "partition": checkpoint.partition,
                "next_offset": checkpoint.next_offset,
                "updated_at": now,
            }
            for checkpoint in checkpoints
        }
        statement = dialect_insert(self._connection, CheckpointRow)
        statement = statement.on_conflict_do_update(
            index_elements=["group_id", "topic", "partition"],
            set_={"next_offset": statement.excluded.next_offset, "updated_at": statement.excluded.updated_at},
        )
        self._connection.execute(statement, list(rows.values()))

    def _upsert_client_states(self, states: Sequence[StoredClientState], now: datetime) -> None:
        if not states:
            return
        rows = {
            (state.model, state.client_id): {
                "model": state.model,
                "client_id": state.client_id,
                "state": state.state,
                "last_seen": _utc(state.last_seen),
                "first_seen": _utc(state.first_seen) if state.first_seen is not None else None,
                **state.exposure.model_dump(),
                "updated_at": now,
            }
            for state in states
        }
        statement = dialect_insert(self._connection, ClientStateRow)
        statement = statement.on_conflict_do_update(
            index_elements=["model", "client_id"],
            set_={name: statement.excluded[name] for name in _CLIENT_STATE_UPDATED},
        )
        for chunk in _chunks(list(rows.values())):
            self._connection.execute(statement, list(chunk))

    def _upsert_model_scales(self, scales: Mapping[str, bytes], now: datetime) -> None:
        if not scales:
            return
        statement = dialect_insert(self._connection, ModelScaleRow)
        statement = statement.on_conflict_do_update(
            index_elements=["model"],
            set_={"state": statement.excluded.state, "updated_at": statement.excluded.updated_at},
        )
        rows = [{"model": model, "state": state, "updated_at": now} for model, state in scales.items()]
        self._connection.execute(statement, rows)


def _pools(connection: Connection, keys: Collection[PoolKey], lock: bool = False) -> dict[PoolKey, bytes]:
    """The non-empty stored states of the pools `keys`; with `lock`, their rows locked (PostgreSQL: FOR
    UPDATE; a SQLite transaction holds the whole database already)."""
    found: dict[PoolKey, bytes] = {}
    for chunk in _chunks(sorted(set(keys))):
        query = select(
            CoordinationPoolRow.model, CoordinationPoolRow.network, CoordinationPoolRow.state
        ).where(tuple_(CoordinationPoolRow.model, CoordinationPoolRow.network).in_(chunk))
        if lock:  # in one order for every member
            query = query.order_by(CoordinationPoolRow.model, CoordinationPoolRow.network).with_for_update()
        found.update(
            {(model, network): state for model, network, state in connection.execute(query) if state}
        )
    return found


def _session_row(session: SessionState, now: datetime) -> dict[str, Any]:
    return {
        "id": session.id,
        "model": session.model,
        "client_id": session.client_id,
        "status": session.status.value,
        "first_seen": _utc(session.first_seen),
        "last_seen": _utc(session.last_seen),
        "queries": session.queries,
        "requests": session.requests,
        "confidence_queries": session.confidence_queries,
        "text_queries": session.text_queries,
        "max_batch_size": session.max_batch_size,
        "model_version": session.model_version,
        "client_ip": session.client_ip,
        "user_agent": session.user_agent,
        "updated_at": now,
    }


def _session_state(row: Row[Any]) -> SessionState:
    return SessionState(
        id=row.id,
        model=row.model,
        client_id=row.client_id,
        first_seen=row.first_seen.timestamp(),
        last_seen=row.last_seen.timestamp(),
        status=SessionStatus(row.status),
        queries=row.queries,
        requests=row.requests,
        confidence_queries=row.confidence_queries,
        text_queries=row.text_queries,
        max_batch_size=row.max_batch_size,
        model_version=row.model_version,
        client_ip=row.client_ip,
        user_agent=row.user_agent,
        dirty=False,
    )


def _sqlite_text(epoch_seconds: float) -> str:
    """The text `UTCDateTime` stores on SQLite for an epoch-seconds instant."""
    return datetime.fromtimestamp(epoch_seconds, UTC).isoformat(" ", "microseconds")[:26]


def _utc(epoch_seconds: float) -> datetime:
    return datetime.fromtimestamp(epoch_seconds, UTC)


def _chunks(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]
