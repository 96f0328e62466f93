"""What every simulated client is made of: a time window with a day/night cycle, requests, pacing, and the
encoding of one request into one query-log record (Open Inference Protocol v2).

A behaviour (benign population or attack) is a value with a `requests(model, rng, window)` method that
yields `Request`s in non-decreasing time; all its randomness comes from `rng`, so a client's traffic is the
same whatever order the clients are consumed in.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
import orjson

from detector.simulate.models import Rows, ServedModel

DAY = 86_400.0
HOUR = 3_600.0

# Quietest hour's share of the busiest hour's traffic, and the busiest hour of day (UTC).
_NIGHT_FLOOR = 0.1
_PEAK_HOUR = 14.0


@dataclass(frozen=True, slots=True)
class Window:
    """A span of simulated time [start, end) in epoch seconds; `diurnal` turns the day/night cycle on."""

    start: float
    end: float
    diurnal: bool

    @property
    def days(self) -> float:
        """The window's length in days."""
        return (self.end - self.start) / DAY

    def activity(self, moment: float) -> float:
        """How busy people are at `moment`, from 0.1 (02:00 UTC) to 1.0 (14:00 UTC); 1.0 without a cycle."""
        if not self.diurnal:
            return 1.0
        hour = (moment % DAY) / HOUR
        wave = (1.0 + math.cos(2 * math.pi * (hour - _PEAK_HOUR) / 24)) / 2
        return _NIGHT_FLOOR + (1.0 - _NIGHT_FLOOR) * wave

    def random_time(self, rng: np.random.Generator, within: tuple[float, float] = (0.0, 1.0)) -> float:
        """A moment drawn in the fraction `within` of the window, weighted by activity."""
        low = self.start + within[0] * (self.end - self.start)
        high = self.start + within[1] * (self.end - self.start)
        while True:
            moment = float(rng.uniform(low, high))
            if rng.random() < self.activity(moment):
                return moment

    def arrivals(self, rng: np.random.Generator, peak_per_hour: float) -> Iterator[float]:
        """Poisson arrival times over the window at `peak_per_hour`, scaled by the activity of the moment
        (thinning)."""
        mean_gap = HOUR / peak_per_hour
        moment = self.start
        while True:
            moment += float(rng.exponential(mean_gap))
            if moment >= self.end:
                return
            if rng.random() < self.activity(moment):
                yield moment


@dataclass(slots=True)
class Request:
    """One prediction request and the model's answer.

    `rows` is what the client sent ([B, D]), `probabilities` the model's answer ([B, C]); the record carries
    the probabilities only when `want_probabilities`. `attack` marks requests that are part of an attack
    (not cover traffic); `candidates` counts the attack candidates (records whose membership the attacker
    tests) this request is the first about, and `member_candidates` how many of those are training rows.
    """

    at: float
    rows: Rows
    probabilities: Rows
    want_probabilities: bool
    attack: bool = False
    candidates: int = 0
    member_candidates: int = 0


def attack_requests(
    model: ServedModel,
    rows: Rows,
    want_probabilities: bool,
    *,
    batched: bool = True,
    candidates: int = 0,
    member_candidates: int = 0,
) -> list[Request]:
    """Attack requests for `rows`, answered by `model` (in one call): one request, or one per row unless
    `batched`. The first carries the candidate counts; a `Pace` sets the times later."""
    answers = model.predict_proba(rows)
    if batched:
        return [Request(0.0, rows, answers, want_probabilities, True, candidates, member_candidates)]
    return [
        Request(
            0.0,
            rows[index : index + 1],
            answers[index : index + 1],
            want_probabilities,
            True,
            candidates if index == 0 else 0,
            member_candidates if index == 0 else 0,
        )
        for index in range(len(rows))
    ]


class Behaviour(Protocol):
    """How one client sends requests."""

    def requests(self, model: ServedModel, rng: np.random.Generator, window: Window) -> Iterator[Request]:
        """The client's requests in `window`, in non-decreasing time (the caller stops at the end)."""
        ...


