"""Benign client populations: how legitimate users of a prediction API send requests.

Several of them look like attacks on one measure or another, on purpose: batch scorers harvest probabilities
by volume, what-if analysts send near-duplicates, retry storms repeat requests exactly, dashboards poll the
same rows all day, data scientists score the whole held-out set, and the nightly job scores the training set
itself. Apart from the nightly job (exact training rows) and the data scientists (exact non-members), every
row a benign client sends is a synthesised new record (`ServedModel.synthesize`) or a small edit of one,
never a training row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from detector.simulate.models import Rows, ServedModel
from detector.simulate.traffic import DAY, HOUR, Behaviour, Request, Window


class RecordPool:
    """Fresh synthesised records and the model's answers, made `chunk` at a time (one model call each)."""

    def __init__(self, model: ServedModel, rng: np.random.Generator, chunk: int = 256) -> None:
        self._model = model
        self._rng = rng
        self._chunk = chunk
        self._rows = np.empty((0, model.n_features))
        self._answers = np.empty((0, model.n_classes))
        self._next = 0

    def take(self, count: int) -> tuple[Rows, Rows]:
        """`count` records never handed out before, and the model's class probabilities for them."""
        if self._next + count > len(self._rows):
            fresh = self._model.synthesize(self._rng, max(self._chunk, count))
            self._rows = np.concatenate([self._rows[self._next :], fresh])
            self._answers = np.concatenate([self._answers[self._next :], self._model.predict_proba(fresh)])
            self._next = 0
        start, self._next = self._next, self._next + count
        return self._rows[start : self._next], self._answers[start : self._next]


def _episodes(rng: np.random.Generator, per_day: float, window: Window) -> int:
    # Episodic clients (batch runs, analysis sessions) show up at least once in any window they are in,
    # even an hour-long one.
    return max(1, int(rng.poisson(per_day * window.days)))


@dataclass(frozen=True, slots=True)
class Occasional:
    """A person trying the API now and then: a few single-row (sometimes 2-3 row) requests a day."""

    per_day: float
    probability_share: float

    @classmethod
    def draw(cls, rng: np.random.Generator, model: ServedModel) -> Occasional:
        """A user with 1-8 requests a day asking for labels, probabilities, or either."""
        return cls(float(rng.uniform(1.0, 8.0)), float(rng.choice([0.0, 0.5, 1.0])))

    def requests(self, model: ServedModel, rng: np.random.Generator, window: Window) -> Iterator[Request]:
        """Requests at random moments, weighted by the time of day."""
        pool = RecordPool(model, rng, chunk=8)
        for at in sorted(window.random_time(rng) for _ in range(rng.poisson(self.per_day * window.days))):
            rows, answers = pool.take(1 if rng.random() < 0.8 else int(rng.integers(2, 4)))
            yield Request(at, rows, answers, bool(rng.random() < self.probability_share))


@dataclass(frozen=True, slots=True)
class SteadyApp:
    """An application scoring its own new records all day: Poisson requests at `peak_per_hour` (scaled by
    the time of day), mostly single rows, one in ten a small batch. With `storm_share` > 0, that share of
    requests is retried 3-20 times within seconds, byte for byte (a client with a too-short timeout)."""

    peak_per_hour: float
    want_probabilities: bool
    storm_share: float = 0.0

    @classmethod
    def draw(cls, rng: np.random.Generator, model: ServedModel) -> SteadyApp:
        """An app busy at 60-600 requests an hour at peak (log-uniform)."""
        return cls(float(np.exp(rng.uniform(np.log(60), np.log(600)))), bool(rng.random() < 0.5))

    @classmethod
    def draw_retrying(cls, rng: np.random.Generator, model: ServedModel) -> SteadyApp:
        """A quieter app (10-60 requests an hour at peak) whose retries storm on 5-20% of its requests."""
        return cls(float(rng.uniform(10, 60)), bool(rng.random() < 0.5), float(rng.uniform(0.05, 0.2)))

    def requests(self, model: ServedModel, rng: np.random.Generator, window: Window) -> Iterator[Request]:
        """One request per arrival of the day/night-modulated Poisson process, storms included."""
        pool = RecordPool(model, rng)
        last = window.start
        for arrival in window.arrivals(rng, self.peak_per_hour):
            rows, answers = pool.take(1 if rng.random() < 0.9 else int(rng.integers(2, 6)))
            last = max(arrival, last)
            yield Request(last, rows, answers, self.want_probabilities)
            if rng.random() < self.storm_share:
                for _ in range(int(rng.integers(3, 21))):
                    last += float(rng.uniform(0.05, 1.0))
                    yield Request(last, rows, answers, self.want_probabilities)


@dataclass(frozen=True, slots=True)
class BatchScorer:
    """A back-office job scoring new records in bulk a few times a day: each run sends 1-8 batches of
    50-500 distinct records, asking for probabilities. By volume it looks like harvesting."""

    runs_per_day: float

    @classmethod
    def draw(cls, rng: np.random.Generator, model: ServedModel) -> BatchScorer:
        """A job running 2-6 times a day."""
        return cls(float(rng.uniform(2.0, 6.0)))

    def requests(self, model: ServedModel, rng: np.random.Generator, window: Window) -> Iterator[Request]:
        """The runs at activity-weighted moments, batches a few seconds apart."""
        pool = RecordPool(model, rng, chunk=512)
        last = window.start
        for start in sorted(
            window.random_time(rng) for _ in range(_episodes(rng, self.runs_per_day, window))
        ):
            last = max(start, last)
            for _ in range(int(rng.integers(1, 9))):
                rows, answers = pool.take(int(rng.integers(50, 501)))
                yield Request(last, rows, answers, True)
                last += float(rng.uniform(1.0, 10.0))


