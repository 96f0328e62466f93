"""A detection canary's traffic: one label-only data-augmentation attack (Choquette-Choo et al.), a burst of
noisy copies of each of a few dozen records, against the simulator's tabular model and answered by its
forest, as query-log records stamped from a given moment on.

The attack is one the rules catch soon and surely (MIA-002, augmentation probing, high: at the rule's floor,
after 58 of the session's 264 queries in each of 400 draws, at its sixth burst), so a canary that raises no
alert says that detection is broken, not that the attack was too subtle. The canary's model is scaled as a
real model is by its baseline, from its first query (`canary_scale`).
"""

from __future__ import annotations

import random
from dataclasses import replace
from functools import cache

import numpy as np

from detector.domain import AlertKind
from detector.simulate.attacks import Augment, Augmentation, Candidates
from detector.simulate.models import dataset_scale, load_models
from detector.simulate.traffic import Identity, encode

# The simulator's model whose answers and data the canary's records carry.
_SERVED = "credit-risk"
# The alert a canary's attack must raise.
CANARY_KIND = AlertKind.AUGMENTATION_PROBING
_CANDIDATES = 24
# Ten noisy copies of each candidate, sent one a request after the candidate itself: 264 queries.
_AUGMENTATION = Augmentation("noise", size=10, scale=0.05)
# Queries 10 ms apart: the session takes under three seconds of event time.
_GAP_SECONDS = 0.01
# TEST-NET-1 (RFC 5737): an address no real client has.
_IDENTITY_IP = "192.0.2.1"
_USER_AGENT = "mia-detector-canary"


@cache
def canary_scale() -> tuple[np.ndarray, np.ndarray]:
    """The input scale (per-feature mean and standard deviation) of the canary's model, known in advance:
    that of the dataset its records are drawn from.

    No real traffic reaches the canary's model name, so a scale learnt live would be learnt from the
    canaries' own few dozen records, and how soon a canary is caught would vary with the draw: 55 to 157
    queries of 264 over 400 draws, 3 of them past the half.
    """
    return dataset_scale(_SERVED)


def canary_records(client_id: str, model: str, start: float, seed: int | None = None) -> list[bytes]:
    """The records of one canary attack by `client_id` on `model` (the simulator's `credit-risk` forest,
    renamed), the first stamped `start` (epoch seconds); random event ids and candidates unless `seed`."""
    served = replace(load_models(0)[_SERVED], name=model)
    rng = np.random.default_rng(seed)
    noise = random.Random(seed)
    probes = Augment(
        Candidates.draw(served, rng, _CANDIDATES, member_share=0.5),
        _AUGMENTATION,
        want_probabilities=False,
        batched=False,
    )
    identity = Identity(client_id, _IDENTITY_IP, _USER_AGENT)
    return [
        encode(request, round((start + index * _GAP_SECONDS) * 1000), identity, served, noise)
        for index, request in enumerate(probes.requests(served, rng))
    ]
