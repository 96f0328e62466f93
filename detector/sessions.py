"""Session windows per (model, client): running statistics, inactivity gap, maximum duration, bounded memory.

A query continues its key's session when it falls within `gap_seconds` of the session's last query and
within `max_duration_seconds` of its first; otherwise the session ends and a new one starts. That decision
depends only on the key's own events, so a file replay and a Kafka stream (where each client's events stay in
one partition) produce the same sessions whatever the interleaving of other clients.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator

from detector.domain import Query, SessionKey, SessionState, SessionStatus


class SessionTracker:
    """Holds the open sessions in memory, at most `max_active` of them, least recently active evicted first.

    The tracker never touches storage: it reports what must be persisted (`changed`, then `persisted` once
    the pipeline stored it) and takes back sessions it does not hold through `restore`, which the pipeline
    fills from the database once per batch.
    """

    def __init__(
        self,
        gap_seconds: float,
        max_duration_seconds: float,
        max_active: int,
        allowed_lateness_seconds: float = 0.0,
    ) -> None:
        self.gap_seconds = gap_seconds
        self.max_duration_seconds = max_duration_seconds
        self.max_active = max_active
        self.allowed_lateness_seconds = allowed_lateness_seconds
        self._active: OrderedDict[SessionKey, SessionState] = OrderedDict()
        self._evicted: dict[SessionKey, SessionState] = {}
        self._closed: dict[str, SessionState] = {}  # by session id, until persisted
        # The sessions `close_idle` ended, by key, until persisted: the latest session of a key with none
        # active, newer than what storage holds of it, so it is continued from here, never restored.
        self._idle: dict[SessionKey, SessionState] = {}

    def __len__(self) -> int:
        return len(self._active)

    def __iter__(self) -> Iterator[SessionState]:
        return iter(list(self._active.values()))

    def idle_horizon(self, watermark: float) -> float:
        """Sessions whose last query is older than this, when the stream's event time is `watermark`, are
        idle: no in-order query can continue them."""
        return watermark - self.gap_seconds - self.allowed_lateness_seconds

    def get(self, key: SessionKey) -> SessionState | None:
        """The in-memory session of `key`, if any."""
        return self._active.get(key)

    def missing(self, keys: Iterable[SessionKey]) -> set[SessionKey]:
        """Those of `keys` the tracker holds no session for: candidates for `restore`."""
        return {
            key
            for key in keys
            if key not in self._active and key not in self._evicted and key not in self._idle
        }

    def restore(self, session: SessionState) -> None:
        """Take back the latest session of a key read from storage (evicted, or ended by idleness)."""
        session.dirty = False
        self._active[session.key] = session
        self._evict_over_limit()

    def update(self, query: Query) -> SessionState:
        """Add `query` to its key's session, ending the session and starting a new one when it must."""
        key = (query.model, query.client_id)
        session = self._active.get(key) or self._evicted.pop(key, None) or self._idle.pop(key, None)
        if session is not None and not session.accepts(query, self.gap_seconds, self.max_duration_seconds):
            self._close(session)
            session = None
        if session is None:
            session = SessionState.start(query)
        elif session.status is SessionStatus.CLOSED:
            # Closed for idleness while this key's partition lagged behind the others: its own events say
            # the session goes on, and the key's events alone decide.
            session.status = SessionStatus.OPEN
            self._closed.pop(session.id, None)
        self._active[key] = session
        self._active.move_to_end(key)
        session.add(query)
        self._evict_over_limit()
        return session

    def close_idle(self, watermark: float) -> int:
        """End every in-memory session idle at event time `watermark` (see `idle_horizon`); return how
        many."""
        horizon = self.idle_horizon(watermark)
        idle = [session for session in self._active.values() if session.last_seen < horizon]
        for session in idle:
            self._close(session)
            self._idle[session.key] = session
        return len(idle)

    def changed(self) -> list[SessionState]:
        """Sessions changed since they were last persisted: persist them all, in this order, then call
        `persisted`. Until then they stay pending, so a failed write loses none of them."""
        changed = [*self._closed.values(), *self._evicted.values()]
        changed.extend(session for session in self._active.values() if session.dirty)
        return changed

    def persisted(self) -> None:
        """Mark every session `changed` returned as durably stored (closed and evicted ones are let go)."""
        for session in self.changed():
            session.dirty = False
        self._closed = {}
        self._evicted = {}
        self._idle = {}

    def clear(self) -> None:
        """Forget every in-memory session, persisted or not (the records behind the unpersisted ones must be
        read again)."""
        self._active.clear()
        self._evicted.clear()
        self._closed.clear()
        self._idle.clear()

    def _close(self, session: SessionState) -> None:
        session.status = SessionStatus.CLOSED
        session.dirty = True
        self._active.pop(session.key, None)
        self._closed[session.id] = session

    def _evict_over_limit(self) -> None:
        # Evicted sessions stay open in storage: when the client comes back within the gap the pipeline
        # restores them, so eviction bounds memory without changing which session a query belongs to.
        while len(self._active) > self.max_active:
            key, session = self._active.popitem(last=False)
            self._evicted[key] = session
