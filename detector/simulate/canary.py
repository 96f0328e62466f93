"""A detection canary's traffic: one label-only data-augmentation attack (Choquette-Choo et al.), a burst of
noisy copies of each of a few dozen records, against the simulator's tabular model and answered by its
forest, as query-log records stamped from a given moment on.

The attack is one the rules catch soon and surely (MIA-002, augmentation probing, high: at the rule's floor
it fired after 52 to 91 queries over 25 draws; the session sends 264), so a canary that raises no alert says
that detection is broken, not that the attack was too subtle.
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np

from detector.domain import AlertKind
from detector.simulate.attacks import Augment, Augmentation, Candidates
from detector.simulate.models import load_models
from detector.simulate.traffic import Identity, encode

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


def canary_records(client_id: str, model: str, start: float, seed: int | None = None) -> list[bytes]:
    """The records of one canary attack by `client_id` on `model` (the simulator's `credit-risk` forest,
    renamed), the first stamped `start` (epoch seconds); random event ids and candidates unless `seed`."""
    served = replace(load_models(0)["credit-risk"], name=model)
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
