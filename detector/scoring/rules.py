"""Detection rules as reviewed data (`rules.toml`), loaded and checked into typed `Rule` objects.

A rule's floor is the least evidence it ever acts on, so it must be positive: a rule with a floor of 0 would
fire on a client that showed nothing, and its score/threshold ratio would mean nothing. Such a rule is
refused when the rules load.

A rule may record exposure rather than an incident: a low severity, which is stored and shown but not
delivered (`MIA_ALERTS_MIN_SEVERITY`), and an `escalate` table of minimums, any one of which raises the
verdict to `escalated_severity`. Confidence vectors for many records are the raw material of an attack,
not an attack: they become an incident with membership-inference evidence beside them.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from detector.domain import AlertKind, Severity

ATLAS_EXFILTRATION_VIA_INFERENCE_API = "AML.T0024"


@dataclass(frozen=True)
class Rule:
    """One explainable detection rule: which feature it scores, its guards, and what a responder needs."""

    id: str
    kind: AlertKind
    title: str
    severity: Severity
    score: str
    floor: float
    requires: dict[str, float]
    explain: tuple[str, ...]
    known_false_positives: tuple[str, ...]
    triage: str
    references: tuple[str, ...]
    atlas: str
    escalate: dict[str, float] = field(default_factory=dict)
    escalated_severity: Severity | None = None

    def __post_init__(self) -> None:
        if not (self.floor > 0.0 and math.isfinite(self.floor)):
            raise ValueError(f"floor must be positive and finite, not {self.floor}")
        if bool(self.escalate) != (self.escalated_severity is not None):
            raise ValueError("escalate and escalated_severity go together")
        if self.escalated_severity is not None and self.escalated_severity.rank <= self.severity.rank:
            raise ValueError(f"escalated_severity must be above {self.severity.value}")

    def applies(self, values: Mapping[str, float]) -> bool:
        """True when every `requires` minimum holds for the snapshot `values`."""
        # A loop, not all() over a generator (4 times slower): it runs for every rule on every client judged.
        for feature, minimum in self.requires.items():  # noqa: SIM110
            if values.get(feature, 0.0) < minimum:
                return False
        return True

    def escalated(
        self, values: Mapping[str, float], minimums: Mapping[str, float]
    ) -> tuple[Severity, tuple[str, ...]]:
        """The severity of the rule's verdict on `values` and the features explaining it: the escalated
        severity, with the features that reached their `minimums` (the `escalate` table in force) first, when
        any did; else the rule's own severity and explanation."""
        held = tuple(name for name, minimum in minimums.items() if values.get(name, 0.0) >= minimum)
        if not held or self.escalated_severity is None:
            return self.severity, self.explain
        return self.escalated_severity, (*held, *(name for name in self.explain if name not in held))

    @property
    def measure(self) -> str:
        """What the rule's score measures, as a scoring model records it beside the threshold calibrated on
        it: the score feature and the guards deciding which clients score at all (a change to either makes
        a calibrated threshold meaningless; the floor and the explanation do not)."""
        guards = " and ".join(f"{name} >= {minimum:g}" for name, minimum in sorted(self.requires.items()))
        return f"{self.score} where {guards}" if guards else self.score

    def score_one(self, values: Mapping[str, float]) -> float:
        """The rule's score on the snapshot `values`: its `score` feature when every guard holds, else 0."""
        return values.get(self.score, 0.0) if self.applies(values) else 0.0


def _rule(entry: dict[str, Any]) -> Rule:
    try:
        return Rule(
            id=entry["id"],
            kind=AlertKind(entry["kind"]),
            title=entry["title"],
            severity=Severity(entry["severity"]),
            score=entry["score"],
            floor=float(entry["floor"]),
            requires={str(k): float(v) for k, v in entry.get("requires", {}).items()},
            explain=tuple(entry["explain"]),
            known_false_positives=tuple(entry["known_false_positives"]),
            triage=" ".join(entry["triage"].split()),
            references=tuple(entry.get("references", ())),
            atlas=entry["atlas"],
            escalate={str(k): float(v) for k, v in entry.get("escalate", {}).items()},
            escalated_severity=_severity(entry.get("escalated_severity")),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"rule {entry.get('id', '?')}: invalid or missing field: {exc}") from None


def _severity(value: str | None) -> Severity | None:
    return Severity(value) if value is not None else None


def load_rules(path: Path | None = None) -> list[Rule]:
    """The rules in `path`, or the packaged `rules.toml`; raises `ValueError` on a malformed rule (a missing
    field, an unknown kind or severity, a floor that is not positive) or duplicate ids."""
    text = (
        path.read_text() if path else resources.files("detector.scoring").joinpath("rules.toml").read_text()
    )
    rules = [_rule(entry) for entry in tomllib.loads(text).get("rules", [])]
    ids = [rule.id for rule in rules]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate rule ids in {path or 'rules.toml'}")
    return rules
