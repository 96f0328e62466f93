"""What every streaming feature is: a small stateful object with a one-observation update and a snapshot.

Features keep counters only (bounded memory), so their state is a flat dict of numbers: `state()` and
`from_state()` move it between processes when Kafka moves a partition.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self

from detector.features.embedding import Observation


@dataclasses.dataclass
class CounterFeature:
    """Base of the counter-based features: subclasses declare their counters as dataclass fields."""

    name: ClassVar[str]

    def update(self, observation: Observation) -> None:
        """Fold one observation into the counters."""
        raise NotImplementedError

    def snapshot(self) -> dict[str, float]:
        """The feature's current values, named `<feature name>.<value>`."""
        return {f"{self.name}.{key}": float(value) for key, value in self.values().items()}

    def values(self) -> dict[str, float]:
        """The current values, unprefixed."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """The counters, JSON-serialisable."""
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Self:
        """A feature continuing from `state`."""
        return cls(**state)


def ratio(part: float, whole: float) -> float:
    """`part / whole`, 0 when `whole` is 0."""
    return part / whole if whole else 0.0
