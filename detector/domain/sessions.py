"""A session: one (model, client) pair's run of queries without a long pause, and its running statistics."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import StrEnum

from detector.domain.queries import Query

SessionKey = tuple[str, str]  # (model name, client id)


class SessionStatus(StrEnum):
    """Open sessions may still grow; closed ones are final."""

    OPEN = "open"
    CLOSED = "closed"


@dataclass(slots=True)
class SessionState:
    """The running statistics of one session. Times are epoch seconds (event time)."""

    id: str
    model: str
    client_id: str
    first_seen: float
    last_seen: float
    status: SessionStatus = SessionStatus.OPEN
    queries: int = 0
    requests: int = 0
    confidence_queries: int = 0
    text_queries: int = 0
    max_batch_size: int = 0
    model_version: str | None = None
    client_ip: str | None = None
    user_agent: str | None = None
    dirty: bool = field(default=True, compare=False)

    @property
    def key(self) -> SessionKey:
        """The (model, client) pair this session belongs to."""
        return (self.model, self.client_id)

    @property
    def confidence_share(self) -> float:
        """Share of queries that asked for more than a label (probabilities, top-k, logprobs)."""
        return self.confidence_queries / self.queries if self.queries else 0.0

    @classmethod
    def start(cls, query: Query) -> SessionState:
        """A new, empty session for the query's key; `add` the query to count it."""
        return cls(
            id=str(uuid.uuid4()),
            model=query.model,
            client_id=query.client_id,
            first_seen=query.timestamp,
            last_seen=query.timestamp,
        )

    def accepts(self, query: Query, gap_seconds: float, max_duration_seconds: float) -> bool:
        """True when `query` belongs to this session rather than starting the next one."""
        return (
            query.timestamp - self.last_seen <= gap_seconds
            and query.timestamp - self.first_seen <= max_duration_seconds
        )

    def add(self, query: Query) -> None:
        """Count one query (out-of-order timestamps widen the window rather than being dropped)."""
        self.queries += 1
        if query.is_first_row:
            self.requests += 1
        if query.requested.is_confidence:
            self.confidence_queries += 1
        if query.text is not None:
            self.text_queries += 1
        self.max_batch_size = max(self.max_batch_size, query.batch_size)
        self.first_seen = min(self.first_seen, query.timestamp)
        self.last_seen = max(self.last_seen, query.timestamp)
        self.model_version = query.model_version or self.model_version
        self.client_ip = query.client_ip or self.client_ip
        self.user_agent = query.user_agent or self.user_agent
        self.dirty = True
