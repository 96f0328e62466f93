"""The decoded unit the pipeline works on: one input row of one request, as a `Query`."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np


class Requested(StrEnum):
    """What a client asked the model to return for a query."""

    LABEL = "label"
    PROBABILITIES = "probabilities"
    TOP_K = "top_k"
    LOGPROBS = "logprobs"

    @property
    def is_confidence(self) -> bool:
        """True when the answer reveals more than the label (the raw material of most MIAs)."""
        return self is not Requested.LABEL


@dataclass(slots=True)
class Query:
    """One input row of one prediction request, with what the client asked for and what it got back.

    `vector` is the row's numeric features (float32) and `text` its BYTES inputs joined; at least one is set.
    `timestamp` is epoch seconds (event time). `row` is the row's index in the request's batch and
    `batch_size` the number of rows in that request.
    """

    event_id: str
    row: int
    batch_size: int
    timestamp: float
    model: str
    model_version: str | None
    client_id: str
    client_ip: str | None
    user_agent: str | None
    vector: np.ndarray | None
    text: str | None
    requested: Requested
    label: str | None
    probabilities: np.ndarray | None

    @property
    def is_first_row(self) -> bool:
        """True for one row per request, so that request counts need no separate bookkeeping."""
        return self.row == 0