@dataclass(frozen=True, slots=True)
class WhatIfAnalyst:
    """An analyst exploring one record: a session takes a new record and nudges one or two of its features
    (a pixel or two for images) a little at a time, 12-80 times, at a human pace."""

    sessions_per_day: float
    probability_share: float

    @classmethod
    def draw(cls, rng: np.random.Generator, model: ServedModel) -> WhatIfAnalyst:
        """An analyst with 1-4 sessions a day, mostly asking for probabilities."""
        return cls(float(rng.uniform(1.0, 4.0)), float(rng.choice([0.5, 1.0])))

    def requests(self, model: ServedModel, rng: np.random.Generator, window: Window) -> Iterator[Request]:
        """Sessions at activity-weighted moments; in each, a random walk on the chosen features."""
        pool = RecordPool(model, rng, chunk=8)
        varying = np.flatnonzero(model.std > 0)
        # Tabular features move by a tenth of their spread; pixels by whole grey levels.
        step = np.ones(model.n_features) if model.image_side else 0.1 * model.std
        last = window.start
        for start in sorted(
            window.random_time(rng) for _ in range(_episodes(rng, self.sessions_per_day, window))
        ):
            last = max(start, last)
            want = bool(rng.random() < self.probability_share)
            row = pool.take(1)[0]
            features = rng.choice(varying, size=int(rng.integers(1, 3)), replace=False)
            for _ in range(int(rng.integers(12, 81))):
                nudge = np.zeros_like(row)
                nudge[0, features] = rng.normal(size=len(features)) * step[features]
                row = model.quantize(row + nudge)
                variant = model.without_member_rows(row)
                if len(variant):
                    yield Request(last, variant, model.predict_proba(variant), want)
                last += float(rng.uniform(3.0, 60.0))


@dataclass(frozen=True, eq=False, slots=True)
class Dashboard:
    """A dashboard polling the same few records every `period` seconds, during `hours` (UTC) of the day
    when the window has a day/night cycle, all the time otherwise."""

    rows: Rows
    period: float
    hours: tuple[float, float]
    want_probabilities: bool

    @classmethod
    def draw(cls, rng: np.random.Generator, model: ServedModel) -> Dashboard:
        """1-12 fixed records polled every minute, around the clock or 07:00-19:00."""
        hours = (0.0, 24.0) if rng.random() < 0.5 else (7.0, 19.0)
        return cls(model.synthesize(rng, int(rng.integers(1, 13))), 60.0, hours, bool(rng.random() < 0.5))

    def requests(self, model: ServedModel, rng: np.random.Generator, window: Window) -> Iterator[Request]:
        """One batch request of all the rows per tick, a fraction of a second late."""
        answers = model.predict_proba(self.rows)
        tick = window.start + float(rng.uniform(0, self.period))
        while tick < window.end:
            hour = (tick % DAY) / HOUR
            if not window.diurnal or self.hours[0] <= hour < self.hours[1]:
                yield Request(tick + float(rng.uniform(0, 0.5)), self.rows, answers, self.want_probabilities)
            tick += self.period


@dataclass(frozen=True, slots=True)
class Evaluation:
    """A data scientist scoring the evaluation set (every non-member, verbatim) once, with probabilities,
    in batches of `batch` rows."""

    batch: int

    @classmethod
    def draw(cls, rng: np.random.Generator, model: ServedModel) -> Evaluation:
        """Batches of 32-256 rows."""
        return cls(int(rng.integers(32, 257)))

    def requests(self, model: ServedModel, rng: np.random.Generator, window: Window) -> Iterator[Request]:
        """The whole set at one activity-weighted moment in the first 70% of the window."""
        yield from _in_batches(model, rng, model.non_members, self.batch, window.random_time(rng, (0.0, 0.7)))


@dataclass(frozen=True, slots=True)
class NightlyRescore:
    """The internal job re-scoring the whole training set (exact member rows) every night at 02:00 (a
    twelfth into the window), in batches of 256: benign, and expected to be allow-listed."""

    @classmethod
    def draw(cls, rng: np.random.Generator, model: ServedModel) -> NightlyRescore:
        """The job (it has no parameters)."""
        return cls()

    def requests(self, model: ServedModel, rng: np.random.Generator, window: Window) -> Iterator[Request]:
        """One run, a few minutes after its scheduled time."""
        start = window.start + (window.end - window.start) / 12 + float(rng.uniform(0, 300))
        yield from _in_batches(model, rng, model.members, 256, start)


def _in_batches(
    model: ServedModel, rng: np.random.Generator, rows: Rows, batch: int, start: float
) -> Iterator[Request]:
    moment = start
    for first in range(0, len(rows), batch):
        chunk = rows[first : first + batch]
        yield Request(moment, chunk, model.predict_proba(chunk), True)
        moment += float(rng.uniform(0.2, 5.0))


POPULATIONS: dict[str, Callable[[np.random.Generator, ServedModel], Behaviour]] = {
    "occasional": Occasional.draw,
    "steady_app": SteadyApp.draw,
    "batch_scorer": BatchScorer.draw,
    "what_if": WhatIfAnalyst.draw,
    "retry_storm": SteadyApp.draw_retrying,
    "dashboard": Dashboard.draw,
    "evaluation": Evaluation.draw,
    "nightly_rescore": NightlyRescore.draw,
}
"""Each benign population and how to draw one client's parameters (before any traffic is generated)."""

ALLOW_LISTED = frozenset({"nightly_rescore"})
"""Populations whose clients an operator is expected to allow-list."""