@dataclass(frozen=True, slots=True)
class Pace:
    """When an automated client sends its next request: gaps of mean `mean_gap` seconds, exponential (a
    loop as fast as its work allows) or, when `regular`, uniform within +-50% (a script sleeping a random
    while); and every `pause_every` requests (0: never) a pause of mean `mean_pause` seconds (a crawler's
    rate limit, a notebook cell finishing)."""

    mean_gap: float
    pause_every: int = 0
    mean_pause: float = 0.0
    regular: bool = False

    @classmethod
    def burst(cls, rng: np.random.Generator) -> Pace:
        """Several requests a second, with pauses of minutes every few hundred."""
        return cls(float(rng.uniform(0.05, 0.5)), int(rng.integers(100, 400)), float(rng.uniform(60, 600)))

    @classmethod
    def steady(cls, rng: np.random.Generator) -> Pace:
        """A request every few seconds, without pauses."""
        return cls(float(rng.uniform(2.0, 15.0)))

    @classmethod
    def slow(cls, rng: np.random.Generator, requests: int) -> Pace:
        """`requests` spread over 6-20 hours, yet never more than one request every 20 s on average (three
        a minute) nor fewer than one every half hour."""
        spread = float(rng.uniform(6.0, 20.0)) * HOUR / max(requests, 1)
        return cls(min(max(spread, 20.0), 1800.0), regular=True)

    @property
    def per_hour(self) -> float:
        """The mean number of requests per hour, pauses included."""
        seconds = self.mean_gap + (self.mean_pause / self.pause_every if self.pause_every else 0.0)
        return HOUR / seconds

    def schedule(
        self, rng: np.random.Generator, start: float, requests: Iterator[Request]
    ) -> Iterator[Request]:
        """`requests` with their times set, starting at `start`."""
        moment = start
        for count, request in enumerate(requests):
            if count:
                if self.regular:
                    moment += float(rng.uniform(0.5, 1.5)) * self.mean_gap
                else:
                    moment += float(rng.exponential(self.mean_gap))
                if self.pause_every and count % self.pause_every == 0:
                    moment += float(rng.exponential(self.mean_pause))
            request.at = moment
            yield request


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a client is on the wire: API key, address and user agent."""

    client_id: str
    ip: str
    user_agent: str


def rfc3339(epoch_ms: int) -> str:
    """`2026-11-29T08:00:00.123Z` for epoch milliseconds."""
    return f"{_second(epoch_ms // 1000)}.{epoch_ms % 1000:03d}Z"


@lru_cache(maxsize=4096)
def _second(epoch_seconds: int) -> str:
    # Formatting a datetime costs more than the rest of a timestamp; clients share their seconds.
    return f"{datetime.fromtimestamp(epoch_seconds, tz=UTC):%Y-%m-%dT%H:%M:%S}"


def event_id(noise: random.Random) -> str:
    """A random (version 4) UUID drawn from `noise`."""
    bits = noise.getrandbits(128) & ~(0xF << 76 | 0x3 << 62) | 0x4 << 76 | 0x2 << 62
    text = f"{bits:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def encode(
    request: Request, epoch_ms: int, identity: Identity, model: ServedModel, noise: random.Random
) -> bytes:
    """The query-log record of `request` (JSON, no newline): OIP v2 request and response bodies.

    The response always has `predict` (INT64 [B]) and, when probabilities were asked for, `predict_proba`
    (FP32 [B, C], rounded to 6 decimals). The event id is a UUID drawn from `noise`, the latency a few
    milliseconds plus a little per row. (`noise` is the stdlib generator: a numpy call per record would
    cost more than the whole encoding.)
    """
    batch, width = request.rows.shape
    probabilities = request.probabilities
    outputs: list[dict[str, Any]] = [
        {"name": "predict", "shape": [batch], "datatype": "INT64", "data": probabilities.argmax(1).tolist()}
    ]
    if request.want_probabilities:
        outputs.append(
            {
                "name": "predict_proba",
                "shape": [batch, probabilities.shape[1]],
                "datatype": "FP32",
                "data": np.round(probabilities, 6).ravel().tolist(),
            }
        )
    record = {
        "event_id": event_id(noise),
        "timestamp": rfc3339(epoch_ms),
        "model": {"name": model.name, "version": model.version},
        "client": {"id": identity.client_id, "ip": identity.ip, "user_agent": identity.user_agent},
        "request": {
            "inputs": [
                {
                    "name": "features",
                    "shape": [batch, width],
                    "datatype": "FP32",
                    "data": request.rows.ravel().tolist(),
                }
            ],
            "outputs": [{"name": "predict_proba" if request.want_probabilities else "predict"}],
        },
        "response": {"model_name": model.name, "model_version": model.version, "outputs": outputs},
        "latency_ms": round(2.0 + 0.02 * batch + noise.expovariate(1 / 3.0), 2),
    }
    return orjson.dumps(record)
