"""What every streaming feature is: a small stateful object with a one-observation update and a snapshot.

A feature is updated with each observation and the cluster match the client's `RecordClusters` gave it, and
reads nothing else. Features keep counters only (bounded memory), so their state is a flat dict of finite
numbers (and lists of them): `state()` and `from_state()` move it between processes when Kafka moves a
partition, and the restored feature goes on exactly as the original would have.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any, ClassVar, Self

from detector.features.clusters import ClusterMatch
from detector.features.embedding import Observation


@dataclasses.dataclass
class CounterFeature:
    """Base of the counter-based features: subclasses declare their counters as dataclass fields, slotted
    (`@dataclasses.dataclass(slots=True)`): a dict per feature would cost every tracked client ~1 KiB."""

    __slots__ = ()  # no fields of its own; `slots=True` would remake the class under `__init_subclass__`

    name: ClassVar[str]
    # `<name>.<value>` of each value name, made once per class: snapshots are taken for every judged client.
    _qualified: ClassVar[_QualifiedNames]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._qualified = _QualifiedNames(cls.name)

    def update(self, observation: Observation, match: ClusterMatch) -> None:
        """Fold one observation, and how it matched the client's clusters, into the counters."""
        raise NotImplementedError

    def snapshot(self) -> dict[str, float]:
        """The feature's current values, named `<feature name>.<value>`."""
        values: dict[str, float] = {}
        self.snapshot_into(values)
        return values

    def snapshot_into(self, values: dict[str, float]) -> None:
        """Add the feature's current values to `values`, as `snapshot` names them: a client's snapshot is
        one dict, filled by each of its features in turn."""
        qualified = self._qualified
        for key, value in self.values().items():
            values[qualified[key]] = float(value)

    def values(self) -> dict[str, float]:
        """The current values, unprefixed."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """The counters, JSON-serialisable (finite numbers only), independent of the feature.

        Counters are numbers or flat lists of numbers: a shallow copy of each is enough, and several times
        faster than `dataclasses.asdict`'s deep one (states are stored at every commit)."""
        names, counters = _fields(type(self))
        return {
            name: list(value) if type(value) is list else value
            for name, value in zip(names, counters(self), strict=True)
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Self:
        """A feature continuing from `state`, independent of it; raises `TypeError` on a counter that is not
        a number or a flat list of numbers (see `state`). Counters this version does not have (a newer
        version stored them) are left out, and those the state lacks (an older one stored it) start anew:
        a rollback keeps the client's history, less what the newer version added."""
        names, _ = _fields(cls)
        return cls(**{name: _counter(name, state[name]) for name in names if name in state})


def _counter(name: str, value: Any) -> Any:
    """A copy of a stored counter's `value`: a number, or a flat list of numbers."""
    if type(value) in _NUMBERS:
        return value
    if type(value) is list and all(type(item) in _NUMBERS for item in value):
        return list(value)
    raise TypeError(f"stored counter {name} is not a number or a list of numbers")


_NUMBERS = (int, float)
_FIELDS: dict[type, tuple[tuple[str, ...], Callable[[Any], tuple[Any, ...]]]] = {}


def _fields(feature: type) -> tuple[tuple[str, ...], Callable[[Any], tuple[Any, ...]]]:
    """The field names of a feature class and a getter of all their values at once (`dataclasses.fields`
    builds them anew at every call, and one getter is faster than a `getattr` a field)."""
    known = _FIELDS.get(feature)
    if known is None:
        names = tuple(field.name for field in dataclasses.fields(feature))
        getter = operator.attrgetter(*names)
        # `attrgetter` of one name returns the value itself, of several a tuple.
        known = _FIELDS[feature] = (names, getter if len(names) > 1 else lambda counters: (getter(counters),))
    return known


class _QualifiedNames(dict[str, str]):
    """`<prefix>.<key>` for each key asked, made on first use."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def __missing__(self, key: str) -> str:
        name = self[key] = f"{self.prefix}.{key}"
        return name


def ratio(part: float, whole: float) -> float:
    """`part / whole`, 0 when `whole` is 0."""
    return part / whole if whole else 0.0


def moved_on(half: int, now: int, this_half: int) -> tuple[int, int]:
    """The counts (in half-window `now`, in the one before) of a count per half-window once `now` replaced
    `half` as the current half-window, `this_half` the count `half` held: it becomes the one before when it
    is, and nothing when a whole half-window passed."""
    return 0, this_half if now == half + 1 else 0
