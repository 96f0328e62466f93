"""What a client has been given by a model: the measure of how much an attacker may already have learned."""

from __future__ import annotations

import operator
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field


class Exposure(BaseModel):
    """What one client (or a set of clients) has received from a model so far, whatever the rules made of it.

    Records are told apart as the client's record clusters tell them (a record and its near variants are one),
    so a count of records is of distinct inputs, not of queries; a cluster forgotten under the client's
    bound counts again when it comes back.
    """

    model_config = ConfigDict(frozen=True)
    probability_records: int = Field(
        default=0,
        ge=0,
        description="distinct records answered with a confidence vector (probabilities, "
        "top-k or log-probabilities)",
    )
    training_records: int = Field(
        default=0, ge=0, description="of those, records the training-set index holds (exact or near copies)"
    )
    label_only_answers: int = Field(default=0, ge=0, description="queries answered with the label alone")
    probes: int = Field(
        default=0, ge=0, description="near-duplicate probes: dense variants of a record sent in bursts"
    )

    def __add__(self, other: Exposure) -> Exposure:
        """What two disjoint sets of clients were given together."""
        return self._each(other, operator.add)

    def at_least(self, other: Exposure) -> Exposure:
        """The larger of each count: what overlapping sets of clients were given together, at least."""
        return self._each(other, max)

    def _each(self, other: Exposure, combine: Callable[[int, int], int]) -> Exposure:
        """`combine` of this and `other`'s values of each count."""
        return Exposure(
            **{name: combine(getattr(self, name), getattr(other, name)) for name in type(self).model_fields}
        )

    def summary(self) -> str:
        """One line for people: "12 training records with probabilities (340 records), 5 label-only
        answers, 96 probes"."""
        return (
            f"{self.training_records} training records with probabilities "
            f"({self.probability_records} records), {self.label_only_answers} label-only answers, "
            f"{self.probes} probes"
        )
