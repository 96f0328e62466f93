"""Scenario definitions, and the plan of a scenario's clients: who they are, which model they use, how they
behave. Planning draws every client's parameters before any traffic is generated, from its own random
stream, so the same clients (same keys, same dashboards) appear in the baseline day and the main one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from detector.simulate.attacks import AttackKind, Evasion, campaign
from detector.simulate.benign import ALLOW_LISTED, POPULATIONS
from detector.simulate.models import MODEL_NAMES, ServedModel
from detector.simulate.traffic import DAY, HOUR, Behaviour, Identity


@dataclass(frozen=True, slots=True)
class CampaignPlan:
    """`campaigns` (an inclusive range, drawn per scenario run) attack campaigns of `kind`, each hiding
    with `evasion`; a sybil campaign spreads over 3-10 keys, any other uses one."""

    kind: AttackKind
    campaigns: tuple[int, int]
    evasion: frozenset[Evasion] = frozenset()


@dataclass(frozen=True, slots=True)
class Scenario:
    """A simulated period: its length, whether it has a day/night cycle, how many clients of each benign
    population, which attack campaigns, a scale on the number of attack candidates, and whether attacks
    that are not slow run in bursts only (so that they finish within a short window)."""

    name: str
    description: str
    duration: float
    diurnal: bool
    benign: Mapping[str, int]
    campaigns: tuple[CampaignPlan, ...]
    candidate_scale: float = 1.0
    bursts_only: bool = False


_DAY_POPULATIONS = {
    "occasional": 150,
    "steady_app": 45,
    "batch_scorer": 12,
    "what_if": 30,
    "retry_storm": 20,
    "dashboard": 8,
    "evaluation": 6,
    "nightly_rescore": len(MODEL_NAMES),
}

_EVASIONS = (
    (2, frozenset({Evasion.SLOW, Evasion.LABEL_ONLY})),
    (1, frozenset({Evasion.SLOW, Evasion.SYBIL})),
    (2, frozenset({Evasion.SLOW, Evasion.INTERLEAVED})),
    (1, frozenset({Evasion.SYBIL, Evasion.INTERLEAVED, Evasion.LABEL_ONLY})),
    (2, frozenset({Evasion.COMPROMISED})),
)

SCENARIOS: dict[str, Scenario] = {
    scenario.name: scenario
    for scenario in (
        Scenario(
            name="smoke",
            description="A simulated hour, a few dozen benign clients, one attacker of each kind.",
            duration=HOUR,
            diurnal=False,
            benign={
                "occasional": 20,
                "steady_app": 4,
                "batch_scorer": 1,
                "what_if": 2,
                "retry_storm": 2,
                "dashboard": 2,
                "evaluation": 1,
                "nightly_rescore": len(MODEL_NAMES),
            },
            campaigns=tuple(CampaignPlan(kind, (1, 1)) for kind in AttackKind),
            candidate_scale=0.2,
            bursts_only=True,
        ),
        Scenario(
            name="standard",
            description="A simulated day, a few hundred benign clients, 6-9 attackers of each kind.",
            duration=DAY,
            diurnal=True,
            benign=_DAY_POPULATIONS,
            campaigns=tuple(CampaignPlan(kind, (6, 9)) for kind in AttackKind),
        ),
        Scenario(
            name="evasive",
            description="A simulated day like `standard`, every attack hiding: slow, sybil keys, "
            "interleaved with cover traffic, label-only (in combinations), or from a compromised key "
            "with a busy app's history.",
            duration=DAY,
            diurnal=True,
            benign=_DAY_POPULATIONS,
            campaigns=tuple(
                CampaignPlan(kind, (count, count), evasion)
                for kind in AttackKind
                for count, evasion in _EVASIONS
            ),
        ),
    )
}
"""The scenarios `simulate` knows, by name."""


@dataclass(frozen=True, eq=False, slots=True)
class Client:
    """One planned API key: identity, model, population (an attack kind for attackers) and behaviour.

    `in_baseline` says whether the key also sends (benign) traffic on the baseline day: most benign keys
    do, some are new on the main day, attackers do only from a compromised key, whose baseline is its owner's
    `ordinary` traffic.
    """

    identity: Identity
    model: str
    population: str
    behaviour: Behaviour
    in_baseline: bool
    kind: AttackKind | None = None
    campaign: str | None = None
    evasion: tuple[str, ...] = field(default=())
    ordinary: Behaviour | None = None

    def behaviour_in(self, baseline: bool) -> Behaviour:
        """How the key sends requests in the baseline period (`baseline`) or in the main one."""
        return self.ordinary if baseline and self.ordinary is not None else self.behaviour

    @property
    def role(self) -> str:
        """`attacker` or `benign`."""
        return "benign" if self.kind is None else "attacker"


_BENIGN_AGENTS = (
    "python-requests/2.32.3",
    "python-httpx/0.28.1",
    "okhttp/4.12.0",
    "Go-http-client/2.0",
    "axios/1.7.9",
    "curl/8.11.1",
    "Java-http-client/21.0.5",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 "
    "Safari/537.36",
)
# Attack tooling is scripted: the same clients as many benign integrations, so the agent alone tells nothing.
_ATTACK_AGENTS = ("python-requests/2.32.3", "python-httpx/0.28.1", "aiohttp/3.11.11", "curl/8.11.1")
_INTERNAL_AGENT = "airflow-worker/2.10.4"
_BASELINE_SHARE = 0.85


def plan(scenario: Scenario, models: Mapping[str, ServedModel], seed: int) -> list[Client]:
    """Every client of `scenario` for `seed`, benign populations first, then attack campaigns."""
    rng = np.random.default_rng([seed, 0x9A7])
    keys: set[str] = set()
    clients: list[Client] = []
    for population, count in scenario.benign.items():
        draw = POPULATIONS[population]
        for index in range(count):
            if population in ALLOW_LISTED:
                # One job per model, under a service account an operator recognises.
                model = MODEL_NAMES[index % len(MODEL_NAMES)]
                identity = Identity(
                    f"svc-{population.replace('_', '-')}-{model}", _ip(rng, "10.20.0"), _INTERNAL_AGENT
                )
                in_baseline = True
            else:
                model = str(rng.choice(MODEL_NAMES, p=[0.6, 0.4]))
                identity = Identity(_key(rng, keys), _ip(rng, _network(rng)), str(rng.choice(_BENIGN_AGENTS)))
                in_baseline = bool(rng.random() < _BASELINE_SHARE)
            clients.append(Client(identity, model, population, draw(rng, models[model]), in_baseline))
    number = 0
    for campaign_plan in scenario.campaigns:
        low, high = campaign_plan.campaigns
        for _ in range(int(rng.integers(low, high + 1))):
            number += 1
            model = str(rng.choice(MODEL_NAMES))
            sybil = Evasion.SYBIL in campaign_plan.evasion
            # A campaign's sybil keys come from one /24, as rented infrastructure usually does.
            network = _network(rng)
            agent = str(rng.choice(_ATTACK_AGENTS))
            attacks = campaign(
                campaign_plan.kind,
                models[model],
                rng,
                keys=int(rng.integers(3, 11)) if sybil else 1,
                evasion=campaign_plan.evasion,
                scale=scenario.candidate_scale,
                bursts_only=scenario.bursts_only,
            )
            compromised = Evasion.COMPROMISED in campaign_plan.evasion
            for attack in attacks:
                clients.append(
                    Client(
                        Identity(_key(rng, keys), _ip(rng, network), agent),
                        model,
                        campaign_plan.kind.value,
                        attack,
                        in_baseline=compromised,
                        kind=campaign_plan.kind,
                        campaign=f"campaign-{number:03d}",
                        evasion=tuple(sorted(style.value for style in campaign_plan.evasion)),
                        ordinary=attack.cover if compromised else None,
                    )
                )
    return clients


def _key(rng: np.random.Generator, taken: set[str]) -> str:
    while True:
        key = f"key_{rng.bytes(4).hex()}"
        if key not in taken:
            taken.add(key)
            return key


def _network(rng: np.random.Generator) -> str:
    # A random /24 of the shared address space 100.64.0.0/10 (RFC 6598): millions of addresses, so
    # unrelated clients almost never share one, and none of them routable.
    return f"100.{int(rng.integers(64, 128))}.{int(rng.integers(0, 256))}"


def _ip(rng: np.random.Generator, network: str) -> str:
    return f"{network}.{int(rng.integers(1, 255))}"
