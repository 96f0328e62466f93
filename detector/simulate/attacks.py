"""Attack behaviours, built the way the published membership-inference attacks query a model.

- Confidence harvesting (Shokri et al. 2017 shadow models, Salem et al. 2019 ML-Leaks, Yeom et al. 2018
  threshold attacks): one query per candidate record, asking for the probability vector.
- Augmentation probing (Choquette-Choo et al. 2021 label-only data augmentation; Carlini et al. 2022 LiRA
  queries): for each candidate, augmented copies (rotations, translations, mirror + shifts, noise), the
  candidate itself included, in a burst per candidate or in rounds over all candidates.
- Boundary probing (Li & Zhang 2021 label-only decision-boundary distance, through HopSkipJump, Chen et al.
  2020): per candidate a walk of hundreds to thousands of label-only queries that converges onto the
  decision boundary nearest to the candidate, labelled by the real model.
- Training-set targeting: candidates drawn mostly from the training set (an attacker confirming records it
  believes were used).

Candidates are real dataset rows: about half members for the first three kinds. Every attack can be made
evasive (`Evasion`): slow, split over sybil keys, interleaved with benign-looking cover traffic from the
same key, label-only, or sent from a compromised key with a long ordinary history.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from enum import StrEnum
from operator import attrgetter
from typing import Protocol

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from detector.simulate.benign import SteadyApp
from detector.simulate.models import Labels, Rows, ServedModel
from detector.simulate.traffic import Pace, Request, Window, attack_requests

# Decimals of the points attackers compute (perturbations, walk steps): plenty for the walk to converge,
# and short lines in the log. Candidates themselves are sent verbatim.
_SENT_DECIMALS = 6
# Cover traffic stays at the rate of a middling benign app (a fraction of `SteadyApp.draw`'s range): it
# runs all day, and at the attack's own burst rate it would dwarf the attack.
_COVER_MAX_PER_HOUR = 120.0


class AttackKind(StrEnum):
    """The attack behaviours the simulator can generate."""

    CONFIDENCE_HARVESTING = "confidence_harvesting"
    AUGMENTATION_PROBING = "augmentation_probing"
    BOUNDARY_PROBING = "boundary_probing"
    TRAINING_SET_TARGETING = "training_set_targeting"


class Evasion(StrEnum):
    """Ways an attacker hides: a few queries a minute or less for hours, the work split over several API
    keys of one campaign, benign-looking requests from the same key in between, labels only, or a key taken
    over from a busy app (its own traffic all along, the baseline's included, the attack late in the day)."""

    SLOW = "slow"
    SYBIL = "sybil"
    INTERLEAVED = "interleaved"
    LABEL_ONLY = "label_only"
    COMPROMISED = "compromised"


@dataclass(frozen=True, eq=False, slots=True)
class Candidates:
    """The records an attacker tests for membership: real dataset rows, and which are training rows."""

    rows: Rows
    members: npt.NDArray[np.bool_]

    @classmethod
    def draw(
        cls, model: ServedModel, rng: np.random.Generator, count: int, member_share: float
    ) -> Candidates:
        """`count` distinct rows of `model`'s dataset, `member_share` of them members, in random order."""
        from_members = min(round(count * member_share), len(model.members))
        from_others = min(count - from_members, len(model.non_members))
        rows = np.concatenate(
            [
                model.members[rng.choice(len(model.members), from_members, replace=False)],
                model.non_members[rng.choice(len(model.non_members), from_others, replace=False)],
            ]
        )
        members = np.r_[np.ones(from_members, dtype=bool), np.zeros(from_others, dtype=bool)]
        order = rng.permutation(len(rows))
        return cls(rows[order], members[order])

    def split(self, parts: int) -> list[Candidates]:
        """The candidates dealt into `parts` disjoint shares (one per sybil key)."""
        return [
            Candidates(self.rows[share], self.members[share])
            for share in np.array_split(np.arange(len(self.rows)), parts)
        ]


class Probes(Protocol):
    """What an attack asks, in order, without times (a `Pace` sets them)."""

    def requests(self, model: ServedModel, rng: np.random.Generator) -> Iterator[Request]:
        """The attack's requests, answered by `model`."""
        ...

    def planned_requests(self, model: ServedModel) -> int:
        """How many requests `requests` sends (expected, for random batch sizes and walks)."""
        ...


@dataclass(frozen=True, eq=False, slots=True)
class Harvest:
    """One query per candidate, alone or in small batches of up to `max_batch` rows: confidence harvesting
    when `want_probabilities`, Yeom's label-only gap attack otherwise."""

    candidates: Candidates
    want_probabilities: bool
    max_batch: int

    def planned_requests(self, model: ServedModel) -> int:
        """One request per candidate, or per batch (half of them single rows)."""
        mean_batch = 1.0 if self.max_batch == 1 else 0.5 + 0.5 * (2 + self.max_batch) / 2
        return max(1, round(len(self.candidates.rows) / mean_batch))

    def requests(self, model: ServedModel, rng: np.random.Generator) -> Iterator[Request]:
        """The candidates in order."""
        first = 0
        while first < len(self.candidates.rows):
            size = (
                1 if self.max_batch == 1 or rng.random() < 0.5 else int(rng.integers(2, self.max_batch + 1))
            )
            rows = self.candidates.rows[first : first + size]
            members = int(self.candidates.members[first : first + size].sum())
            yield from attack_requests(
                model, rows, self.want_probabilities, candidates=len(rows), member_candidates=members
            )
            first += size


@dataclass(frozen=True, slots=True)
class Augmentation:
    """How one candidate is augmented. `name` is `noise` (Gaussian, `size` copies, sigma `scale` times
    each feature's standard deviation), `rotation` (+-1..`size` steps of `scale` degrees: 2r+1 queries),
    `translation` (every shift by `size` pixels: 4d+1 queries) or `mirror_shift` (LiRA: unflipped and
    flipped, shifted by up to one pixel: 18 queries). The first row is always the candidate itself."""

    name: str
    size: int
    scale: float

    @property
    def count(self) -> int:
        """The number of rows `variants` returns, the candidate included."""
        if self.name == "rotation":
            return 2 * self.size + 1
        if self.name == "translation":
            return 4 * self.size + 1
        if self.name == "mirror_shift":
            return 18
        return self.size + 1

    @classmethod
    def draw(cls, rng: np.random.Generator, model: ServedModel) -> Augmentation:
        """A strategy that fits the data: noise for tables; any of the four for images."""
        names = ["rotation", "translation", "mirror_shift", "noise"] if model.image_side else ["noise"]
        name = str(rng.choice(names))
        if name == "rotation":
            return cls(name, int(rng.integers(1, 5)), float(rng.uniform(4.0, 10.0)))
        if name == "translation":
            return cls(name, int(rng.integers(1, 4)), 1.0)
        if name == "mirror_shift":
            return cls(name, 1, 1.0)
        return cls(name, int(rng.integers(1, 50)), float(rng.uniform(0.01, 0.1)))

    def variants(self, row: Rows, model: ServedModel, rng: np.random.Generator) -> Rows:
        """The candidate `row` ([D]) followed by its augmented copies, as [N, D]."""
        if self.name == "noise":
            spread = 0.3 * self.scale * 16 if model.image_side else self.scale * model.std
            noisy = row + rng.normal(size=(self.size, len(row))) * spread
            copies = np.clip(noisy, model.lower, model.upper) if model.image_side else noisy
            return np.concatenate([row[None], np.round(copies, _SENT_DECIMALS)])
        side = model.image_side
        if side is None:  # image strategies are only drawn for image models
            raise ValueError(f"the {self.name} augmentation needs an image model")
        image = row.reshape(side, side)
        if self.name == "rotation":
            images = [
                ndimage.rotate(image, sign * step * self.scale, reshape=False, order=1, mode="constant")
                for step in range(1, self.size + 1)
                for sign in (-1, 1)
            ]
        elif self.name == "translation":
            images = [
                _shift(image, down, self.size - abs(down) if sign > 0 else abs(down) - self.size)
                for down in range(-self.size, self.size + 1)
                for sign in ((1,) if abs(down) == self.size else (1, -1))
            ]
        else:
            images = [
                _shift(flipped, down, right)
                for flipped in (image, image[:, ::-1])
                for down in (-1, 0, 1)
                for right in (-1, 0, 1)
                if flipped is not image or down or right
            ]
        copies = np.clip(np.stack(images).reshape(len(images), -1), 0.0, 16.0)
        return np.concatenate([row[None], np.round(copies, _SENT_DECIMALS)])


def _shift(image: Rows, down: int, right: int) -> Rows:
    """`image` moved by whole pixels, blank where it moved away from."""
    out = np.zeros_like(image)
    rows, columns = image.shape
    out[max(down, 0) : rows + min(down, 0), max(right, 0) : columns + min(right, 0)] = image[
        max(-down, 0) : rows + min(-down, 0), max(-right, 0) : columns + min(-right, 0)
    ]
    return out


@dataclass(frozen=True, eq=False, slots=True)
class Augment:
    """Per candidate, the candidate and its augmentations.

    In bursts (`round_rows` 0), each candidate's copies back to back: one batch request when `batched`,
    otherwise one request per copy. In rounds, the first copy of every candidate, then the second of every
    candidate, and so on, in requests of up to `round_rows` rows: the way the reference code of LiRA and of
    the data-augmentation attack predicts a whole augmented dataset at a time. A candidate's copies then
    come a whole round apart, not back to back.
    """

    candidates: Candidates
    augmentation: Augmentation
    want_probabilities: bool
    batched: bool
    round_rows: int = 0

    def planned_requests(self, model: ServedModel) -> int:
        """One request per candidate, per row, or per round's batch."""
        count = len(self.candidates.rows)
        if self.round_rows:
            return self.augmentation.count * math.ceil(count / self.round_rows)
        return count * (1 if self.batched else self.augmentation.count)

    def requests(self, model: ServedModel, rng: np.random.Generator) -> Iterator[Request]:
        """Each candidate's burst in turn, or the rounds."""
        if self.round_rows:
            yield from self._rounds(model, rng)
            return
        for row, member in zip(self.candidates.rows, self.candidates.members, strict=True):
            yield from attack_requests(
                model,
                self.augmentation.variants(row, model, rng),
                self.want_probabilities,
                batched=self.batched,
                candidates=1,
                member_candidates=int(member),
            )

    def _rounds(self, model: ServedModel, rng: np.random.Generator) -> Iterator[Request]:
        # [copies, candidates, features]: round i sends copy i of every candidate.
        copies = np.stack(
            [self.augmentation.variants(row, model, rng) for row in self.candidates.rows], axis=1
        )
        for round_index, rows in enumerate(copies):
            for first in range(0, len(rows), self.round_rows):
                chunk = slice(first, first + self.round_rows)
                first_round = round_index == 0  # the round that carries the candidates themselves
                yield from attack_requests(
                    model,
                    rows[chunk],
                    self.want_probabilities,
                    candidates=len(rows[chunk]) if first_round else 0,
                    member_candidates=int(self.candidates.members[chunk].sum()) if first_round else 0,
                )


@dataclass(frozen=True, eq=False, slots=True)
class BoundaryWalk:
    """HopSkipJump (untargeted, L2) from each candidate. It reads the labels alone, but asks for
    `want_probabilities` (an API that answers every query with its probabilities logs the walk with them).

    Coordinates are scaled to [0, 1] per feature (the dataset's range), as HopSkipJump assumes. A walk
    starts from uniform noise that the model labels differently (or, failing that, a held-out row of
    another class), bisects toward the candidate, then for `iterations` rounds estimates the boundary's
    normal from `initial_evals`*sqrt t (at most `max_evals`) random probes around the boundary point, steps
    along it with a halving step size, and bisects back onto the boundary. Consecutive probes are therefore
    near-duplicates whose labels flip. `batched` sends each round's probes as one request.
    """

    candidates: Candidates
    iterations: int
    initial_evals: int
    max_evals: int
    batched: bool
    want_probabilities: bool = False

    def planned_requests(self, model: ServedModel) -> int:
        """The candidate, a few starting points, then per round the probes (one request when batched), a
        step or two and a bisection, for every candidate."""
        bisection = math.ceil(math.log2(model.n_features**1.5))
        rounds = sum(
            (1 if self.batched else min(int(self.initial_evals * math.sqrt(round_)), self.max_evals))
            + 2
            + bisection
            for round_ in range(1, self.iterations + 1)
        )
        return len(self.candidates.rows) * (3 + bisection + rounds)

    def requests(self, model: ServedModel, rng: np.random.Generator) -> Iterator[Request]:
        """The walks of the candidates, one after the other."""
        for row, member in zip(self.candidates.rows, self.candidates.members, strict=True):
            yield from _Walk(self, model, rng).run(row, bool(member))


class _Walk:
    """The state of one HopSkipJump walk (one candidate)."""

    def __init__(self, plan: BoundaryWalk, model: ServedModel, rng: np.random.Generator) -> None:
        self._plan = plan
        self._model = model
        self._rng = rng
        self._low = model.lower
        self._span = np.where(model.upper > model.lower, model.upper - model.lower, 1.0)
        self._dim = model.n_features
        # HopSkipJump's bisection tolerance for L2: gamma / d^(3/2) with gamma = 1.
        self._theta = 1.0 / (self._dim * math.sqrt(self._dim))

    def run(self, row: Rows, member: bool) -> Generator[Request, None, None]:
        """Query the candidate, then walk to the boundary nearest to it."""
        (first,) = attack_requests(
            self._model, row[None], self._plan.want_probabilities, candidates=1, member_candidates=int(member)
        )
        yield first
        label = int(first.probabilities.argmax())
        origin = (row - self._low) / self._span
        start = yield from self._starting_point(label)
        boundary = yield from self._bisect(origin, start, label)
        distance = float(np.linalg.norm(boundary - origin))
        for iteration in range(1, self._plan.iterations + 1):
            direction = yield from self._gradient(boundary, label, iteration, distance)
            if direction is None:
                return
            step = distance / math.sqrt(iteration)
            target = boundary
            for _ in range(10):  # geometric step-size search: halve until the step stays adversarial
                trial = np.clip(boundary + step * direction, 0.0, 1.0)
                if (yield from self._labels(trial[None]))[0] != label:
                    target = trial
                    break
                step /= 2
            boundary = yield from self._bisect(origin, target, label)
            distance = float(np.linalg.norm(boundary - origin))

    def _starting_point(self, label: int) -> Generator[Request, None, Rows]:
        for _ in range(20):
            noise: Rows = self._rng.random(self._dim)
            if (yield from self._labels(noise[None]))[0] != label:
                return noise
        others = self._model.non_members[self._model.non_member_labels != label]
        fallback: Rows = (others[self._rng.integers(len(others))] - self._low) / self._span
        return fallback

    def _bisect(self, origin: Rows, adversarial: Rows, label: int) -> Generator[Request, None, Rows]:
        """The point on the segment origin-adversarial where the label changes, within theta."""
        low, high = 0.0, 1.0
        while high - low > self._theta:
            middle = (low + high) / 2
            point = (1 - middle) * origin + middle * adversarial
            if (yield from self._labels(point[None]))[0] != label:
                high = middle
            else:
                low = middle
        return (1 - high) * origin + high * adversarial

    def _gradient(
        self, boundary: Rows, label: int, iteration: int, distance: float
    ) -> Generator[Request, None, Rows | None]:
        """HopSkipJump's Monte-Carlo estimate of the boundary's normal at `boundary` (None if degenerate)."""
        plan = self._plan
        delta = 0.1 if iteration == 1 else math.sqrt(self._dim) * self._theta * distance
        count = min(int(plan.initial_evals * math.sqrt(iteration)), plan.max_evals)
        directions = self._rng.normal(size=(count, self._dim))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        probes = np.clip(boundary + delta * directions, 0.0, 1.0)
        directions = (probes - boundary) / delta
        signs = np.where((yield from self._labels(probes)) != label, 1.0, -1.0)
        if abs(signs.mean()) < 1.0:  # baseline subtraction, unless every probe agreed
            signs -= signs.mean()
        gradient = (signs[:, None] * directions).mean(axis=0)
        norm = float(np.linalg.norm(gradient))
        return gradient / norm if norm > 0 else None

    def _labels(self, points: Rows) -> Generator[Request, None, Labels]:
        """Ask the model about `points` (scaled coordinates): one request, or one per point."""
        rows = np.round(self._low + points * self._span, _SENT_DECIMALS)
        requests = attack_requests(
            self._model, rows, self._plan.want_probabilities, batched=self._plan.batched
        )
        yield from requests
        return np.concatenate([request.probabilities for request in requests]).argmax(axis=1)  # type: ignore[no-any-return]


@dataclass(frozen=True, eq=False, slots=True)
class Attack:
    """One attacking API key: its probes, their pace, when it starts (a fraction of the window drawn in
    `start_within`), and benign-looking cover traffic from the same key when interleaving."""

    probes: Probes
    pace: Pace
    start_within: tuple[float, float]
    cover: SteadyApp | None = None

    def requests(self, model: ServedModel, rng: np.random.Generator, window: Window) -> Iterator[Request]:
        """The paced attack, merged in time with the cover traffic if any."""
        start = window.start + float(rng.uniform(*self.start_within)) * (window.end - window.start)
        cover_rng = np.random.default_rng(rng.integers(2**63))
        attack = self.pace.schedule(rng, start, self.probes.requests(model, rng))
        if self.cover is None:
            yield from attack
        else:
            yield from heapq.merge(
                attack, self.cover.requests(model, cover_rng, window), key=attrgetter("at")
            )


def campaign(
    kind: AttackKind,
    model: ServedModel,
    rng: np.random.Generator,
    *,
    keys: int,
    evasion: frozenset[Evasion],
    scale: float,
    bursts_only: bool = False,
) -> list[Attack]:
    """The attacking keys of one campaign: the campaign's candidates dealt over `keys` sybil keys, which
    share the attacker's tooling (query strategy) but each have their own pace and start.

    `scale` shrinks or grows the number of candidates (the smoke scenario uses a fraction); unless slow,
    a key runs in bursts or at a steady rate, in bursts only with `bursts_only` (for short windows).
    """
    label_only = Evasion.LABEL_ONLY in evasion
    slow = Evasion.SLOW in evasion
    candidates = Candidates.draw(
        model, rng, _candidate_count(kind, model, rng, scale), _member_share(kind, rng)
    )
    tooling = _tooling(kind, model, rng, label_only=label_only, slow=slow)
    attacks = []
    for share in candidates.split(keys):
        probes = tooling(share)
        if slow:
            pace, start_within = Pace.slow(rng, probes.planned_requests(model)), (0.0, 0.3)
        else:
            pace = Pace.burst(rng) if bursts_only or rng.random() < 0.5 else Pace.steady(rng)
            start_within = (0.05, 0.6)
        cover = None
        if Evasion.COMPROMISED in evasion:
            # The key's owner: a busy app, sending all day (and every day before) what it always does. The
            # attack starts late, behind thousands of its ordinary queries.
            cover = SteadyApp(float(rng.uniform(300, 600)), bool(rng.random() < 0.5))
            start_within = (0.5, 0.8)
        elif Evasion.INTERLEAVED in evasion:
            # About as many cover requests as attack requests, within what a busy benign app sends.
            rate = min(pace.per_hour * float(rng.uniform(0.5, 2.0)), _COVER_MAX_PER_HOUR)
            cover = SteadyApp(rate, bool(rng.random() < 0.5))
        attacks.append(Attack(probes, pace, start_within, cover))
    return attacks


def _candidate_count(kind: AttackKind, model: ServedModel, rng: np.random.Generator, scale: float) -> int:
    if kind is AttackKind.CONFIDENCE_HARVESTING:
        # A good part of the population's records: what a shadow-model attacker has at hand.
        base = rng.uniform(0.3, 0.9) * 2 * min(len(model.members), len(model.non_members))
    elif kind is AttackKind.TRAINING_SET_TARGETING:
        base = rng.uniform(50, 300)
    elif kind is AttackKind.AUGMENTATION_PROBING:
        base = rng.uniform(30, 120)
    else:
        base = rng.uniform(6, 12)
    return max(1, round(base * scale))


def _member_share(kind: AttackKind, rng: np.random.Generator) -> float:
    return float(rng.uniform(0.85, 1.0)) if kind is AttackKind.TRAINING_SET_TARGETING else 0.5


def _tooling(
    kind: AttackKind, model: ServedModel, rng: np.random.Generator, *, label_only: bool, slow: bool
) -> _Tooling:
    # A slow attacker sends one row per request: a batch would be many queries at once.
    if kind is AttackKind.BOUNDARY_PROBING:
        # A slow attacker also spends its small budget on fewer, cheaper walks.
        iterations = int(rng.integers(5, 9) if slow else rng.integers(8, 17))
        evals = int(rng.integers(10, 21) if slow else rng.integers(20, 51))
        batched = bool(rng.random() < 0.3) and not slow
        # Through an API that answers with probabilities half the time.
        wants = bool(rng.random() < 0.5) and not label_only
        return _Tooling(batched=batched, want_probabilities=wants, walk=(iterations, evals, 200))
    if kind is AttackKind.AUGMENTATION_PROBING:
        augmentation = Augmentation.draw(rng, model)
        # LiRA reads confidences; the data-augmentation attack of Choquette-Choo et al. needs labels only.
        wants = augmentation.name == "mirror_shift" or rng.random() < 0.3
        # In rounds, the reference code's batches: a row a request when slow.
        in_rounds = bool(rng.random() < 0.4)
        return _Tooling(
            batched=bool(rng.random() < 0.5) and not slow,
            want_probabilities=wants and not label_only,
            augmentation=augmentation,
            round_rows=(1 if slow else int(rng.choice([1, 16, 64]))) if in_rounds else 0,
        )
    batches = [1, 4, 16] if kind is AttackKind.CONFIDENCE_HARVESTING else [1, 8]
    max_batch = 1 if slow else int(rng.choice(batches))
    if kind is AttackKind.CONFIDENCE_HARVESTING:
        return _Tooling(want_probabilities=not label_only, max_batch=max_batch)
    return _Tooling(want_probabilities=bool(rng.random() < 0.5) and not label_only, max_batch=max_batch)


@dataclass(frozen=True, slots=True)
class _Tooling:
    """The query strategy a campaign's keys share; calling it with a key's candidates gives its probes."""

    batched: bool = False
    want_probabilities: bool = False
    max_batch: int = 1
    augmentation: Augmentation | None = None
    round_rows: int = 0
    walk: tuple[int, int, int] | None = None

    def __call__(self, candidates: Candidates) -> Probes:
        if self.walk is not None:
            return BoundaryWalk(candidates, *self.walk, self.batched, self.want_probabilities)
        if self.augmentation is not None:
            return Augment(
                candidates, self.augmentation, self.want_probabilities, self.batched, self.round_rows
            )
        return Harvest(candidates, self.want_probabilities, self.max_batch)
